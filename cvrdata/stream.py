"""Mini-batches streamed from memory-mapped logs, chunk by chunk, through ``torch.utils.data``.

A click log of 10^8-10^9 exposures (``python -m simulate ctcvr`` writes one as ``.npy`` memory
maps) does not fit a training process's memory, and need not: :class:`ChunkedBatches` is an
``IterableDataset`` that reads :data:`CHUNK` rows at a time from aligned columns (any arrays
indexable by slices: memory maps, or in-memory arrays for tests), shuffles the rows of a chunk and
cuts it into mini-batches.  Memory is a chunk of every column, whatever the log's length.

**Order.**  One epoch visits the chunks in a random order and each chunk's rows in a random order,
both drawn from one ``numpy.random.Generator`` in sequence: the chunk order, then a row permutation
per chunk as it is reached.  The generator is the caller's and carries over between epochs, so a
run is deterministic by its seed.  A chunk holds a multiple of the batch size, so every batch but
the last of the last chunk is full.

**Ranks.**  With ``world_size`` W > 1 (data-parallel training under ``torchrun``), every rank draws
the same permutations from an identically seeded generator, and rank r takes its part of each
*global* batch (``numpy.array_split`` of the batch's rows into W parts: sizes differ by at most one
row).  So the W ranks see exactly the global batches of one process, and the same number of steps,
which DDP requires.  Every rank reads each chunk whole (a chunk is small) and keeps its rows.
"""
from __future__ import annotations

from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset

#: Rows read from the memory maps at a time (rounded down to a multiple of the batch size).
CHUNK = 1 << 16


class ChunkedBatches(IterableDataset):
    """Mini-batches of aligned ``columns``, each a tuple of tensors in ``columns``' order.

    ``columns`` maps names to 1-D arrays of one length (e.g. ``{"user": log.user, ...}``) and
    ``dtypes`` each name to the tensor dtype it is converted to.  ``batch_size`` is the global
    batch (split over the ranks); ``rng`` draws the order (module docstring).  ``rank`` /
    ``world_size`` default to the initialised ``torch.distributed`` process group, else 0 / 1.
    Iterate it directly or through ``torch.utils.data.DataLoader(stream, batch_size=None)``
    (single-process loading: the generator is the caller's).
    """

    def __init__(self, columns: Mapping[str, np.ndarray], dtypes: Mapping[str, torch.dtype], batch_size: int,
                 rng: np.random.Generator, *, chunk: int = CHUNK, rank: Optional[int] = None,
                 world_size: Optional[int] = None) -> None:
        super().__init__()
        if not columns:
            raise ValueError("`columns` is empty; give the log's aligned arrays by name")
        lengths = {name: len(a) for name, a in columns.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"`columns` must have one length; got {lengths}")
        if set(dtypes) != set(columns):
            raise ValueError(f"`dtypes` must name exactly the columns {sorted(columns)}; got {sorted(dtypes)}")
        for name, value in (("batch_size", batch_size), ("chunk", chunk)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {value!r}")
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"`rng` must be a numpy.random.Generator; got {type(rng).__name__}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both `rank` and `world_size`, or neither (then torch.distributed's are used)")
        if rank is None:
            dist = torch.distributed
            rank, world_size = ((dist.get_rank(), dist.get_world_size())
                                if dist.is_available() and dist.is_initialized() else (0, 1))
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1 \
                or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size; got rank {rank!r}, world_size {world_size!r}")
        if batch_size < world_size:
            raise ValueError(f"`batch_size` ({batch_size}) is the global batch, split over {world_size} ranks: "
                             "give at least one row per rank")
        self.names: Sequence[str] = tuple(columns)
        self.columns, self.dtypes = dict(columns), dict(dtypes)
        self.n = next(iter(lengths.values()))
        self.batch_size, self.rng, self.rank, self.world_size = int(batch_size), rng, rank, world_size
        self.chunk = max(self.batch_size, int(chunk) // self.batch_size * self.batch_size)

    def __len__(self) -> int:
        """Steps per epoch (the same on every rank)."""
        full, tail = divmod(self.n, self.chunk)
        return full * (self.chunk // self.batch_size) + -(-tail // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for start in self.rng.permutation(np.arange(0, self.n, self.chunk)):
            rows = slice(int(start), min(int(start) + self.chunk, self.n))  # np.array: a writable copy of the chunk
            perm = torch.from_numpy(self.rng.permutation(rows.stop - rows.start))
            data = [torch.from_numpy(np.array(self.columns[c][rows])).to(self.dtypes[c])[perm] for c in self.names]
            for b in range(0, len(perm), self.batch_size):
                size = min(self.batch_size, len(perm) - b)
                if self.world_size == 1:
                    lo, hi = b, b + size
                else:  # this rank's part of the global batch, as numpy.array_split cuts it
                    q, extra = divmod(size, self.world_size)
                    lo = b + self.rank * q + min(self.rank, extra)
                    hi = lo + q + (self.rank < extra)
                yield tuple(t[lo:hi] for t in data)
