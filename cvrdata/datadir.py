"""Where the built-in data sets live: ``--data-dir`` / ``data_dir``, else ``$CVR_DATA_DIR``."""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "CVR_DATA_DIR"
# Appended to errors about missing data, so that each one says how to point at the data.
WHERE = (f"pass --data-dir or set the environment variable {ENV_VAR} to the folder "
         "holding coat/, yahoo-r3/ and kuairec/")


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Return ``data_dir`` if given, else ``$CVR_DATA_DIR``, checked to be an existing folder."""
    origin = "--data-dir"
    if data_dir is None:
        data_dir = os.environ.get(ENV_VAR) or None
        origin = ENV_VAR
    if data_dir is None:
        raise ValueError(f"no data directory given: {WHERE}")
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise ValueError(f"data directory {path} (from {origin}) does not exist or is not a folder; {WHERE}")
    return path
