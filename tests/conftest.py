"""Shared pytest fixtures."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The reference data folder: ``$CVR_DATA_DIR``, else ``../shared/data`` beside the repository.

    A missing folder skips the data tests locally but fails them under CI (``CI=true``),
    where they must run.
    """
    path = Path(os.environ.get("CVR_DATA_DIR", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        message = f"data directory {path} not found; set CVR_DATA_DIR to the folder holding coat/, yahoo-r3/, kuairec/"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture
def restore_runtime():
    """Undo what ``reproduce``'s commands set process-wide (thread count, flush-to-zero), so the
    tests after a command run as before it (``pytestmark = pytest.mark.usefixtures(...)``)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def coat_one_thread(data_dir):
    """Coat's shipped config and data, loaded once per module, trained on one thread (the thread
    count restored after the module)."""
    import warnings

    import torch

    from reproduce import config as C
    from reproduce.train import setup_runtime

    threads = torch.get_num_threads()
    setup_runtime(1)
    cfg = C.load_config("coat")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Coat's pairs repeated across splits (cvrdata's DataWarning)
        data = C.DataSource("coat").load(cfg, data_dir)
    yield cfg, data
    torch.set_num_threads(threads)


@pytest.fixture
def coat_table3_rows(data_dir, tmp_path):
    """``coat_table3_rows(methods, max_epochs=1)`` runs ``table3`` on Coat for ``methods`` (one
    seed, one thread) and returns its rows by label: the cells of each Markdown row (label, ours,
    paper, ...)."""
    return lambda methods, max_epochs=1: _coat_table3_rows(data_dir, tmp_path / "out", methods, max_epochs)


def _coat_table3_rows(data_dir, out, methods, max_epochs):
    from reproduce.__main__ import main

    argv = ["table3", "--datasets", "coat", "--methods", ",".join(methods), "--seeds", "1", "--max-epochs",
            str(max_epochs), "--threads", "1", "--jobs", "1", "--data-dir", str(data_dir), "--out", str(out)]
    assert main(argv) == 0
    rows = {}
    for line in (out / "table3.md").read_text().splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.split("|")[1:-1]]
            rows.setdefault(cells[0], cells)
    return rows


# ---- Hypothesis profiles (theorem, mutation and estimator tests) -------------------------------
# "ci": deterministic (derandomize, no example database), fixed budget of 15 examples; loaded when CI=true.
# "dev": 50 examples, random seeds; the default for local runs.
# "long": 500 examples, for an occasional thorough local run.
# Select with HYPOTHESIS_PROFILE=dev|long|ci (see tests/THEOREMS.md).
from hypothesis import HealthCheck, settings  # noqa: E402

_HYPOTHESIS_COMMON = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", derandomize=True, database=None, max_examples=15, **_HYPOTHESIS_COMMON)
settings.register_profile("dev", max_examples=50, **_HYPOTHESIS_COMMON)
settings.register_profile("long", max_examples=500, **_HYPOTHESIS_COMMON)
settings.load_profile("ci" if os.environ.get("CI") == "true" else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def shipped_entries():
    """``entries(method, base="dr_jl")``: per shipped config (``reproduce/configs/*.json``, sorted), the
    tuple ``(path, entry, status, base_entry)``: ``method``'s entry and ``base``'s, both without their
    ``status``, which is returned apart."""
    import json

    from reproduce import config as C

    def entries(method: str, base: str = "dr_jl"):
        out = []
        for path in sorted(C.CONFIG_DIR.glob("*.json")):
            raw = json.loads(path.read_text())["methods"]
            entry, base_entry = dict(raw[method]), dict(raw[base])
            status = entry.pop("status")
            base_entry.pop("status")
            out.append((path, entry, status, base_entry))
        return out
    return entries
