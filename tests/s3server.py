"""A real S3 API server on 127.0.0.1 for tests: moto's server mode, with authentication on.

moto checks signatures only against IAM users it knows: the server starts with
INITIAL_NO_AUTH_ACTION_COUNT=3, and those three unauthenticated calls create a user, its
access key and a policy allowing s3:*. From then on every request needs that key, so wrong
credentials fail as on AWS (403). The secret is moto's random one: tests grep outputs for it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from helpers import free_port, stop  # noqa: F401  (free_port: test_multihost imports it from here)

REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    key_id: str
    secret: str
    log: Path

    def env(self, **extra: str) -> dict[str, str]:
        """What a user sets for this server: the endpoint and the credentials."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": REGION,
            **extra,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=self.key_id, aws_secret_access_key=self.secret,
        )  # fmt: skip

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def start(folder: Path) -> tuple[subprocess.Popen, S3Server]:
    """`moto_server` on a free loopback port, its log in `folder`; a user with s3:* rights."""
    import boto3

    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = folder / "moto.log"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited {proc.returncode}:\n{log.read_text()}")
        try:
            httpx.get(f"{endpoint}/moto-api/data.json", timeout=1)  # no auth: not counted
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                stop(proc, signal.SIGTERM)
                raise RuntimeError(f"moto server not up after 60 s:\n{log.read_text()}") from None
            time.sleep(0.2)
    iam = boto3.client(
        "iam", endpoint_url=endpoint, region_name=REGION,
        aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap",
    )  # fmt: skip
    iam.create_user(UserName="seg")
    key = iam.create_access_key(UserName="seg")["AccessKey"]
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*",
                                                      "Resource": "*"}]}  # fmt: skip
    iam.put_user_policy(UserName="seg", PolicyName="s3", PolicyDocument=json.dumps(policy))
    return proc, S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"], log)


@pytest.fixture(scope="module")
def s3(scratch) -> Iterator[S3Server]:
    """A moto S3 server for the module (import this fixture into a test module)."""
    proc, server = start(scratch("s3"))
    try:
        yield server
    finally:
        stop(proc, signal.SIGTERM)


@pytest.fixture
def s3_env(s3: S3Server, monkeypatch) -> S3Server:
    """The server's endpoint and credentials in this process's environment (no profile or
    config file of the user's is read)."""
    for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return s3
