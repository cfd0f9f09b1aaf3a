"""cvrdata.stream.ChunkedBatches: the order it documents, every row once, ranks that add up to one process."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cvrdata.stream import ChunkedBatches

DTYPES = {"user": torch.int64, "item": torch.int64, "click": torch.float32}


def _columns(n: int = 1000, seed: int = 0):
    g = np.random.default_rng(seed)
    return {"user": np.arange(n, dtype=np.int32), "item": g.integers(0, 50, n).astype(np.int32),
            "click": g.integers(0, 2, n).astype(np.uint8)}


def _reference(columns, batch_size, rng, chunk):
    """The documented order, written out: chunk starts permuted, then each chunk's rows."""
    n = len(columns["user"])
    chunk = max(batch_size, chunk // batch_size * batch_size)
    for start in rng.permutation(np.arange(0, n, chunk)):
        rows = np.arange(start, min(start + chunk, n))[rng.permutation(min(chunk, n - start))]
        for b in range(0, len(rows), batch_size):
            yield rows[b:b + batch_size]


@pytest.mark.parametrize("n, batch, chunk", [(1000, 64, 256), (1000, 64, 100), (999, 1000, 128), (7, 3, 2)])
def test_one_process_follows_the_documented_order(n, batch, chunk):
    cols = _columns(n)
    got = list(ChunkedBatches(cols, DTYPES, batch, np.random.default_rng(5), chunk=chunk))
    want = list(_reference(cols, batch, np.random.default_rng(5), chunk))
    assert len(got) == len(want) == len(ChunkedBatches(cols, DTYPES, batch, np.random.default_rng(5), chunk=chunk))
    for (users, items, clicks), rows in zip(got, want):
        assert users.dtype == torch.int64 and clicks.dtype == torch.float32
        assert torch.equal(users, torch.from_numpy(rows.astype(np.int64)))  # column "user" is the row id
        assert torch.equal(items, torch.from_numpy(cols["item"][rows].astype(np.int64)))
        assert torch.equal(clicks, torch.from_numpy(cols["click"][rows].astype(np.float32)))
    seen = torch.cat([b[0] for b in got])
    assert torch.equal(seen.sort().values, torch.arange(n))  # every row once
    assert sum(len(b[0]) < batch for b in got) <= 1  # only the log's tail may give a short batch


def test_epochs_differ_and_seeds_repeat():
    cols = _columns()
    rng = np.random.default_rng(1)
    stream = ChunkedBatches(cols, DTYPES, 32, rng, chunk=128)
    first, second = [b[0] for b in stream], [b[0] for b in stream]
    again = [b[0] for b in ChunkedBatches(cols, DTYPES, 32, np.random.default_rng(1), chunk=128)]
    assert not torch.equal(torch.cat(first), torch.cat(second))
    assert torch.equal(torch.cat(first), torch.cat(again))


def test_data_loader_gives_the_same_batches():
    cols = _columns()
    direct = list(ChunkedBatches(cols, DTYPES, 64, np.random.default_rng(2), chunk=256))
    loaded = list(DataLoader(ChunkedBatches(cols, DTYPES, 64, np.random.default_rng(2), chunk=256), batch_size=None))
    assert len(direct) == len(loaded) and all(torch.equal(a[0], b[0]) for a, b in zip(direct, loaded))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_each_global_batch(world):
    cols = _columns(1001)
    one = list(ChunkedBatches(cols, DTYPES, 64, np.random.default_rng(3), chunk=256))
    parts = [list(ChunkedBatches(cols, DTYPES, 64, np.random.default_rng(3), chunk=256, rank=r, world_size=world))
             for r in range(world)]
    assert all(len(p) == len(one) for p in parts)  # the same number of steps on every rank
    for step, batch in enumerate(one):
        pieces = [p[step][0] for p in parts]
        assert torch.equal(torch.cat(pieces), batch[0])
        assert [len(x) for x in pieces] == [len(x) for x in np.array_split(np.zeros(len(batch[0])), world)]


def test_reads_memory_maps(tmp_path):
    cols = _columns()
    maps = {}
    for name, a in cols.items():
        np.save(tmp_path / f"{name}.npy", a)
        maps[name] = np.load(tmp_path / f"{name}.npy", mmap_mode="r")
    got = torch.cat([b[1] for b in ChunkedBatches(maps, DTYPES, 64, np.random.default_rng(4), chunk=256)])
    want = torch.cat([b[1] for b in ChunkedBatches(cols, DTYPES, 64, np.random.default_rng(4), chunk=256)])
    assert torch.equal(got, want)


@pytest.mark.parametrize("kwargs, match", [
    (dict(columns={}), "columns"),
    (dict(columns={"user": np.zeros(3), "item": np.zeros(4), "click": np.zeros(3)}), "one length"),
    (dict(dtypes={"user": torch.int64}), "dtypes"),
    (dict(batch_size=0), "batch_size"), (dict(chunk=-1), "chunk"), (dict(rng=np.random.RandomState(0)), "rng"),
    (dict(rank=0), "both"), (dict(rank=2, world_size=2), "rank"), (dict(batch_size=1, rank=0, world_size=2), "batch_size"),
])
def test_bad_arguments_are_named(kwargs, match):
    args = dict(columns=_columns(10), dtypes=DTYPES, batch_size=4, rng=np.random.default_rng(0)) | kwargs
    with pytest.raises(ValueError, match=match):
        ChunkedBatches(args.pop("columns"), args.pop("dtypes"), args.pop("batch_size"), args.pop("rng"), **args)


def test_stream_epoch_benchmark_runs_at_one_and_two_ranks(tmp_path):
    """``python -m benchmarks.stream_epoch``: a few steps at 1 and 2 gloo ranks, its JSON records."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    subprocess.run([sys.executable, "-m", "simulate", "ctcvr", "--exposures", "20000", "--out", str(tmp_path / "log")],
                   check=True, capture_output=True, env=env, cwd=repo, timeout=120)
    out = subprocess.run([sys.executable, "-m", "benchmarks.stream_epoch", "--log", str(tmp_path / "log"),
                          "--ranks", "1,2", "--batch-size", "512", "--max-steps", "3", "--json",
                          str(tmp_path / "bench.json")], capture_output=True, text=True, env=env, cwd=repo, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    records = json.loads((tmp_path / "bench.json").read_text())
    assert [r["world"] for r in records] == [1, 2]
    for r in records:  # the same global batches at any rank count
        assert r["steps"] == 3 and r["exposures"] == 3 * 512 and len(r["peak_rss_mb"]) == r["world"]
        assert r["exposures_per_second"] > 0 and all(m > 0 for m in r["peak_rss_mb"])
    assert "throughput ratio to 1 rank(s): 2 ranks" in out.stdout
