"""Sharded embedding tables (estimators.training.sharded, TorchRec): skipped where TorchRec is absent.

Install the matched versions with ``pip install --no-deps -r requirements-torchrec.txt``.  The
two-process tests run gloo on CPU and compare a sharded model with the dense
:class:`~estimators.training.models.MF` reference on the concatenated batch.
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchrec")
pytest.importorskip("fbgemm_gpu")

from estimators.training import MF  # noqa: E402
from estimators.training.sharded import INIT_BLOCK_ROWS, ShardedMF, shard  # noqa: E402

N_USERS, N_ITEMS, DIM, BATCH, LR = 23, 11, 4, 16, 0.5


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, N_USERS, (BATCH,), generator=g), torch.randint(0, N_ITEMS, (BATCH,), generator=g),
            torch.randint(0, 2, (BATCH,), generator=g).to(torch.float32))


def _dense_reference(tables, users, items, y, optimizer: str, tasks):
    """One step of the dense MFs on the whole batch, loss = mean BCE summed over tasks."""
    mfs = []
    for k in range(len(tasks or ("",))):
        mf = MF(N_USERS, N_ITEMS, DIM)
        with torch.no_grad():
            mf.user.weight.copy_(tables[2 * k])
            mf.item.weight.copy_(tables[2 * k + 1])
        mfs.append(mf)
    params = [p for mf in mfs for p in mf.parameters()]
    opt = torch.optim.SGD(params, lr=LR) if optimizer == "sgd" else torch.optim.Adagrad(params, lr=LR)
    loss = sum(F.binary_cross_entropy_with_logits(gather(mf, users, items), y, reduction="sum") for mf in mfs)
    (loss / BATCH).backward()
    opt.step()
    return [t.detach() for mf in mfs for t in (mf.user.weight, mf.item.weight)]


def gather(mf, users, items):
    return (mf.user.weight[users] * mf.item.weight[items]).sum(-1)


def _worker(rank: int, world: int, init: str, out: str, optimizer: str, tasks, scale: bool) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = shard(ShardedMF(N_USERS, N_ITEMS, DIM, tasks, seed=3, device="meta"), optimizer=optimizer, lr=LR)
        users, items, y = _batch()
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        logits = model(users[part], items[part])
        logits = [logits] if tasks is None else [logits[t] for t in tasks]
        # This rank's share of the global-batch mean loss, times the world size: TorchRec divides
        # the tables' gradients by the world size, as DDP averages dense ones.
        loss = sum(F.binary_cross_entropy_with_logits(z, y[part], reduction="sum") for z in logits) / BATCH
        (loss * world if scale else loss).backward()
        shards = {}
        for key, value in model.state_dict().items():
            if key.endswith(".weight") and hasattr(value, "local_shards"):
                shards[key] = [(tuple(s.metadata.shard_offsets), s.tensor.detach().clone())
                               for s in value.local_shards()]
        torch.save({"logits": [z.detach() for z in logits], "shards": shards}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        from reproduce.distributed import finish
        finish()  # the sharded model collected before its process group


def _run(optimizer: str = "sgd", tasks=None, scale: bool = True, world: int = 2):
    out = tempfile.mkdtemp()
    init = "file://" + os.path.join(out, "rendezvous")
    torch.multiprocessing.spawn(_worker, args=(world, init, out, optimizer, tasks, scale), nprocs=world)
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world)]


def _assemble(results, model: ShardedMF):
    """The whole tables from every rank's shards, and how many ranks held each table's rows."""
    tables = [torch.full((n, DIM), float("nan")) for n in
              [r for _ in (model.tasks or ("",)) for r in (N_USERS, N_ITEMS)]]
    holders = [set() for _ in tables]
    for rank, res in enumerate(results):
        for key, shards in res["shards"].items():
            k = model.feature_names.index(key.rsplit(".", 2)[-2])
            for (row, col), t in shards:
                if t.numel():
                    tables[k][row:row + t.shape[0], col:col + t.shape[1]] = t
                    holders[k].add(rank)
    return tables, holders


def test_unsharded_is_mf_with_seeded_tables():
    model = ShardedMF(N_USERS, N_ITEMS, DIM, seed=3)
    users, items, _ = _batch()
    ref = model.reference_tables()
    assert torch.allclose(model(users, items), (ref[0][users] * ref[1][items]).sum(-1), atol=1e-6)
    assert torch.equal(ShardedMF(N_USERS, N_ITEMS, DIM, seed=3).reference_tables()[0], ref[0])
    assert not torch.equal(ShardedMF(N_USERS, N_ITEMS, DIM, seed=4).reference_tables()[0], ref[0])


def test_initialisation_does_not_depend_on_the_row_range():
    """A shard filled from an offset holds the rows of the whole table at that offset."""
    from estimators.training.sharded import _fill_rows

    whole = torch.empty(2 * INIT_BLOCK_ROWS + 5, 3)
    _fill_rows(whole, 0, 0, seed=7, table=1)
    part = torch.empty(INIT_BLOCK_ROWS + 3, 2)
    _fill_rows(part, INIT_BLOCK_ROWS - 1, 1, seed=7, table=1)
    assert torch.equal(part, whole[INIT_BLOCK_ROWS - 1:2 * INIT_BLOCK_ROWS + 2, 1:3])


def test_multitask_tables_are_separate():
    model = ShardedMF(N_USERS, N_ITEMS, DIM, ("ctr", "cvr"), seed=3)
    users, items, _ = _batch()
    out = model(users, items)
    ref = model.reference_tables()
    assert set(out) == {"ctr", "cvr"} and len(ref) == 4
    assert torch.allclose(out["cvr"], (ref[2][users] * ref[3][items]).sum(-1), atol=1e-6)
    assert not torch.allclose(out["ctr"], out["cvr"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_users=0), "n_users"), (dict(dim=2.5), "dim"), (dict(tasks=("ctr", "ctr")), "tasks"),
])
def test_bad_model_arguments(kwargs, match):
    args = dict(n_users=N_USERS, n_items=N_ITEMS, dim=DIM, tasks=None) | kwargs
    with pytest.raises(ValueError, match=match):
        ShardedMF(**args)


def test_shard_needs_a_process_group_and_known_options():
    model = ShardedMF(N_USERS, N_ITEMS, DIM)
    with pytest.raises(ValueError, match="optimizer"):
        shard(model, optimizer="lbfgs")
    with pytest.raises(ValueError, match="sharding"):
        shard(model, sharding="diagonal")
    with pytest.raises(ValueError, match="init_process_group"):
        shard(model)
    with pytest.raises(ValueError, match="users"):
        model(torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("optimizer, tasks", [("sgd", None), ("rowwise_adagrad", None), ("sgd", ("ctr", "cvr"))])
def test_two_ranks_equal_one_process_on_the_whole_batch(optimizer, tasks):
    results = _run(optimizer, tasks)
    model = ShardedMF(N_USERS, N_ITEMS, DIM, tasks, seed=3)
    initial = model.reference_tables()
    users, items, y = _batch()
    half = BATCH // 2
    for rank, res in enumerate(results):  # forward: the dense logits of each rank's half
        part = slice(rank * half, (rank + 1) * half)
        for k, z in enumerate(res["logits"]):
            assert torch.allclose(z, (initial[2 * k][users[part]] * initial[2 * k + 1][items[part]]).sum(-1),
                                  atol=1e-6)
    tables, holders = _assemble(results, model)
    assert all(len(h) == 1 for h in holders)  # table-wise: each table lives on one rank only
    assert {r for h in holders for r in h} == {0, 1}  # and both ranks hold tables
    if optimizer == "sgd":
        reference = _dense_reference(initial, users, items, y, "sgd", tasks)
        for got, want in zip(tables, reference):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # row-wise Adagrad: one accumulator per row, so compare its first step in closed form
        for k, t in enumerate(tables):
            mf_grad = _dense_grads(initial, users, items, y)[k]
            state = (mf_grad ** 2).mean(1, keepdim=True)
            want = initial[k] - LR * mf_grad / (state.sqrt() + 1e-8)
            torch.testing.assert_close(t, torch.where(state > 0, want, initial[k]), rtol=1e-5, atol=1e-5)


def _dense_grads(tables, users, items, y):
    P, Q = (t.clone().requires_grad_() for t in tables[:2])
    (F.binary_cross_entropy_with_logits((P[users] * Q[items]).sum(-1), y, reduction="sum") / BATCH).backward()
    return [P.grad, Q.grad]


def test_without_the_world_size_factor_the_update_is_halved():
    """TorchRec averages the tables' gradients over ranks: a rank that does not scale its loss
    share by the world size takes half the step (this is what the factor in the test above is for)."""
    results = _run("sgd", scale=False)
    model = ShardedMF(N_USERS, N_ITEMS, DIM, seed=3)
    initial = model.reference_tables()
    users, items, y = _batch()
    tables, _ = _assemble(results, model)
    full = _dense_reference(initial, users, items, y, "sgd", None)
    for got, want, start in zip(tables, full, initial):
        torch.testing.assert_close(got, start + (want - start) / 2, rtol=1e-6, atol=1e-6)


def test_readme_example_runs_under_torchrun(tmp_path):
    """README's "Sharded embedding tables" example, launched as written with 2 ranks."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    section = (repo / "README.md").read_text().split("## Sharded embedding tables", 1)[1].split("\n## ", 1)[0]
    script = tmp_path / "example.py"
    script.write_text(re.findall(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)[0])
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^epoch \d+: rank-0 loss (\d+\.\d+)$", out.stdout, flags=re.M)]
    assert len(losses) == 2 and losses[1] < losses[0] / 10, out.stdout
    held = re.findall(r"rank (\d) holds \{'tables.embedding_bags.item.weight': (\d+), "
                      r"'tables.embedding_bags.user.weight': (\d+)\}", out.stdout)
    assert sorted((int(i) > 0, int(u) > 0) for _, i, u in held) == [(False, True), (True, False)], out.stdout
