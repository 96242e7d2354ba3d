"""Variable batch per key (TorchRec's VBE): the host-side bookkeeping a KeyedJaggedTensor keeps.

A VBE KJT gives each key its own number of samples, ``stride_per_key()[k]``, the sum over ranks
of ``stride_per_key_per_rank()[k]``; its lengths hold those samples key-major (and rank-major
within a key). ``inverse_indices`` maps every sample of the full batch to its row of a key:
``(names, table)`` with ``table[i, b]`` the row of key ``names[i]`` that sample ``b`` reads.

Everything here reads Python lists or host tensors only; nothing waits on a device.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from shardrec.sparse import _validation as check

InverseIndices = tuple[list[str], torch.Tensor]
StridePerKeyPerRank = Sequence[Sequence[int]] | torch.Tensor


def as_stride_per_key_per_rank(
    owner: str, given: StridePerKeyPerRank, num_keys: int
) -> list[list[int]]:
    """Lists of ints, one per key, from TorchRec's list of lists or 2-D integer tensor (the number
    of rows is checked later: see :func:`row_count_error`)."""
    if isinstance(given, torch.Tensor):
        if given.dtype not in check.INDEX_DTYPES and given.numel():
            raise check.IndexDtypeError(
                f"{owner}: stride_per_key_per_rank must be of integer type, got {given.dtype}"
            )
        if given.numel() == 0:
            rows: list[list[int]] = [[] for _ in range(given.shape[0])] if given.dim() else []
        elif given.dim() != 2:
            raise ValueError(
                f"{owner}: stride_per_key_per_rank must be 2-D (keys x ranks), "
                f"got shape {tuple(given.shape)}"
            )
        else:
            rows = given.tolist()
    else:
        rows = [list(per_rank) for per_rank in given]
    ranks = {len(r) for r in rows}
    if len(ranks) > 1:
        raise ValueError(
            f"{owner}: stride_per_key_per_rank rows have different numbers of ranks {sorted(ranks)}"
        )
    for key_index, per_rank in enumerate(rows):
        for rank, size in enumerate(per_rank):
            if not check.is_int(size) or size < 0:
                raise ValueError(
                    f"{owner}: stride_per_key_per_rank[{key_index}][{rank}] is {size!r}; "
                    "batch sizes are non-negative ints"
                )
    return rows


def row_count_error(owner: str, rows: int, num_keys: int) -> ValueError:
    """TorchRec accepts a stride_per_key_per_rank whose rows do not match the keys (its batch size
    can come from the inverse indices alone); the mismatch is refused where a key's stride is
    needed."""
    return ValueError(
        f"{owner}: stride_per_key_per_rank has {rows} rows for {num_keys} keys; "
        "give one list of per-rank batch sizes per key"
    )


def check_inverse_indices(owner: str, inverse: object) -> InverseIndices:
    """A (names, 2-D integer tensor) pair with one row per name; returns it with a list of names."""
    if not isinstance(inverse, tuple) or len(inverse) != 2:
        raise TypeError(f"{owner}: inverse_indices must be a (keys, tensor) pair, got {inverse!r}")
    names, table = list(inverse[0]), inverse[1]
    check.key_types(owner, names)
    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        raise ValueError(
            f"{owner}: inverse_indices' tensor must be 2-D (keys x batch), got "
            f"{tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__}"
        )
    if table.dtype not in check.INDEX_DTYPES and table.numel():
        raise check.IndexDtypeError(
            f"{owner}: inverse_indices must be of integer type, got {table.dtype}"
        )
    if table.shape[0] != len(names):
        raise ValueError(
            f"{owner}: inverse_indices has {table.shape[0]} rows for {len(names)} keys {names}"
        )
    return names, table


def lengths_offsets(stride_per_key: Sequence[int]) -> list[int]:
    """Start of each key's lengths, plus the end."""
    return [0, *itertools.accumulate(stride_per_key)]


def restrict_inverse(inverse: InverseIndices | None, keys: Sequence[str]) -> InverseIndices | None:
    """The rows of ``inverse`` for ``keys`` (each once, in ``keys``' order); a view when they are
    consecutive rows in order, which is the usual case (a split of a KJT built with them)."""
    if inverse is None:
        return None
    names, table = inverse
    if list(keys) == names:
        return inverse
    at = {name: i for i, name in enumerate(names)}
    rows = [at[k] for k in dict.fromkeys(keys) if k in at]
    if not rows:
        return None
    picked = [names[r] for r in rows]
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return picked, table.narrow(0, rows[0], len(rows))
    return picked, table.index_select(0, torch.tensor(rows, device=table.device))


def per_key_sums(flat: torch.Tensor, sizes: Sequence[int]) -> list[int]:
    """Sums of ``flat``'s consecutive segments of ``sizes`` (one device-to-host copy)."""
    if not sizes:
        return []
    ends = torch.tensor(lengths_offsets(sizes), device=flat.device)
    running = torch.cat([flat.new_zeros(1, dtype=torch.int64), flat.cumsum(0, dtype=torch.int64)])
    bounds: list[int] = running.index_select(0, ends).tolist()
    return [b - a for a, b in itertools.pairwise(bounds)]


def gather_rows(
    values: torch.Tensor,
    weights: torch.Tensor | None,
    lengths: torch.Tensor,
    offsets: torch.Tensor,
    rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The jagged rows ``rows`` (indices into ``lengths``), in that order: values, weights and
    lengths of the result."""
    picked = lengths.index_select(0, rows)
    starts = offsets.long().index_select(0, rows)
    # Each output id's source: its row's start, plus its place within the row.
    shift = starts - (torch.cumsum(picked, 0) - picked)
    source = torch.repeat_interleave(shift, picked, output_size=int(picked.sum()))
    source += torch.arange(source.numel(), device=source.device)
    return (
        values.index_select(0, source),
        None if weights is None else weights.index_select(0, source),
        picked,
    )
