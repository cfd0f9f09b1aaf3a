"""Optional side features of a data folder: which files hold them and reading them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cvrdata.formats import is_present, read_features, read_names


@dataclass(frozen=True)
class FeatureFiles:
    """Where a folder keeps its optional side features, as paths relative to the folder.

    ``user`` / ``item``: one whitespace-separated row of numbers per user / item (line ``k``
    for id ``k - 1``). ``user_names`` / ``item_names``: one column name per line.
    """

    user: str
    item: str
    user_names: str
    item_names: str


# The split format's optional files (see cvrdata.load_split).
GENERIC = FeatureFiles("user_features.txt", "item_features.txt",
                       "user_feature_names.txt", "item_feature_names.txt")


def read_side_features(folder: Path, files: FeatureFiles, n_users: int, n_items: int,
                       shape_origin: str) -> dict[str, object]:
    """The :class:`~cvrdata.CVRData` keyword arguments for the feature files ``folder`` holds.

    Each side is optional: a missing values file leaves ``{side}_features`` out (``None``).
    A names file without its values file, and a folder in place of either file, are errors.
    ``shape_origin`` says where ``n_users`` / ``n_items`` came from, for the row-count error.
    """
    out: dict[str, object] = {}
    for side, n_rows in (("user", n_users), ("item", n_items)):
        values, names = folder / getattr(files, side), folder / getattr(files, f"{side}_names")
        has_names = is_present(names, f"one {side} feature name per line")
        if not is_present(values, f"one row of numbers per {side}"):
            if has_names:
                raise ValueError(f"{names} names {side} features but {values.name} is missing in "
                                 f"{values.parent}; add it or remove {names.name}")
            continue
        table = read_features(values, n_rows, side, shape_origin)
        out[f"{side}_features"] = table
        if has_names:
            out[f"{side}_feature_names"] = read_names(names, table.shape[1], values)
    return out
