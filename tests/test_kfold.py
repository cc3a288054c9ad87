"""Grouped k-fold: fold assignment, the readers' key filter, fold training/eval, the summary."""

from __future__ import annotations

import itertools

from conftest import write_frame

from pipeline.data.shards import EvalReader, Subset, TrainStream, write_shards


def test_readers_take_a_subset_of_keys(tmp_path):
    root = tmp_path / "cs"
    keys = [write_frame(root, "train", city, i) for i, city in enumerate("abcabc")]
    out = tmp_path / "train"
    write_shards(root, "train", out, samples_per_shard=2)
    some = frozenset(keys[1::2])  # every other frame, spread over all three shards
    assert [s["key"] for s in EvalReader(Subset(out, some))] == sorted(some)
    ranks = [[s["key"] for s in EvalReader(Subset(out, some), r, 2)] for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(some) and not set(ranks[0]) & set(ranks[1])
    seen = [
        s["key"] for s in itertools.islice(TrainStream(Subset(out, some), shuffle_buffer=2), 30)
    ]
    assert set(seen) == some  # only the subset, and all of it, over several epochs
