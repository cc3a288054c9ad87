# ruff: noqa: F811  (the s3 fixtures are imported, then taken as arguments)
"""Shards in an S3 bucket, against a real S3 API server on 127.0.0.1 (moto's server mode, with
authentication on: tests/s3server.py). Configured as a user configures S3: AWS_ENDPOINT_URL
and the AWS credential variables, nothing in params.yaml.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from helpers import no_secret
from s3server import s3, s3_env  # noqa: F401  (fixtures; tests take them as arguments)
from typer.testing import CliRunner

from pipeline.data.readers import EvalReader, TrainStream
from pipeline.data.shards import MANIFEST, read_manifest, write_shards
from pipeline.errors import DataError
from stages.cli import app

REPO = Path(__file__).resolve().parents[1]


def _bucket(s3, name: str) -> str:
    return s3.make_bucket(name)


def test_preprocess_into_a_bucket_is_byte_identical_and_checked_on_read(
    s3_env, tiny_root, tmp_path
):
    s3 = s3_env
    bucket = _bucket(s3, "roundtrip")
    url = f"s3://{bucket}/shards/val"
    result = CliRunner().invoke(
        app,
        ["preprocess", str(tiny_root), "val", url, "--samples-per-shard", "2", "--workers", "1"],
    )
    assert result.exit_code == 0, result.output
    assert "3 samples -> 2 shard(s)" in result.output and url in result.output
    assert s3.keys(bucket) == [
        "shards/val/manifest.parquet", "shards/val/shard-000000.tar", "shards/val/shard-000001.tar"
    ]  # fmt: skip
    # the same bytes as a local preprocess: DVC hashes and provenance agree across stores
    local = tmp_path / "val"
    write_shards(tiny_root, "val", local, samples_per_shard=2)
    client = s3.client()
    for name in ("shard-000000.tar", "shard-000001.tar", MANIFEST):
        body = client.get_object(Bucket=bucket, Key=f"shards/val/{name}")["Body"].read()
        assert body == (local / name).read_bytes(), name
    # read back: every sample, verified against the manifest, as from the local folder
    assert [s["key"] for s in EvalReader(url)] == [s["key"] for s in EvalReader(local)]
    sample = next(iter(TrainStream(url, shuffle_buffer=1)))
    assert sample["image"].shape == (3, 32, 64) and sample["label"].shape == (32, 64)
    stats = CliRunner().invoke(app, ["stats", url, "--json"])
    assert stats.exit_code == 0 and '"samples": 3' in stats.output, stats.output
    # a damaged object in the bucket: the evaluation reader names the shard and the key
    data = bytearray((local / "shard-000001.tar").read_bytes())
    with tarfile.open(local / "shard-000001.tar") as tar:
        start = tar.getmember("gamma_000102_000019.label.png").offset_data
    data[start + 10 : start + 60] = bytes(b ^ 0xFF for b in data[start + 10 : start + 60])
    client.put_object(Bucket=bucket, Key="shards/val/shard-000001.tar", Body=bytes(data))
    with pytest.raises(DataError, match=re.escape(f"{url}/shard-000001.tar: gamma_000102_000019")):
        list(EvalReader(url))


def test_urls_in_messages_and_records_carry_no_user_info_or_query():
    from pipeline import store

    assert (
        store.display("s3://KEYID:SECRET@Bucket/p/val?X-Amz-Signature=abc") == "s3://bucket/p/val"
    )
    assert store.display("data/shards/val") == "data/shards/val"
    assert store.join("s3://b/p/", "val") == "s3://b/p/val"
    assert store.join("data/shards", "val") == Path("data/shards/val")


def test_each_rank_reads_only_its_own_shards_from_the_bucket(s3_env, tiny_root):
    s3 = s3_env
    bucket = _bucket(s3, "ranks")
    url = f"s3://{bucket}/train"
    write_shards(tiny_root, "train", url, samples_per_shard=1)  # 6 shards, 2 ranks

    def fetched() -> set[str]:  # shard objects read so far (GET requests in the server log)
        log = s3.log.read_text()
        return set(re.findall(rf'"GET /{bucket}/train/(shard-\d+\.tar) HTTP', log))

    seen: dict[int, set[str]] = {}
    for rank in (0, 1):
        before = fetched()
        stream = iter(TrainStream(url, seed=3, rank=rank, world_size=2, shuffle_buffer=1))
        for _ in range(2):
            assert next(stream)["image"].shape == (3, 32, 64)
        seen[rank] = fetched() - before
    assert seen[0] and seen[1] and not seen[0] & seen[1], seen


_KILL_AFTER = """
import os, signal, sys
from pipeline.data.shards import write_shards
def progress(done, total):
    if done == 2:  # shard 0 is uploaded (shard 1 opened); the manifest is not
        os.kill(os.getpid(), signal.SIGKILL)
write_shards(sys.argv[1], "train", sys.argv[2], samples_per_shard=1, progress=progress,
             overwrite=sys.argv[3] == "overwrite")
"""


def _killed_upload(s3, root: Path, url: str, overwrite: bool, tmp: Path) -> None:
    # a SIGKILL leaves the staging folder (tempfile's) behind: in the test's tmp_path, not /tmp
    env = {**os.environ, **s3.env(), "PYTHONPATH": str(REPO), "TMPDIR": str(tmp)}
    mode = "overwrite" if overwrite else "new"
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_AFTER, str(root), url, mode], env=env, capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


def test_a_killed_upload_leaves_no_manifest_and_the_rerun_replaces_it(s3_env, tiny_root, tmp_path):
    s3 = s3_env
    bucket = _bucket(s3, "killed")
    url = f"s3://{bucket}/shards/train"
    _killed_upload(s3, tiny_root, url, overwrite=False, tmp=tmp_path)
    assert s3.keys(bucket) == ["shards/train/shard-000000.tar"]  # uploaded, uncommitted
    for read in (read_manifest, EvalReader, TrainStream):
        with pytest.raises(DataError, match=re.escape(f"{url}/{MANIFEST}: no manifest")):
            read(url)
    # the rerun (no --overwrite needed: nothing was committed) replaces what it left
    summary = write_shards(tiny_root, "train", url, samples_per_shard=4)
    assert summary.shards == 2
    assert s3.keys(bucket) == [f"shards/train/{n}" for n in (MANIFEST, "shard-000000.tar",
                                                             "shard-000001.tar")]  # fmt: skip
    assert len(list(EvalReader(url))) == 6
    # a committed split is replaced only when asked; a replacing upload that is killed
    # removed the old manifest first: no manifest ever describes other shards
    with pytest.raises(DataError, match=re.escape(f"{url}: shards exist there")):
        write_shards(tiny_root, "train", url)
    _killed_upload(s3, tiny_root, url, overwrite=True, tmp=tmp_path)
    assert f"shards/train/{MANIFEST}" not in s3.keys(bucket)
    write_shards(tiny_root, "train", url, samples_per_shard=4)
    assert len(s3.keys(bucket)) == 3  # the killed run's extra shard is gone again
    # anything that is not a shard under the prefix: never deleted, never mixed in
    s3.client().put_object(Bucket=bucket, Key="shards/train/notes.txt", Body=b"keep")
    with pytest.raises(DataError, match="not a shard folder"):
        write_shards(tiny_root, "train", url, overwrite=True)
    assert "shards/train/notes.txt" in s3.keys(bucket)


# ----------------------------------------------------------------------------- stages


def _project(trained: Path, tmp_path: Path, shards: str) -> Path:
    """A folder with the trained project's params.yaml, shards in the bucket, amp off."""
    proj = tmp_path / "proj"
    proj.mkdir(parents=True)
    raw = yaml.safe_load((trained / "params.yaml").read_text())
    raw["data"]["shards"] = shards
    raw["train"]["amp"] = raw["evaluate"]["amp"] = "off"
    (proj / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return proj


def _seg(proj: Path, *args: str, monkeypatch):
    """`seg ARGS` in `proj` (CliRunner: stdout and stderr together)."""
    monkeypatch.chdir(proj)
    return CliRunner().invoke(app, list(args))


def test_train_and_eval_stream_from_the_bucket_as_from_disk(
    s3_env, trained_project, tmp_path, monkeypatch
):
    """The same run on the same shards, once from the bucket, once from disk: the same
    weights and the same scores; provenance names the bucket; no file holds a secret."""
    s3 = s3_env
    bucket = _bucket(s3, "stages")
    for split in ("train", "val"):
        raw = yaml.safe_load((trained_project / "params.yaml").read_text())
        write_shards(
            trained_project / raw["data"]["root"], split, f"s3://{bucket}/run/{split}",
            samples_per_shard=raw["preprocess"]["samples_per_shard"],
        )  # fmt: skip
    remote = _project(trained_project, tmp_path / "remote", f"s3://{bucket}/run")
    disk = _project(trained_project, tmp_path / "disk", str(trained_project / "data/shards"))
    outputs = []
    for proj in (remote, disk):
        train = _seg(proj, "train", monkeypatch=monkeypatch)
        assert train.exit_code == 0, train.output
        evaluate = _seg(proj, "eval", monkeypatch=monkeypatch)
        assert evaluate.exit_code == 0, evaluate.output
        outputs.append(train.output + evaluate.output)
    a = torch.load(remote / "outputs/train/last.pt", map_location="cpu", weights_only=False)
    b = torch.load(disk / "outputs/train/last.pt", map_location="cpu", weights_only=False)
    assert a["step"] == b["step"] > 0
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    ma, mb = (yaml.safe_load((p / "outputs/eval/metrics.json").read_text()) for p in (remote, disk))
    assert ma["miou"] == mb["miou"] and ma["per_class_iou"] == mb["per_class_iou"]
    data = ma["provenance"]["data"]
    assert data["path"] == f"s3://{bucket}/run/val"
    assert data["sha256"] == mb["provenance"]["data"]["sha256"]  # byte-identical manifests
    assert no_secret(s3, [remote], outputs) > 5


# ----------------------------------------------------------------------------- bad cases


@pytest.fixture
def bad_case(s3_env, request, monkeypatch):
    """(shards URL, what the one line must say) of a missing bucket, wrong credentials or an
    endpoint that does not answer."""
    s3 = s3_env
    bucket = "present"
    if bucket not in [b["Name"] for b in s3.client().list_buckets()["Buckets"]]:
        s3.make_bucket(bucket)
    case = request.param
    if case == "missing bucket":
        return "s3://absent/shards", "bucket 'absent' does not exist"
    if case == "wrong credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret[::-1])
        return f"s3://{bucket}/shards", "access denied"
    from helpers import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's default retries take ~9 s here
    return f"s3://{bucket}/shards", "cannot reach the object store at http://127.0.0.1:"


CASES = ["missing bucket", "wrong credentials", "unreachable endpoint"]


@pytest.mark.parametrize("bad_case", CASES, indirect=True)
def test_bad_bucket_credentials_or_endpoint_fail_in_one_line_writing_nothing(
    bad_case, s3, tiny_root, trained_project, tmp_path, monkeypatch
):
    url, message = bad_case
    proj = _project(trained_project, tmp_path, url)
    before = s3.keys("present")
    runs = {
        "preprocess": ["preprocess", str(tiny_root), "val", f"{url}/val", "--workers", "1"],
        "train": ["train"],
        "eval": ["eval", "--checkpoint", str(trained_project / "outputs/train/last.pt")],
    }
    for name, args in runs.items():
        result = _seg(proj, *args, monkeypatch=monkeypatch)
        assert result.exit_code == 1, (name, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1, (name, result.output)
        assert lines[0].startswith(f"error: {url}/"), (name, lines[0])
        assert message in lines[0], (name, lines[0])
        no_secret(s3, [], [result.output])
        assert sorted(p.name for p in proj.iterdir()) == ["params.yaml"], name  # nothing written
    assert s3.keys("present") == before
    shutil.rmtree(proj)
