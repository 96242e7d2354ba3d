"""Input checks shared by the sparse containers.

Two tiers. The ``check_*`` functions read only host-side metadata (dtype, dim, numel, Python
lists): they are cheap, never copy from the device, and run in every public constructor. The
``find_*`` functions read tensor contents, which on an accelerator means a device-to-host copy:
they run only in the explicit ``validate()`` methods (and, where the answer is free, in ``sync()``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import torch

INDEX_DTYPES: Final = frozenset({torch.int32, torch.int64})
ID_DTYPES: Final = frozenset({torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8})


def check_ids(owner: str, values: torch.Tensor) -> None:
    """Ids must be a 1-D tensor of integers."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{owner}: values must be a torch.Tensor, got {type(values).__name__}")
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise TypeError(
            f"{owner}: values must hold integer ids, got dtype {values.dtype} "
            "(float values belong in weights=)"
        )
    if values.dim() != 1:
        raise ValueError(f"{owner}: values must be 1-D, got shape {tuple(values.shape)}")


def check_values_1d(owner: str, values: torch.Tensor) -> None:
    """A JaggedTensor may hold any dtype (ids or embeddings rows), but the jagged dim is dim 0."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{owner}: values must be a torch.Tensor, got {type(values).__name__}")
    if values.dim() == 0:
        raise ValueError(f"{owner}: values must have at least one dimension, got a scalar")


def check_index_tensor(owner: str, name: str, tensor: torch.Tensor) -> None:
    """Lengths and offsets: a 1-D tensor of int32 or int64."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in INDEX_DTYPES:
        raise TypeError(f"{owner}: {name} must be int32 or int64, got dtype {tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(f"{owner}: {name} must be 1-D, got shape {tuple(tensor.shape)}")


def check_offsets(owner: str, offsets: torch.Tensor, lengths: torch.Tensor | None) -> None:
    """Offsets are a 1-D index tensor with at least the leading 0, and one more entry than
    ``lengths`` when both are given."""
    check_index_tensor(owner, "offsets", offsets)
    if offsets.numel() == 0:
        raise ValueError(f"{owner}: offsets must have at least one entry (0)")
    if lengths is not None and lengths.numel() + 1 != offsets.numel():
        raise ValueError(
            f"{owner}: lengths has {lengths.numel()} entries and offsets "
            f"{offsets.numel()}; offsets needs exactly one more"
        )


def check_weights(
    owner: str, weights: torch.Tensor, num_values: int, *, floating: bool = True
) -> None:
    """Weights pair one to one with values and are floating point (``floating=False``: or
    integer, as the ids an EmbeddingCollection returns with ``need_indices``)."""
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"{owner}: weights must be a torch.Tensor, got {type(weights).__name__}")
    if floating and not weights.dtype.is_floating_point:
        raise TypeError(f"{owner}: weights must be floating point, got dtype {weights.dtype}")
    if weights.dtype.is_complex or weights.dtype == torch.bool:
        raise TypeError(f"{owner}: weights must be real numbers, got dtype {weights.dtype}")
    if weights.dim() != 1:
        raise ValueError(f"{owner}: weights must be 1-D, got shape {tuple(weights.shape)}")
    if weights.numel() != num_values:
        raise ValueError(
            f"{owner}: weights has {weights.numel()} entries but values has {num_values}; "
            "there must be one weight per value"
        )


def key_index(owner: str, keys: Sequence[str]) -> dict[str, int]:
    """Map each key to its position; reject non-strings and duplicates, naming the positions."""
    index: dict[str, int] = {}
    for position, key in enumerate(keys):
        if not isinstance(key, str):
            raise TypeError(
                f"{owner}: key at position {position} is {type(key).__name__} {key!r}, expected str"
            )
        first = index.setdefault(key, position)
        if first != position:
            raise ValueError(f"{owner}: duplicate key {key!r} at positions {first} and {position}")
    return index


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_permute_indices(owner: str, indices: Sequence[int], num_keys: int) -> None:
    # Fast path first: permute runs on every batch, and a per-index loop costs more than the copy
    # of a small KJT. The loop below only runs to find and name the offender.
    if not indices:
        return
    if set(map(type, indices)) == {int} and min(indices) >= 0 and max(indices) < num_keys:
        return
    for position, index in enumerate(indices):
        if not is_int(index):
            raise TypeError(
                f"{owner}: permute index at position {position} is "
                f"{type(index).__name__}, expected int"
            )
        if not 0 <= index < num_keys:
            raise ValueError(
                f"{owner}: permute index {index} at position {position} is out of range "
                f"for {num_keys} keys (valid: 0..{num_keys - 1})"
            )


def check_split_segments(owner: str, segments: Sequence[int], num_keys: int) -> None:
    for position, size in enumerate(segments):
        if not is_int(size):
            raise TypeError(
                f"{owner}: split segment at position {position} is "
                f"{type(size).__name__}, expected int"
            )
        if size < 0:
            raise ValueError(f"{owner}: split segment {size} at position {position} is negative")
    total = sum(segments)
    if total != num_keys:
        raise ValueError(
            f"{owner}: split segments {list(segments)} cover {total} keys "
            f"but there are {num_keys} keys; the segments must sum to the number of keys"
        )


def find_negative_length(lengths: torch.Tensor) -> int | None:
    """Index of the first negative length, or None. Reads tensor contents (a device sync)."""
    if lengths.numel() == 0:
        return None
    negative = torch.nonzero(lengths < 0)
    if negative.numel() == 0:
        return None
    return int(negative[0, 0].item())


def find_bad_offset(offsets: torch.Tensor, num_values: int) -> str | None:
    """Describe the first problem with an offsets tensor, or None. Reads tensor contents."""
    if offsets.numel() == 0:
        return "offsets is empty; it needs at least one entry (0)"
    first = int(offsets[0].item())
    if first != 0:
        return f"offsets[0] is {first}, expected 0"
    last = int(offsets[-1].item())
    if last != num_values:
        return f"offsets ends at {last} but values has {num_values} entries"
    steps = offsets[1:] - offsets[:-1]
    bad = find_negative_length(steps)
    if bad is not None:
        return (
            f"offsets decrease at position {bad + 1} "
            f"({int(offsets[bad].item())} -> {int(offsets[bad + 1].item())})"
        )
    return None
