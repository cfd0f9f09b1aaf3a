"""Data parallel (:mod:`estimators.distributed`): 2 gloo processes on CPU give, through
``DistributedDataParallel``, the loss and the gradients of ONE process on the concatenated batch,
for every registered estimator, imputation loss, entire-space objective and propensity-free
objective and for StableDR's SDR-prop (the registries are iterated, so a new entry is covered at
once), float64, rtol 1e-10; per-rank normalisers ("local", what wrapping the losses
in DDP gives without the reduction) differ for BADR; and ``torchrun`` trains one ``table3`` run on
2 ranks and writes exactly one row, with ``world_size`` 2.

The global batch: B of 13 clicked pairs (7 on rank 0, 6 on rank 1: unequal shards), U of G = 2
pairs per clicked pair (14 and 12), propensities much smaller on rank 1's shard (so per-rank
normalisers differ); the exposures D of the registry functions: 13 pairs, one batch (1-D) and
three batches (2-D), split along the pairs.  The models are tables of the logits (or errors):
DDP averages their parameters' gradients exactly as it averages a real model's.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from estimators import distributed as D
from estimators.registry import ENTIRE_SPACE, ESTIMATORS, IMPUTATION_LOSSES, PROPENSITY_FREE
from estimators.stabledr import stabledr_propensity_loss
from estimators.training.losses import imputation_loss, prediction_loss

REPO = Path(__file__).resolve().parents[1]
WORLD, B, G, K = 2, 13, 2, 3
RTOL = 1e-10


# ---- the batch and its shards ---------------------------------------------------------------------
def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(20)
    f64 = dict(dtype=torch.float64)
    n_u = G * B
    p_hat = torch.cat([torch.rand(7, generator=g, **f64) * 0.6 + 0.4, torch.rand(6, generator=g, **f64) * 0.08 + 0.02])
    o = torch.ones(K, B, **f64)
    o[:, [1, 4, 9, 11]] = 0.0  # every shard of every batch keeps a click
    return {
        "x": torch.randn(B + n_u, generator=g, **f64) * 1.5,       # prediction logits on B then U
        "xt": torch.randn(B + n_u, generator=g, **f64) * 1.5,      # imputation logits on B then U
        "r": torch.bernoulli(torch.full((B,), 0.4, **f64), generator=g),
        "p_hat": p_hat,
        "e": torch.rand(K, B, generator=g, **f64) * 2,             # errors, imputed errors, clicks of D
        "e_hat": torch.rand(K, B, generator=g, **f64) * 2,
        "o": o,
        "p_d": torch.rand(K, B, generator=g, **f64) * 0.9 + 0.05,
        # the entire-space objectives' towers on D: CTR, CVR, imputation and conversion logits, labels
        "a": torch.randn(K, B, generator=g, **f64) * 1.5,
        "b": torch.randn(K, B, generator=g, **f64) * 1.5,
        "dh": torch.rand(K, B, generator=g, **f64) * 2,
        "c": torch.randn(K, B, generator=g, **f64) * 1.5,
        "r_d": torch.bernoulli(torch.full((K, B), 0.4, **f64), generator=g),
    }


def _shard(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of rank's clicked pairs in B and of its sampled pairs in U (G per clicked pair)."""
    b = torch.arange(B).tensor_split(world)[rank]
    sizes = [G * len(s) for s in torch.arange(B).tensor_split(world)]
    u = torch.arange(G * B).split(sizes)[rank]
    return b, u


class Table(nn.Module):
    """A model whose parameters are the global batch's logits; ``forward`` gives a rank's share."""

    def __init__(self, **tables: torch.Tensor) -> None:
        super().__init__()
        self.tables = nn.ParameterDict({k: nn.Parameter(v.clone()) for k, v in tables.items()})

    def forward(self, index: dict[str, tuple]) -> dict[str, torch.Tensor]:
        return {k: self.tables[name][idx] for k, (name, idx) in index.items()}


# ---- the cases: every registry entry, step form and function ---------------------------------
def _forms(spec, imputation: bool) -> list[dict]:
    forms = [{"cross_entropy": ce} for ce in ("logits", "clamped")]
    if imputation and spec.dr_family:
        forms.append({"cross_entropy": "logits", "imputed_error": "published"})
    return forms


def cases() -> list[tuple[str, str, str, dict]]:
    """(case name, kind, registry name, options) for every entry of both registries."""
    out = []
    for name, spec in ESTIMATORS.items():
        if spec.step is not None:
            out += [(f"prediction/{name}/{f}", "prediction", name, f) for f in map(str, range(len(_forms(spec, 0))))]
        out += [(f"function/{name}/{dim}d", "estimator", name, {"dim": dim}) for dim in (1, 2)]
    for name, spec in IMPUTATION_LOSSES.items():
        out += [(f"imputation/{name}/{f}", "imputation", name, f) for f in map(str, range(len(_forms(spec, 1))))]
        out += [(f"function/imputation/{name}/{dim}d", "imputation_function", name, {"dim": dim}) for dim in (1, 2)]
    for name in ENTIRE_SPACE:
        out += [(f"entire_space/{name}/{dim}d", "entire_space", name, {"dim": dim}) for dim in (1, 2)]
    out += [(f"propensity/stabledr/{form}", "propensity", "stabledr", form) for form in ("sum", "mean")]
    out += [(f"propensity_free/{name}", "propensity_free", name, None) for name in PROPENSITY_FREE]
    return out


def _loss(kind: str, name: str, option, data: dict, tables, rank: int, world: int, reduction: str):
    """The loss of one case on rank's shard (``world`` 1: the whole batch) and the parameters'
    names it reads."""
    b, u = _shard(rank, world)
    r, p = data["r"][b], data["p_hat"][b]
    if kind in ("prediction", "imputation"):
        spec = (ESTIMATORS if kind == "prediction" else IMPUTATION_LOSSES)[name]
        form = _forms(spec, kind == "imputation")[int(option)]
        t = tables({"x_b": ("x", b), "x_u": ("x", B + u), "xt_b": ("xt", b), "xt_u": ("xt", B + u)})
        if kind == "prediction":
            return prediction_loss(name, t["x_b"], r, p, t["x_u"], t["xt_b"], t["xt_u"], reduction=reduction, **form)
        return imputation_loss(name, t["xt_b"], t["x_b"], r, p, t["xt_u"], t["x_u"], alpha=0.3, reduction=reduction,
                               **form)
    if kind == "propensity_free":  # logits x on B then U; xt: DIB's biased logits, DAMF's second hypothesis
        t = tables({"x_b": ("x", b), "x_u": ("x", B + u), "xt_b": ("xt", b), "xt_u": ("xt", B + u)})
        inputs = {"cvib": (t["x_b"], r, t["x_u"]), "dib": (t["x_b"], t["xt_b"], r),
                  "damf": (t["x_b"], r, t["x_u"], t["xt_b"], t["xt_u"])}[name]
        return PROPENSITY_FREE[name].function(*inputs, reduction=reduction)["loss"]
    if kind == "propensity":  # StableDR's SDR-prop on U: logits x, imputed errors xt, clicks every third pair
        t = tables({"z_u": ("x", B + u), "e_hat_u": ("xt", B + u)})
        o_u = (torch.arange(G * B)[u] % 3 == 0).to(torch.float64)
        return stabledr_propensity_loss(t["z_u"], o_u, t["e_hat_u"], eta=0.7, gamma=0.05, reduction=option,
                                        across=reduction)
    cols = torch.arange(B).tensor_split(world)[rank]
    rows = slice(None) if option["dim"] == 2 else 0
    if kind == "entire_space":
        t = tables({tower: (key, (rows, cols)) for tower, key in ENTIRE_SPACE_TOWERS.items()})
        return ENTIRE_SPACE[name](t, data["o"][rows, cols], data["r_d"][rows, cols], reduction=reduction)["loss"]
    t = tables({"e": ("e", (rows, cols)), "e_hat": ("e_hat", (rows, cols))})
    inputs = {"e": t["e"], "e_hat": t["e_hat"], "o": data["o"][rows, cols], "p_hat": data["p_d"][rows, cols]}
    if kind == "estimator":
        spec = ESTIMATORS[name]
        return spec.function(*(inputs[k] for k in spec.reads), reduction=reduction)
    spec = IMPUTATION_LOSSES[name]
    params = {"alpha": 0.3} if "alpha" in spec.params else {}
    return spec.function(inputs["e"], inputs["e_hat"], inputs["o"], inputs["p_hat"], **params, reduction=reduction)


#: The entire-space towers and the tables of their logits (an objective reads the towers it names).
ENTIRE_SPACE_TOWERS = {"ctr": "a", "cvr": "b", "imputation": "dh", "conversion": "c"}


def _table(kind: str, data: dict) -> Table:
    if kind in ("prediction", "imputation", "propensity", "propensity_free"):
        return Table(x=data["x"], xt=data["xt"])
    if kind == "entire_space":
        return Table(**{key: data[key] for key in ENTIRE_SPACE_TOWERS.values()})
    return Table(e=data["e"], e_hat=data["e_hat"])


def _run(kind, name, option, data, rank, world, reduction, ddp: bool):
    """(loss value, gradients of the logits' tables) on rank's shard, through DDP when ``ddp``."""
    table = _table(kind, data)
    model = nn.parallel.DistributedDataParallel(table, find_unused_parameters=True) if ddp else table
    loss = _loss(kind, name, option, data, model, rank, world, reduction)
    loss.backward()
    grads = {k: (torch.zeros_like(p) if p.grad is None else p.grad.clone()) for k, p in table.tables.items()}
    return float(loss.detach()), grads


#: The losses that divide by a batch sum (the registry's self-normalised estimators: SNIPS eq. 37,
#: BADR eq. 13, DDPO eq. 15) or hold batch sums inside their square (eq. 32 in both forms).
SELF_NORMALISED = [("prediction", n) for n, s in ESTIMATORS.items() if s.self_normalised and s.step is not None] + [
    ("imputation", "badr"), ("imputation", "badr_paper"), ("entire_space", "escm2_badr"), ("entire_space", "ddpo"),
    ("propensity", "stabledr")]
#: Each self-normalised case's option and the logits table whose gradient shows the normaliser.
_NORMALISED_AT = {"prediction": ("0", "x"), "imputation": ("0", "xt"), "entire_space": ({"dim": 1}, "b"),
                  "propensity": ("sum", "x")}

#: gloo's transport on Linux: the loopback interface (a container's hostname may resolve elsewhere).
LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo"} if sys.platform.startswith("linux") else {}


def _worker(rank: int, store: str, out: str) -> None:
    for key, value in LOOPBACK.items():
        os.environ.setdefault(key, value)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    data = _batch()
    results = {}
    for case, kind, name, option in cases():
        results[case] = _run(kind, name, option, data, rank, WORLD, "global", ddp=True)
    for kind, name in SELF_NORMALISED:
        results[f"local/{kind}/{name}"] = _run(kind, name, _NORMALISED_AT[kind][0], data, rank, WORLD, "local",
                                               ddp=True)
    results["learner"] = _learner_steps()
    results["no_click"] = _no_click_shard(data, rank, WORLD)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    from reproduce.distributed import finish
    finish()  # the DDP wrappers collected before their process group


#: The self-normalised registry functions (they need a click in every batch).
_NEEDS_CLICK = [("estimator", n) for n, sp in ESTIMATORS.items() if sp.self_normalised] + [
    ("imputation", n) for n in ("badr", "badr_paper")]


def _no_click_shard(data: dict, rank: int, world: int) -> dict:
    """The self-normalised functions on a 1-D batch whose clicks all lie in rank 0's part (rank 1's
    part has none): each value; and, on a batch without any click, the error each rank raises."""
    cols = torch.arange(B).tensor_split(world)[rank]
    o = data["o"][0].clone()
    o[torch.arange(B).tensor_split(2)[1]] = 0.0  # the second half of the batch: no click
    out = {}
    for kind, name in _NEEDS_CLICK:
        args = (data["e"][0, cols], data["e_hat"][0, cols])
        fn = ESTIMATORS[name].function if kind == "estimator" else IMPUTATION_LOSSES[name].function
        reads = ESTIMATORS[name].reads if kind == "estimator" else ("e", "e_hat", "o", "p_hat")
        inputs = {"e": args[0], "e_hat": args[1], "o": o[cols], "p_hat": data["p_d"][0, cols]}
        out[(kind, name)] = float(fn(*(inputs[k] for k in reads), reduction="global"))
        try:
            fn(*(({**inputs, "o": torch.zeros_like(o[cols])})[k] for k in reads), reduction="global")
            out[(kind, name, "none")] = "no error"
        except ValueError as exc:
            out[(kind, name, "none")] = str(exc)
    return out


def _learner_steps() -> dict:
    """Two JointLearners built alike on this rank: their first U draws, and two BADR steps of the
    first on this rank's shards of two batches of 12 clicked pairs."""
    from estimators.training import JointConfig, JointLearner

    g = torch.Generator().manual_seed(5)
    p_hat = torch.rand(8, 9, generator=g) * 0.9 + 0.1
    users, items = torch.randint(8, (24,), generator=g), torch.randint(9, (24,), generator=g)
    r = torch.bernoulli(torch.full((24,), 0.5), generator=g)
    draws, learners = [], []
    for _ in range(2):
        torch.manual_seed(0)
        learner = JointLearner(p_hat, JointConfig("badr", "badr", dim=4, G=2),
                               generator=torch.Generator().manual_seed(3))
        draws.append(learner.sample_pairs(6))
        learners.append(learner)
    learner = learners[0]
    steps = [learner.step(users[idx], items[idx], r[idx]) for idx in map(learner.shard, torch.arange(24).split(12))]
    return {"draws": draws, "steps": steps, "fast": learner.fast, "shard": learner.shard(torch.arange(12)),
            "params": [p.detach().clone() for p in learner.prediction.parameters()]}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """Every case computed by 2 gloo processes, each rank's results."""
    tmp = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _single(kind, name, option) -> tuple[float, dict]:
    """One process on the concatenated batch."""
    return _run(kind, name, option, _batch(), 0, 1, "global", ddp=False)


@pytest.mark.parametrize("case,kind,name,option", cases(), ids=[c[0] for c in cases()])
def test_two_ranks_equal_one_process(two_ranks, case, kind, name, option):
    """The mean of the ranks' shares is the global loss; DDP's averaged gradient is the global one."""
    value, grads = _single(kind, name, option)
    shares = [ranks[case][0] for ranks in two_ranks]
    assert np.mean(shares) == pytest.approx(value, rel=RTOL, abs=1e-300)
    for k, g in grads.items():
        assert torch.equal(two_ranks[0][case][1][k], two_ranks[1][case][1][k])  # DDP keeps the ranks alike
        torch.testing.assert_close(two_ranks[0][case][1][k], g, rtol=RTOL, atol=1e-14 * float(g.abs().max()) + 1e-300)


@pytest.mark.parametrize("kind,name", SELF_NORMALISED, ids=[f"{k}/{n}" for k, n in SELF_NORMALISED])
def test_per_rank_normaliser_differs(two_ranks, kind, name):
    """Per-rank normalisers (BADR eq. 13 and eq. 32, SNIPS eq. 37 on each shard, DDP's mean of the
    gradients: what wrapping the losses in DDP gives) are the estimator of a smaller batch: the
    gradient and the loss differ from the global batch's."""
    option, g_key = _NORMALISED_AT[kind]
    value, grads = _single(kind, name, option)
    local = two_ranks[0][f"local/{kind}/{name}"]
    gap = float((local[1][g_key] - grads[g_key]).abs().max() / grads[g_key].abs().max())
    assert gap > 0.05, gap
    # far above float64 rounding (ESCM2-BADR's loss is mostly its CTR and CTCVR means, which agree)
    assert abs(np.mean([r[f"local/{kind}/{name}"][0] for r in two_ranks]) - value) > 1e-6 * abs(value)


def test_every_entry_is_covered():
    names = {c[2] for c in cases() if c[1] == "prediction"} | {c[2] for c in cases() if c[1] == "estimator"}
    assert names == set(ESTIMATORS)
    assert {c[2] for c in cases() if c[1] == "imputation"} == set(IMPUTATION_LOSSES)
    assert {c[2] for c in cases() if c[1] == "entire_space"} == set(ENTIRE_SPACE)
    assert {c[2] for c in cases() if c[1] == "propensity_free"} == set(PROPENSITY_FREE)


def test_single_process_is_inactive_and_untouched():
    """Outside torch.distributed a reduction passes its arguments through: the code path of one
    process is unchanged."""
    red = D.resolve("global")
    assert red is D.SINGLE and not red.active and D.resolve("local") is D.LOCAL
    t = torch.ones(3)
    assert red.total(t) is t and red.share(t) is t and red.total(t, 5) == (t, 5)


def test_bad_reduction_is_refused():
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        D.resolve("mean")
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        prediction_loss("badr", torch.zeros(2), torch.ones(2), torch.ones(2), torch.zeros(4), torch.zeros(2),
                        torch.zeros(4), reduction="sum")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toy_folder(path: Path) -> Path:
    """A split-format data set of 200 x 200 pairs, 800 clicked training pairs."""
    rng = np.random.default_rng(0)
    flat = rng.choice(200 * 200, size=1200, replace=False)
    u, i = flat // 200, flat % 200
    y = (((u % 3 + i % 2) > 1) ^ (rng.random(1200) < 0.2)).astype(int)
    path.mkdir()
    for split, rows in (("train", slice(0, 800)), ("val", slice(800, 960)), ("test", slice(960, 1200))):
        np.savetxt(path / f"x_{split}_3_20.txt", np.stack([u[rows], i[rows]], 1), fmt="%d")
        np.savetxt(path / f"y_{split}_3_20.txt", y[rows], fmt="%d")
    (path / "meta.json").write_text('{"n_users": 200, "n_items": 200, "threshold": 3, "val_pct": 20, "name": "toy"}')
    return path


def test_torchrun_writes_one_row_with_its_world_size(tmp_path):
    """``torchrun --nproc-per-node 2 -m reproduce table3``: one BADR run trained by both ranks, one
    row (rank 0's) recording world_size 2, and a signature other than the single-process run's."""
    from reproduce.table import read_results

    data, out = _toy_folder(tmp_path / "toy"), tmp_path / "out"
    argv = ["--datasets", str(data), "--methods", "badr", "--seeds", "1", "--max-epochs", "1", "--threads", "1",
            "--batch-size", "64", "--out", str(out)]
    env = {**LOOPBACK, **os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
              str(_free_port()), "-m", "reproduce", "table3"]
    done = subprocess.run(launch + argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_results(out / "results.csv")
    assert len(rows) == 1 and rows[0]["world_size"] == 2 and rows[0]["method"] == "badr", rows
    assert rows[0]["status"] in ("ok", "chance")
    history = (out / "history.csv").read_text().splitlines()
    assert sum(",fit," in line for line in history) == rows[0]["epochs"]  # one rank's epochs, once


def test_a_rank_without_clicks_in_a_self_normalised_batch(two_ranks):
    """A rank whose part of the batch has no click goes on (the click check is the global batch's):
    the ranks' shares average to one process's value on the whole batch; a batch without any click
    raises the same ValueError on every rank (no rank waits for another)."""
    data = _batch()
    o = data["o"][0].clone()
    o[torch.arange(B).tensor_split(2)[1]] = 0.0
    for kind, name in _NEEDS_CLICK:
        fn = ESTIMATORS[name].function if kind == "estimator" else IMPUTATION_LOSSES[name].function
        reads = ESTIMATORS[name].reads if kind == "estimator" else ("e", "e_hat", "o", "p_hat")
        inputs = {"e": data["e"][0], "e_hat": data["e_hat"][0], "o": o, "p_hat": data["p_d"][0]}
        want = float(fn(*(inputs[k] for k in reads)))
        shares = [ranks["no_click"][(kind, name)] for ranks in two_ranks]
        assert np.mean(shares) == pytest.approx(want, rel=RTOL), (kind, name)
        errors = {ranks["no_click"][(kind, name, "none")] for ranks in two_ranks}
        assert len(errors) == 1 and "no clicked pair" in errors.pop(), (kind, name)


def test_joint_learner_on_two_ranks(two_ranks):
    """Under torch.distributed the learner trains on DDP (not the fast path), each rank takes its
    half of a batch and draws its own U, reproducibly by seed and rank; the reported losses and
    monitor are the global batch's (the same on both ranks) and DDP keeps the parameters alike."""
    a, b = two_ranks[0]["learner"], two_ranks[1]["learner"]
    assert not a["fast"] and not b["fast"]
    assert a["shard"].tolist() == list(range(6)) and b["shard"].tolist() == list(range(6, 12))
    for ranks in (a, b):  # the same seed and rank: the same draws
        assert all(torch.equal(x, y) for x, y in zip(*ranks["draws"]))
    assert not all(torch.equal(x, y) for x, y in zip(a["draws"][0], b["draws"][0]))  # other ranks: others
    assert a["steps"] == b["steps"] and set(a["steps"][0]) == {"prediction_loss", "imputation_loss", "monitor"}
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))


def test_torchrun_escm2_equals_one_process(tmp_path):
    """``torchrun --nproc-per-node 2 -m reproduce escm2``: every run trained by both ranks on their parts
    of each global batch, one row each (world_size 2, another signature), and the same training as
    one process up to float32 rounding: per-epoch losses, validation choices and Table VI's estimates."""
    import csv

    argv = ["escm2", "--exposures", "20000", "--methods", "escm2_badr,naive", "--seeds", "1", "--no-sweeps",
            "--max-epochs", "2", "--threads", "1"]
    env = {**LOOPBACK, **os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "reproduce", *argv, "--jobs", "1", "--out", str(tmp_path / "one")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(_free_port()), "-m", "reproduce", *argv, "--out", str(tmp_path / "two")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]

    def read(name: str, world: str) -> list[dict]:
        with open(tmp_path / world / "escm2" / name) as f:
            return list(csv.DictReader(f))

    rows = {w: {r["method"]: r for r in read("results.csv", w)} for w in ("one", "two")}
    assert set(rows["one"]) == set(rows["two"]) == {"escm2_badr", "naive", "esmm", "escm2_ips", "escm2_dr"}
    for method, r1 in rows["one"].items():
        r2 = rows["two"][method]
        assert (r1["world_size"], r2["world_size"]) == ("1", "2") and r1["signature"] != r2["signature"]
        assert r1["best_epoch"] == r2["best_epoch"] and r1["status"] == r2["status"] == "ok"
        for key in ("val_score", "ieb_test_estimate", "ctr_auc"):
            assert float(r2[key]) == pytest.approx(float(r1[key]), rel=1e-4), (method, key)
    hist = {w: {(r["method"], r["epoch"]): r for r in read("history.csv", w)} for w in ("one", "two")}
    assert set(hist["one"]) == set(hist["two"])
    for key, h1 in hist["one"].items():
        for col in ("train_loss", "train_ctr", "train_cvr"):
            assert float(hist["two"][key][col]) == pytest.approx(float(h1[col]), rel=1e-4), (key, col)


def test_torchrun_entire_space_rows_equal_one_process(tmp_path):
    """``torchrun ... table3`` with entire-space rows (ESCM2-BADR, DDPO): both ranks walk the same
    permutation of D and train their halves of every step, one row each with world_size 2, and the
    same training as one process up to float32 rounding (epoch losses, epochs, test AUC)."""
    from reproduce.table import read_results

    data = _toy_folder(tmp_path / "toy")
    argv = ["--datasets", str(data), "--methods", "escm2_badr,ddpo", "--seeds", "1", "--max-epochs", "3",
            "--threads", "1"]
    env = {**LOOPBACK, **os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "reproduce", "table3", *argv, "--jobs", "1", "--out",
                          str(tmp_path / "one")], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(_free_port()), "-m", "reproduce", "table3", *argv, "--out", str(tmp_path / "two")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    rows = {w: {r["method"]: r for r in read_results(tmp_path / w / "results.csv")} for w in ("one", "two")}
    assert set(rows["one"]) == set(rows["two"]) == {"escm2_badr", "ddpo"}
    for method, r1 in rows["one"].items():
        r2 = rows["two"][method]
        assert r2["world_size"] == 2 and r1["epochs"] == r2["epochs"]
        assert r2["auc"] == pytest.approx(r1["auc"], abs=1e-4), method
    hist = {}
    for w in ("one", "two"):
        lines = (tmp_path / w / "history.csv").read_text().splitlines()
        header = lines[0].split(",")
        hist[w] = [dict(zip(header, line.split(","))) for line in lines[1:]]
    assert len(hist["one"]) == len(hist["two"]) > 0
    for h1, h2 in zip(hist["one"], hist["two"]):
        assert float(h2["monitor"]) == pytest.approx(float(h1["monitor"]), rel=1e-4)


def test_torchrun_trains_own_schedules_alike_on_every_rank(tmp_path):
    """DCE-TDR (calibrators fitted on every rank), DR-MSE-GPL (propensity rounds on every rank),
    StableDR (its propensity model in DDP on SDR-prop's global sums) and the propensity-free rows
    (their objective in DDP) under ``torchrun``: one row each with world_size 2; the run checks that the ranks' models (StableDR's propensity model too) and
    propensity tables agree after training (``reproduce.distributed.check_ranks_agree``)."""
    from reproduce.table import read_results

    data, out = _toy_folder(tmp_path / "toy"), tmp_path / "out"
    argv = ["--datasets", str(data), "--methods", "dce_tdr,dr_mse_gpl,stabledr,cvib,dib,damf", "--seeds", "1",
            "--max-epochs", "2",
            "--threads", "1", "--batch-size", "64", "--out", str(out)]
    env = {**LOOPBACK, **os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(_free_port()), "-m", "reproduce", "table3", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["method"]: r for r in read_results(out / "results.csv")}
    assert set(rows) == {"dce_tdr", "dr_mse_gpl", "stabledr", "cvib", "dib", "damf"}
    assert all(r["world_size"] == 2 for r in rows.values())
    assert all(r["status"] in ("ok", "chance") for r in rows.values())


def test_torchrun_tune_trains_each_trial_on_every_rank(tmp_path):
    """``torchrun ... tune``: rank 0 runs the Optuna study and broadcasts each trial; both ranks train
    it; the log holds one row per run and the config is written once, from rank 0."""
    import json

    from reproduce.table import read_results

    data, out = _toy_folder(tmp_path / "toy"), tmp_path / "out"
    config = json.loads((REPO / "reproduce" / "configs" / "default.json").read_text())
    config["batch_size"] = 64  # the toy data's 800 clicked pairs
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "toy.json").write_text(json.dumps(config))
    argv = ["tune", "badr", str(data), "--trials", "3", "--max-epochs", "1", "--threads", "1", "--out", str(out),
            "--config-dir", str(tmp_path / "configs"), "--force"]
    env = {**LOOPBACK, **os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(_free_port()), "-m", "reproduce", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_results(out / "tune" / "toy-badr.csv", required=("dataset", "method", "seed", "signature"))
    assert len(rows) == 3 and len({r["signature"] for r in rows}) == 3  # three trials, each trained once
    entry = json.loads((out / "configs" / "toy.json").read_text())["methods"]["badr"]
    assert entry["status"].startswith("tuned: 3 Optuna TPE trials")
    assert done.stdout.count("best validation AUC") == 1  # rank 0 reports
