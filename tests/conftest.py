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
