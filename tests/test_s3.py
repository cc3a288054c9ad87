# ruff: noqa: F811  (the s3 fixtures are imported, then taken as arguments)
"""Shards in an S3 bucket, against a real S3 API server on 127.0.0.1 (moto's server mode, with
authentication on: tests/s3server.py). Configured as a user configures S3: AWS_ENDPOINT_URL
and the AWS credential variables, nothing in params.yaml.
"""

from __future__ import annotations

import json
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
from conftest import write_frame
from helpers import no_secret
from s3server import s3, s3_env  # noqa: F401  (fixtures; tests take them as arguments)
from typer.testing import CliRunner

from pipeline.data.readers import EvalReader, TrainStream
from pipeline.data.shards import MANIFEST, POINTER, pin, read_manifest, write_shards
from pipeline.errors import DataError
from stages.cli import app

REPO = Path(__file__).resolve().parents[1]


def _bucket(s3, name: str) -> str:
    return s3.make_bucket(name)


def _versioned(s3, name: str) -> str:
    """A new bucket with versioning on: a key written twice would keep two versions."""
    bucket = s3.make_bucket(name)
    s3.client().put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    return bucket


def _one_version_each(s3, bucket: str) -> list[str]:
    """Every key of the bucket has exactly one version (nothing was rewritten); the keys."""
    versions = s3.client().list_object_versions(Bucket=bucket).get("Versions", [])
    keys = [v["Key"] for v in versions]
    assert len(keys) == len(set(keys)), sorted(keys)
    return sorted(keys)


def _puts(s3, bucket: str) -> int:
    """PUT requests the server has answered for the bucket's objects so far."""
    return len(re.findall(rf'"PUT /{bucket}/[^ ?]+ HTTP', s3.log.read_text()))


def test_preprocess_into_a_store_writes_a_prefix_named_after_its_content_once(
    s3_env, tiny_root, tmp_path
):
    s3 = s3_env
    bucket = _versioned(s3, "roundtrip")
    store_url = f"s3://{bucket}/shards"
    pointer = tmp_path / "host-a" / "val"
    args = ["preprocess", str(tiny_root), "val", str(pointer), "--samples-per-shard", "2",
            "--workers", "1", "--store", store_url]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (prefix,) = {k.rsplit("/", 1)[0] for k in s3.keys(bucket)}
    assert re.fullmatch(r"shards/val/[0-9a-f]{32}", prefix), prefix
    url = f"s3://{bucket}/{prefix}"
    assert "3 samples -> 2 shard(s)" in result.output and f"{url} (uploaded" in result.output
    assert s3.keys(bucket) == [f"{prefix}/{n}" for n in (MANIFEST, "shard-000000.tar",
                                                         "shard-000001.tar")]  # fmt: skip
    # the local folder DVC tracks: a pointer (no credentials) and the manifest's copy
    assert sorted(p.name for p in pointer.iterdir()) == [MANIFEST, POINTER]
    doc = json.loads((pointer / POINTER).read_text())
    assert doc["url"] == url and doc["manifest_sha256"] == pin(pointer).sha256
    # the same bytes as a local preprocess: DVC hashes and provenance agree across stores
    local = tmp_path / "local" / "val"
    write_shards(tiny_root, "val", local, samples_per_shard=2)
    client = s3.client()
    for name in ("shard-000000.tar", "shard-000001.tar", MANIFEST):
        body = client.get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read()
        assert body == (local / name).read_bytes(), name
    assert (pointer / MANIFEST).read_bytes() == (local / MANIFEST).read_bytes()
    # read back through the pointer: every sample, verified, as from the local folder
    assert [s["key"] for s in EvalReader(pointer)] == [s["key"] for s in EvalReader(local)]
    sample = next(iter(TrainStream(pointer, shuffle_buffer=1)))
    assert sample["image"].shape == (3, 32, 64) and sample["label"].shape == (32, 64)
    stats = CliRunner().invoke(app, ["stats", str(pointer), "--json"])
    assert stats.exit_code == 0 and '"samples": 3' in stats.output, stats.output
    # a second host preprocessing the same data finds the prefix and uploads nothing
    puts = _puts(s3, bucket)
    again = CliRunner().invoke(app, [*args[:3], str(tmp_path / "host-b" / "val"), *args[4:]])
    assert again.exit_code == 0, again.output
    assert f"{url} (found there already, nothing uploaded" in again.output
    assert _puts(s3, bucket) == puts
    assert (tmp_path / "host-b/val" / POINTER).read_bytes() == (pointer / POINTER).read_bytes()
    # other data (a frame changed) goes to a prefix of its own; the first stays as it was
    write_frame(tiny_root, "val", "gamma", 101, seed=7)
    changed = CliRunner().invoke(app, [*args, "--overwrite"])
    assert changed.exit_code == 0, changed.output
    new = json.loads((pointer / POINTER).read_text())["url"]
    assert new != url and new.startswith(f"s3://{bucket}/shards/val/")
    keys = _one_version_each(s3, bucket)  # no key was ever written twice
    assert len(keys) == 6 and sum(k.startswith(f"{prefix}/") for k in keys) == 3
    # a damaged object (a disk, not us): the evaluation reader names the shard and the member
    data = bytearray((local / "shard-000001.tar").read_bytes())
    with tarfile.open(local / "shard-000001.tar") as tar:
        start = tar.getmember("gamma_000102_000019.label.npy.zst").offset_data
    data[start + 10 : start + 30] = bytes(b ^ 0xFF for b in data[start + 10 : start + 30])
    client.put_object(Bucket=bucket, Key=f"{prefix}/shard-000001.tar", Body=bytes(data))
    with pytest.raises(DataError, match=re.escape(f"{url}/shard-000001.tar: gamma_000102_000019.")):
        list(EvalReader(tmp_path / "host-b" / "val"))


@pytest.mark.e2e
def test_dvc_repro_with_data_store_tracks_pointers_and_never_rewrites_the_bucket(s3_env, tmp_path):
    """README "Beyond one machine", step 1, as written: data.store in params.yaml, the shipped
    dvc.yaml. DVC tracks the pointers; a forced rerun (DVC deletes the stage's output first)
    finds the prefix complete and uploads nothing."""
    from test_dvc import _lock, _new_project, dvc

    s3 = s3_env
    bucket = _versioned(s3, "dvcstore")
    proj = _new_project(tmp_path / "proj", **{"data.store": f"s3://{bucket}/shards"})
    dvc(proj, "repro", "preprocess@train", "preprocess@val")
    for split in ("train", "val"):
        folder = proj / "data/shards" / split
        assert sorted(p.name for p in folder.iterdir()) == [MANIFEST, POINTER]
        url = json.loads((folder / POINTER).read_text())["url"]
        assert url.startswith(f"s3://{bucket}/shards/{split}/")
        assert f"{url.split('/', 3)[3]}/{MANIFEST}" in s3.keys(bucket)
    outs = {o["path"]: o for o in _lock(proj)["preprocess@val"]["outs"]}
    assert outs["data/shards/val"]["md5"].endswith(".dir")  # DVC caches the pointer folder
    pointer, puts = (proj / "data/shards/val" / POINTER).read_bytes(), _puts(s3, bucket)
    forced = dvc(proj, "repro", "-f", "preprocess@val")
    said = forced.stdout + forced.stderr  # seg prints on stderr under dvc
    assert "found there already, nothing uploaded" in said, said
    assert _puts(s3, bucket) == puts
    assert (proj / "data/shards/val" / POINTER).read_bytes() == pointer
    assert json.loads(dvc(proj, "status", "preprocess@val", "--json").stdout) == {}
    _one_version_each(s3, bucket)


def test_a_reader_keeps_its_pinned_prefix_while_the_split_is_preprocessed_again(
    s3_env, tiny_root, tmp_path
):
    """Training from the store while `seg preprocess --overwrite` writes new data for the same
    split: the new data goes to a new prefix, the pointer moves, and the running stream goes on
    reading the prefix it pinned: every sample it yields is the old data."""
    s3 = s3_env
    bucket = _versioned(s3, "pinned")
    pointer = tmp_path / "train"
    kw = {"samples_per_shard": 1, "store_url": f"s3://{bucket}/shards"}
    write_shards(tiny_root, "train", pointer, **kw)
    old = {s["key"]: s["image"] for s in EvalReader(pointer)}
    stream = iter(TrainStream(pointer, seed=1, shuffle_buffer=1))
    seen = [next(stream) for _ in range(2)]
    for i in range(6):  # every frame changes
        write_frame(tiny_root, "train", "alpha" if i < 3 else "beta", i, seed=9)
    write_shards(tiny_root, "train", pointer, overwrite=True, **kw)
    new = {s["key"]: s["image"] for s in EvalReader(pointer)}
    assert all(not torch.equal(old[k], new[k]) for k in old)
    seen += [next(stream) for _ in range(10)]  # the rest of this pass and most of the next
    assert all(torch.equal(s["image"], old[s["key"]]) for s in seen)
    assert len(_one_version_each(s3, bucket)) == 2 * 7


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
             store_url=sys.argv[3])
"""


def _killed_upload(s3, root: Path, pointer: Path, store_url: str, tmp: Path) -> None:
    # a SIGKILL leaves the staging folder (tempfile's) behind: in the test's tmp_path, not /tmp
    env = {**os.environ, **s3.env(), "PYTHONPATH": str(REPO), "TMPDIR": str(tmp)}
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_AFTER, str(root), str(pointer), store_url], env=env,
        capture_output=True,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


def test_a_killed_upload_leaves_no_manifest_and_the_rerun_completes_it(s3_env, tiny_root, tmp_path):
    s3 = s3_env
    bucket = _versioned(s3, "killed")
    store_url, pointer = f"s3://{bucket}/shards", tmp_path / "shards" / "train"
    _killed_upload(s3, tiny_root, pointer, store_url, tmp_path)
    (shard,) = s3.keys(bucket)  # uploaded, uncommitted; no pointer
    assert shard.endswith("/shard-000000.tar") and not pointer.exists()
    url = f"s3://{bucket}/{shard.rsplit('/', 1)[0]}"
    for read in (read_manifest, EvalReader, TrainStream):
        with pytest.raises(DataError, match=re.escape(f"{url}/{MANIFEST}: no manifest")):
            read(url)
    # the rerun writes the same prefix: the shard already there is the same bytes, kept as it is
    summary = write_shards(tiny_root, "train", pointer, samples_per_shard=1, store_url=store_url)
    assert summary.shards == 6 and summary.location == url and summary.uploaded
    assert len(_one_version_each(s3, bucket)) == 7 and len(list(EvalReader(pointer))) == 6


def test_a_prefix_given_directly_is_written_once(s3_env, tiny_root, tmp_path):
    """`seg preprocess ... s3://bucket/prefix` by hand: written once, never replaced."""
    s3 = s3_env
    bucket = _versioned(s3, "direct")
    url = f"s3://{bucket}/shards/train"
    write_shards(tiny_root, "train", url, samples_per_shard=4)
    assert len(list(EvalReader(url))) == 6
    for overwrite in (False, True):
        with pytest.raises(DataError, match=re.escape(f"{url}: shards exist there, and a bucket "
                                                      "prefix is written once")):  # fmt: skip
            write_shards(tiny_root, "train", url, overwrite=overwrite)
    # a cut-short upload of other data under a prefix: named, and left as it was
    other = f"s3://{bucket}/other/train"
    s3.client().put_object(Bucket=bucket, Key="other/train/shard-000000.tar", Body=b"x" * 512)
    with pytest.raises(DataError, match=re.escape(f"{other}/shard-000000.tar: exists with other")):
        write_shards(tiny_root, "train", other, samples_per_shard=4)
    # anything that is not a shard under the prefix: never deleted, never mixed in
    s3.client().put_object(Bucket=bucket, Key="notes/train/notes.txt", Body=b"keep")
    with pytest.raises(DataError, match="not a shard folder"):
        write_shards(tiny_root, "train", f"s3://{bucket}/notes/train")
    assert len(_one_version_each(s3, bucket)) == 5


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
    """The same run on the same shards, once from the bucket (data.store: the project's
    data/shards holds pointers), once from disk: the same weights and the same scores;
    provenance names the data's hash and the prefix; no file holds a secret."""
    s3 = s3_env
    bucket = _bucket(s3, "stages")
    remote = _project(trained_project, tmp_path / "remote", "data/shards")
    raw = yaml.safe_load((remote / "params.yaml").read_text())
    raw["data"]["store"] = f"s3://{bucket}/run"
    (remote / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for split in ("train", "val"):
        write_shards(
            trained_project / raw["data"]["root"], split, remote / "data/shards" / split,
            samples_per_shard=raw["preprocess"]["samples_per_shard"],
            store_url=raw["data"]["store"],
        )  # fmt: skip
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
    assert data["path"] == "data/shards/val"
    assert data["store"].startswith(f"s3://{bucket}/run/val/")
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
        "preprocess": [
            "preprocess",
            str(tiny_root),
            "val",
            str(proj / "data/shards/val"),
            "--workers",
            "1",
            "--store",
            url,
        ],  # fmt: skip
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


def test_data_store_is_a_url_and_data_shards_then_a_local_folder():
    from conftest import tiny_params

    from pipeline.errors import ConfigError
    from pipeline.params import params_from_dict

    assert params_from_dict(tiny_params(**{"data.store": "s3://b/p"})).data.store == "s3://b/p"
    with pytest.raises(ConfigError, match="data.store: expected an object-store URL"):
        params_from_dict(tiny_params(**{"data.store": "data/elsewhere"}))
    with pytest.raises(ConfigError, match="data.shards: with data.store it is the local folder"):
        params_from_dict(tiny_params(**{"data.store": "s3://b/p", "data.shards": "s3://b/q"}))


def test_a_missing_object_in_a_bucket_named_bucket_is_a_missing_object(s3_env):
    """Only S3's NoSuchBucket says "bucket ... does not exist"; the word in a bucket's name
    (team-bucket) does not turn a missing object into a missing bucket."""
    from pipeline import store
    from pipeline.errors import DataError

    if "team-bucket" not in [b["Name"] for b in s3_env.client().list_buckets()["Buckets"]]:
        s3_env.make_bucket("team-bucket")
    with pytest.raises(FileNotFoundError):
        store.read_bytes("s3://team-bucket/shards/val/manifest.parquet")
    with pytest.raises(DataError, match=r"^no manifest there$"):
        store.read_bytes(
            "s3://team-bucket/shards/val/manifest.parquet", missing="no manifest there"
        )
    with pytest.raises(DataError, match="bucket 'absent-bucket' does not exist"):
        store.read_bytes("s3://absent-bucket/shards/val/manifest.parquet", missing="no manifest")
