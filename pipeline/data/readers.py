"""Reading shards: the evaluation reader (every sample once) and the training stream (seeded,
shuffled, endless), both decode-only, both checking what they read against the manifest they
pinned when they started (pipeline.data.shards.pin): evaluation each member's sha256,
training its xxh3 (as cheap as a memcpy; sha256 costs as much as decoding the frame).

DataLoader workers only decode (zstd/PNG/JPEG/npy -> uint8 tensors); everything that resizes,
crops, flips or changes colour runs batched on the training device
(pipeline.data.transforms.BatchAugment), where it is cheap, so the loader keeps up with a
compiled GPU step.

Shards are read from tar URLs: local paths (random access: a worker skips the members it
does not own without reading them), `file://`, `pipe:` commands and webdataset's schemes,
or any fsspec URL (s3://, gs://, memory://; seekable, so skipping works there too). A shard
folder in an object store (`s3://bucket/prefix/val`, see pipeline.store) is read as a local
one: its manifest lists the shards and holds the checksums the readers check. A local folder
that points to a store (`store.json`, data.store) reads the shards from the prefix it names.

    loader = eval_loader("data/shards/val", batch_size=8, workers=8)
    for batches in loader: ...        # a list of same-size batches, see `collate_eval`
"""

from __future__ import annotations

import json
import multiprocessing
import tarfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.utils.data

from pipeline import store
from pipeline.data import codecs
from pipeline.data.labels import IGNORE_INDEX
from pipeline.data.shards import MANIFEST, Pinned, pin
from pipeline.errors import DataError

# manifest column prefix -> the tar member extensions it describes
_MEMBERS = ("image", "label", "instance", "json")


@dataclass(frozen=True)
class Subset:
    """Some samples of a shard source, by key (a k-fold's train or val part). The readers take
    it wherever they take a shard folder and skip other samples before reading their bytes."""

    source: Path | str | Sequence[str]
    keys: frozenset[str]


def _split_source(source) -> tuple[Path | str | Sequence[str], frozenset[str] | None]:
    """(the shard folder or URLs, the keys to keep or None for all)."""
    if isinstance(source, Subset):
        return source.source, source.keys
    return source, None


def shard_urls(source: Path | str | Pinned | Sequence[str]) -> list[str]:
    """A shard folder -> its sorted tar paths; a list of URLs is returned as is. A folder with
    a manifest (local, pointing to a store, or in an object store) lists the shards its
    manifest names (only committed shards, where they are)."""
    source = _split_source(source)[0]
    if isinstance(source, (list, tuple)):
        return [str(u) for u in source]
    pinned = _pinned(source)
    if pinned is not None:
        return _pinned_urls(pinned)
    path = Path(source)
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("shard-*.tar"))
        if not urls:
            raise DataError(f"{path}: no shard-*.tar files")
        return urls
    if path.is_file():
        return [str(path)]
    if "://" in str(source) or str(source).startswith("pipe:"):
        return [str(source)]
    raise DataError(f"{source}: no such shard folder or file")


def _pinned(source) -> Pinned | None:
    """The pinned manifest of a shard folder: a Pinned as it is, a local folder with its
    manifest (or pointer), any object-store folder (whose manifest is required there: a
    missing one is an error, not an unchecked read); None for URL lists, single tars and
    local folders of bare tars."""
    if isinstance(source, Pinned):
        return source
    if isinstance(source, (list, tuple)):
        return None
    if store.is_url(source):
        return None if str(source).endswith(".tar") else pin(source)
    path = store.local(source)
    return pin(path) if path.is_dir() and (path / MANIFEST).is_file() else None


def _pinned_urls(pinned: Pinned) -> list[str]:
    shards = pinned.table().column("shard").to_pylist()
    return [pinned.shard(s) for s in sorted({s for s in shards if s})]


def _local_path(url: str) -> str | None:
    if url.startswith("file://"):
        return url[len("file://") :]
    if "://" in url or url.startswith("pipe:"):
        return None
    return url


def _open_stream(url: str):
    """`pipe:cmd` and webdataset's schemes (http, ...) as a byte stream; any fsspec URL as a
    seekable file (pipeline.store: one-line errors for a bucket, credentials, endpoint)."""
    from webdataset.gopen import gopen, gopen_schemes

    scheme = url.split(":", 1)[0]
    if scheme in gopen_schemes:
        return gopen(url, "rb")
    return store.open_read(url)


def iter_raw(
    url: str, wanted: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) groups of one tar, in stored order. With `wanted`, the members of
    other keys are not read (skipped by seeking, for local files and object stores) and
    yield an empty dict."""
    path = _local_path(url)
    try:
        stream = open(path, "rb") if path is not None else _open_stream(url)  # noqa: SIM115
    except (OSError, ValueError) as exc:
        raise DataError(f"{url}: cannot open shard ({exc})") from None
    seekable = path is not None or getattr(stream, "seekable", lambda: False)()
    key, group = None, {}
    try:
        # "r:" seeks past members nobody reads; "r|" reads a pipe or socket straight through
        with (
            store.errors(url),
            tarfile.open(fileobj=stream, mode="r:" if seekable else "r|") as tar,
        ):
            for info in tar:
                if not info.isfile():
                    continue
                k, _, ext = info.name.partition(".")
                if k != key and key is not None:
                    yield key, group
                    group = {}
                key = k
                if wanted is None or wanted(k):
                    f = tar.extractfile(info)
                    assert f is not None
                    group[ext] = f.read()
    except tarfile.TarError as exc:
        raise DataError(f"{url}: corrupt shard ({exc})") from None
    finally:
        stream.close()
    if key is not None:
        yield key, group


def decode_sample(
    key: str, members: dict[str, bytes], source: str = "", instance: bool = True
) -> dict:
    """Tar members -> {"key", "image": uint8 (3, H, W), "label": uint8 (H, W) or None,
    "instance": int32 (H, W) or None, "meta": dict}. No resizing, ever. Each member's codec is
    its extension (pipeline.data.codecs: image.npy.zst, image.png, image.jpg, image.npy,
    label.npy.zst, label.png, ...). `instance=False` skips decoding instanceIds (training
    does not use them)."""
    where = f"{source}:{key}"
    found = {_member_prefix(ext): ext for ext in members}
    if "image" not in found:
        raise DataError(f"{where}: sample has no image member")
    image = codecs.decode_member(found["image"], members[found["image"]], where)
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    out = {
        "key": key,
        "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
        "label": None,
        "instance": None,
        "meta": json.loads(members["json"]) if "json" in members else {},
    }
    if "label" in found:
        label = codecs.decode_member(found["label"], members[found["label"]], where)
        out["label"] = torch.from_numpy(label)
    if instance and "instance" in found:
        inst = codecs.decode_member(found["instance"], members[found["instance"]], where)
        out["instance"] = torch.from_numpy(inst.astype(np.int32))
    return out


def worker_context(workers: int):
    """How DataLoader workers start: forked (fast) from a process with one thread; from a
    clean forkserver when other threads run (an in-process Prefect flow, an HTTP client), whose
    locks a fork would copy mid-use: such forked workers die at exit ("exited unexpectedly
    with exit code 1" after a Prefect flow in the same process)."""
    if workers == 0 or threading.active_count() == 1:
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pipeline.data.readers"])  # torch imported once, in the server
    return ctx


def _consumer() -> tuple[int, int]:
    """(index, count) of this DataLoader worker, 0/1 outside one."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# ----------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class _Expected:
    """What the pinned manifest promises about one sample: its shard and a checksum of each
    member."""

    index: int  # position in the split (manifest order = shard order)
    shard: str
    digests: dict[str, str]  # member prefix ("image", "label", ...) -> hex digest


_DIGEST = {"sha256": codecs.sha256, "xxh3": codecs.xxh3}


def _expected_samples(
    pinned: Pinned, keys: frozenset[str] | None, algo: str
) -> tuple[dict[str, _Expected], str]:
    """({key: _Expected}, the checksum used): `algo` where the manifest has it; shards written
    before xxh3 (format 1) are checked by sha256."""
    table = pinned.table()
    if f"image_{algo}" not in table.column_names:
        algo = "sha256"
    out: dict[str, _Expected] = {}
    for row in table.to_pylist():
        if row.get("shard") is None:  # skipped at preprocess time (`--skip-bad`)
            continue
        if keys is not None and row["key"] not in keys:
            continue
        digests = {m: row[f"{m}_{algo}"] for m in _MEMBERS if row.get(f"{m}_{algo}")}
        out[row["key"]] = _Expected(len(out), row["shard"], digests)
    return out, algo


def _member_prefix(ext: str) -> str:
    return ext.split(".", 1)[0]


def check_sample(
    url: str, key: str, members: dict[str, bytes], expected: _Expected, algo: str = "sha256"
) -> None:
    """Every member the manifest lists is there, in the shard it names, with its checksum,
    else a DataError naming the shard and the member."""
    if store.name(url) != expected.shard:
        raise DataError(
            f"{url}: {key}: the pinned manifest has it in {expected.shard} (shards and manifest "
            "from different runs of `seg preprocess`: rerun it for this split)"
        )
    got = {_member_prefix(ext): ext for ext in members}
    missing = sorted(set(expected.digests) - set(got))
    if missing:
        raise DataError(
            f"{url}: {key}: member(s) {', '.join(missing)} missing (damaged shard; rerun "
            "`seg preprocess` for this split)"
        )
    digest = _DIGEST[algo]
    for prefix, want in expected.digests.items():
        ext = got[prefix]
        if digest(members[ext]) != want:
            raise DataError(
                f"{url}: {key}.{ext}: does not match its {algo} in the manifest this reader "
                "pinned (a damaged shard, or the split rewritten while it was read: rerun `seg "
                "preprocess` for this split)"
            )


class EvalReader(torch.utils.data.IterableDataset):
    """Every sample of a split exactly once, decoded, in shard order; usable directly or in a
    DataLoader (workers split the samples, the loader interleaves them).

    With world_size > 1, rank r takes samples r, r + world, ... : disjoint, no padded
    duplicates (the union is the whole split). Inside a DataLoader each worker takes every
    W-th of its rank's samples.

    Reading a shard folder, the samples are checked against its manifest, pinned when the
    reader is made: each expected sample arrives with all its members and their sha256
    (computed in the decode workers), and
    nothing unexpected is in the shards. A damaged shard stops the evaluation with a DataError
    naming the shard and the key, where tar itself would end early or yield garbage silently.
    A list of URLs (pipe:, fsspec) has no manifest and is read unchecked. A `Subset` is the
    split restricted to its keys (numbered in shard order among themselves).
    """

    def __init__(
        self, source, rank: int = 0, world_size: int = 1, verify: bool = True, instance=True
    ) -> None:
        source, self.keys = _split_source(source)
        self.pinned = _pinned(source)
        self.urls = _pinned_urls(self.pinned) if self.pinned else shard_urls(source)
        self.rank, self.world_size = rank, world_size
        self.instance = instance
        self.expected: dict[str, _Expected] | None = None
        if verify and self.pinned is not None:
            self.expected, _ = _expected_samples(self.pinned, self.keys, "sha256")

    def num_samples(self) -> int:
        """Samples of this rank: from the manifest, else by reading the tar headers."""
        if self.expected is not None:
            n = len(self.expected)
        else:
            keys = (k for url in self.urls for k, _ in iter_raw(url, wanted=lambda _k: False))
            n = sum(1 for k in keys if self.keys is None or k in self.keys)
        return len(range(self.rank, n, self.world_size))

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _consumer()

        def mine(index: int) -> bool:  # rank r takes r, r + world, ...; its workers take turns
            rank, turn = index % self.world_size, index // self.world_size
            return rank == self.rank and turn % workers == worker

        if self.expected is None:
            for i, (url, key, members) in enumerate(self._all()):
                if mine(i):
                    yield decode_sample(key, members, url, self.instance)
            return
        yield from self._iter_checked({k: e for k, e in self.expected.items() if mine(e.index)})

    def _all(self) -> Iterator[tuple[str, str, dict]]:
        wanted = None if self.keys is None else self.keys.__contains__
        for url in self.urls:
            for key, members in iter_raw(url, wanted):
                if wanted is None or wanted(key):
                    yield url, key, members

    def _iter_checked(self, mine: dict[str, _Expected]) -> Iterator[dict]:
        assert self.expected is not None
        shards = {e.shard for e in mine.values()}
        seen: set[str] = set()
        for url in self.urls:
            if store.name(url) not in shards:
                continue
            for key, members in iter_raw(url, wanted=mine.__contains__):
                if key not in self.expected and (self.keys is None or key in self.keys):
                    raise DataError(
                        f"{url}: {key}: a sample the manifest does not list (damaged shard, or "
                        f"shards and {MANIFEST} from different runs of `seg preprocess`)"
                    )
                if key not in mine:
                    continue
                check_sample(url, key, members, mine[key])
                seen.add(key)
                yield decode_sample(key, members, url, self.instance)
        missing = sorted(set(mine) - seen, key=lambda k: mine[k].index)
        if missing:
            k = missing[0]
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            assert self.pinned is not None
            raise DataError(
                f"{self.pinned.shard(mine[k].shard)}: {k}{more}: missing from the shard "
                "(damaged or truncated; rerun `seg preprocess` for this split)"
            )


def collate_eval(samples: list[dict]) -> list[dict]:
    """Samples -> a list of batches, each of frames of one size (no resizing, no padding:
    evaluation is at the stored resolution). Cityscapes' frames are all 1024x2048: one batch.
    Each batch: {"key": [...], "image": uint8 (B, 3, H, W), "label": uint8 (B, H, W) or None,
    "instance": int32 (B, H, W) or None}."""
    groups: dict[tuple, list[dict]] = {}
    for s in samples:
        groups.setdefault(tuple(s["image"].shape), []).append(s)
    out = []
    for group in groups.values():
        batch = {
            "key": [s["key"] for s in group],
            "image": torch.stack([s["image"] for s in group]),
        }
        for name in ("label", "instance"):
            has = [s[name] is not None for s in group]
            batch[name] = torch.stack([s[name] for s in group]) if all(has) else None
        out.append(batch)
    return out


def eval_loader(
    source,
    batch_size: int = 1,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    instance: bool = True,
    verify: bool = True,
) -> torch.utils.data.DataLoader:
    """A DataLoader over `EvalReader`: `workers` processes read, verify and decode, the
    caller's process only moves batches to the device."""
    reader = EvalReader(source, rank, world_size, verify=verify, instance=instance)
    return torch.utils.data.DataLoader(
        reader, batch_size=batch_size, num_workers=workers, collate_fn=collate_eval,
        pin_memory=pin_memory, prefetch_factor=2 if workers else None,
        multiprocessing_context=worker_context(workers),
    )  # fmt: skip


# ----------------------------------------------------------------------------- training


class TrainStream(torch.utils.data.IterableDataset):
    """The training stream: endless, seeded, shuffled, split by node (rank) and DataLoader
    worker; it yields decoded samples {"image": uint8 (3, H, W), "label": uint8 (H, W)}.

    Each pass e over the data permutes the shard list with rng(seed, e); with at least as
    many shards as consumers (ranks x workers) each consumer reads its own shards, otherwise
    every consumer walks all shards and keeps every C-th sample, skipping the others' members
    unread (local tars are seeked past). Samples then pass a shuffle buffer with its own
    rng(seed, consumer); a consumer whose share of a pass is smaller than the buffer shuffles
    each pass whole instead (every sample once per pass, never a buffer of repeats). The
    stream is a function of (seed, consumer), so a resumed run skips what it already consumed
    without decoding it (`skip`: samples to drop per consumer, see `skip_for_resume`). It never
    ends, so every rank always has a next batch (iteration-based training, no hang at an
    epoch end).

    Reading a shard folder, every sample it yields is checked against the manifest pinned when
    the stream was made (`verify`): each member's xxh3 (sha256 for shards written before
    xxh3), in the shard the manifest names; anything else stops the run with a DataError
    naming the shard and the member. A list of URLs has no manifest and is read unchecked.
    """

    def __init__(
        self,
        source,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 64,
        skip: Sequence[int] | int = 0,
        verify: bool = True,
    ) -> None:
        source, self.keys = _split_source(source)  # a Subset's keys: the others are never read
        self.pinned = _pinned(source)
        self.urls = _pinned_urls(self.pinned) if self.pinned else shard_urls(source)
        self.expected: dict[str, _Expected] | None = None
        self.algo = "xxh3"
        if verify and self.pinned is not None:
            self.expected, self.algo = _expected_samples(self.pinned, self.keys, "xxh3")
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.skip = skip

    def _raw_passes(self, consumer: int, consumers: int) -> Iterator[tuple[int, str, str, dict]]:
        """(pass, url, key, members) of this consumer's samples, pass after pass."""
        epoch = 0
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
            urls = [self.urls[i] for i in order]
            shared = len(urls) < consumers  # consumers take turns within the shards
            turns = _Turns(consumer if shared else 0, consumers if shared else 1, self.keys)
            kept = 0
            for url in urls[consumer::consumers] if not shared else urls:
                for key, members in iter_raw(url, turns):
                    if members:  # this consumer's sample (the others' come back empty)
                        kept += 1
                        yield epoch, url, key, members
            if not kept:
                raise DataError(
                    f"{', '.join(self.urls[:3])}: no sample for consumer {consumer} of "
                    f"{consumers} (ranks x loader workers): fewer samples than consumers; "
                    "use fewer train.workers"
                )
            epoch += 1

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _consumer()
        consumer = self.rank * workers + worker
        consumers = self.world_size * workers
        # the shuffle buffer's rng: a stream of its own per (seed, consumer), distinct from the
        # shard order's rng(seed, pass) by the "shuffle" tag
        rng = np.random.default_rng([self.seed, consumer, int.from_bytes(b"shuffle", "big")])
        skip = self.skip if isinstance(self.skip, int) else self.skip[worker]
        produced = 0

        def emit(item) -> Iterator[dict]:
            nonlocal produced
            if produced >= skip:
                url, key, members = item
                if self.expected is not None:
                    self._check(url, key, members)
                yield decode_sample(key, members, url, instance=False)
            produced += 1

        buffer: list = []
        whole: list | None = None  # set when one pass fits the buffer: that pass's samples
        current = 0
        for epoch, *item in self._raw_passes(consumer, consumers):
            if whole is None:
                if len(buffer) < self.shuffle_buffer and epoch == 0:
                    buffer.append(item)
                    continue
                if len(buffer) == self.shuffle_buffer:
                    j = int(rng.integers(len(buffer)))
                    item, buffer[j] = buffer[j], item
                    yield from emit(item)
                    continue
                whole, buffer = buffer, []  # pass 0 ended before the buffer filled
            if epoch != current:  # pass `current` is complete: all of it, shuffled
                for j in rng.permutation(len(whole)):
                    yield from emit(whole[j])
                whole, current = [], epoch
            whole.append(item)

    def _check(self, url: str, key: str, members: dict[str, bytes]) -> None:
        assert self.expected is not None
        expected = self.expected.get(key)
        if expected is None:
            raise DataError(
                f"{url}: {key}: a sample the manifest this run pinned does not list (the split "
                "rewritten while it was read, or shards and manifest from different runs of "
                "`seg preprocess`: rerun it for this split)"
            )
        check_sample(url, key, members, expected, self.algo)


class _Turns:
    """The key predicate `iter_raw` asks for every member: True for the samples of consumer
    `consumer` of `consumers`, taking turns in stream order over the kept keys (`keys`: a
    Subset's, None for all)."""

    def __init__(self, consumer: int, consumers: int, keys: frozenset[str] | None) -> None:
        self.consumer, self.consumers, self.keys = consumer, consumers, keys
        self.index, self.last, self.mine = -1, None, False

    def __call__(self, key: str) -> bool:
        if key != self.last:  # members of one sample are adjacent: count each sample once
            self.last = key
            self.mine = False
            if self.keys is None or key in self.keys:
                self.index += 1
                self.mine = self.index % self.consumers == self.consumer
        return self.mine


def skip_for_resume(batches_done: int, batch_size: int, num_workers: int) -> list[int]:
    """Samples each DataLoader worker already produced after `batches_done` batches.

    A DataLoader over an IterableDataset takes batch b from worker b % num_workers, each batch
    from one worker; so worker w made ceil((batches_done - w) / num_workers) batches.
    """
    n = max(1, num_workers)
    return [max(0, -(-(batches_done - w) // n)) * batch_size for w in range(n)]


def collate_train(samples: list[dict]) -> dict:
    """Decoded samples -> {"image": uint8 (B, 3, H, W), "label": uint8 (B, H, W),
    "size": int64 (B, 2)}. Frames of different sizes (PASCAL VOC) are padded to the largest
    (image 0, label ignore) and `size` keeps each one's own (h, w) for the augmentation.

    The images are channels-last in memory (B, H, W, 3 underneath): the decoded frames are
    H, W, 3, so each copies in straight (0.4 ms for 1024x2048, where transposing into
    B, 3, H, W took 5: a third of a zstd frame's whole decode). The augmentation's output is
    contiguous and bit for bit the same either way."""
    sizes = torch.tensor([tuple(s["image"].shape[-2:]) for s in samples], dtype=torch.int64)
    h, w = (int(v) for v in sizes.max(0).values)
    ragged = bool((sizes != sizes[0]).any())
    b = len(samples)
    images = _batch_tensor((b, h, w, 3), 0 if ragged else None).permute(0, 3, 1, 2)
    labels = _batch_tensor((b, h, w), IGNORE_INDEX if ragged else None)
    for i, s in enumerate(samples):
        sh, sw = s["image"].shape[-2:]
        images[i, :, :sh, :sw] = s["image"]
        labels[i, :sh, :sw] = s["label"]
    return {"image": images, "label": labels, "size": sizes}


def _batch_tensor(shape: tuple[int, ...], fill: int | None) -> torch.Tensor:
    """A uint8 batch; in a DataLoader worker in shared memory from the start (as torch's
    default_collate does), so the 25 MB of a 1024x2048 batch of 4 are not copied again to reach
    the training process. `fill` None: every element is about to be written."""
    if torch.utils.data.get_worker_info() is not None:
        numel = 1
        for n in shape:
            numel *= n
        elem = torch.empty(0, dtype=torch.uint8)
        out = elem.new(elem._typed_storage()._new_shared(numel, device="cpu")).view(shape)
    else:
        out = torch.empty(shape, dtype=torch.uint8)
    if fill is not None:
        out.fill_(fill)
    return out
