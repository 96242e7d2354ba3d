"""Input checks shared by the sparse containers.

Two tiers. The ``check_*`` functions read only host-side metadata (dtype, dim, numel, Python
lists): they are cheap, never copy from the device, and run in every public constructor. They
refuse only what no container can hold (lengths that are not integers, one weight per value
missing); what values hold is the consumer's business (an embedding lookup needs integer ids,
a JaggedTensor of embedding rows does not). The ``find_*`` functions read tensor contents,
which on an accelerator means a device-to-host copy: they run only in the explicit
``validate()`` methods (and, where the answer is free, in ``sync()``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import torch

# TorchRec accepts these for lengths and offsets; anything else (floats above all) is refused.
INDEX_DTYPES: Final = frozenset({torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64})


class IndexDtypeError(TypeError, AssertionError):
    """Lengths or offsets of a non-integer dtype.

    A TypeError, and also an AssertionError: TorchRec asserts on this, so code written against
    TorchRec that catches AssertionError keeps working.
    """


def check_values(owner: str, values: torch.Tensor) -> None:
    """Values may be of any dtype (ids, floats, embedding rows); dim 0 is the jagged dim."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{owner}: values must be a torch.Tensor, got {type(values).__name__}")
    if values.dim() == 0:
        raise ValueError(f"{owner}: values must have at least one dimension, got a scalar")


def check_index_tensor(owner: str, name: str, tensor: torch.Tensor) -> None:
    """Lengths and offsets: a 1-D tensor of integers (any dtype while it is empty)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 1:
        raise ValueError(f"{owner}: {name} must be 1-D, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in INDEX_DTYPES and tensor.numel() != 0:
        raise IndexDtypeError(f"{owner}: {name} must be of integer type, got dtype {tensor.dtype}")


def as_lengths(owner: str, lengths: torch.Tensor) -> torch.Tensor:
    """Check ``lengths``; an empty one of another shape (TorchRec's ``torch.tensor([[], []])``)
    becomes 1-D."""
    # The isinstance is for callers that pass something else, which check_index_tensor names.
    empty = isinstance(lengths, torch.Tensor) and lengths.numel() == 0  # type: ignore[redundant-expr]
    if empty and lengths.dim() != 1:
        return lengths.reshape(0)
    check_index_tensor(owner, "lengths", lengths)
    return lengths


def is_index_tensor(tensor: object) -> bool:
    """The common case of :func:`check_index_tensor`, as one cheap test for the hot path."""
    return isinstance(tensor, torch.Tensor) and tensor.dtype in INDEX_DTYPES and tensor.dim() == 1


def check_offsets(owner: str, offsets: torch.Tensor, lengths: torch.Tensor | None) -> None:
    """Offsets are a 1-D index tensor with one more entry than ``lengths`` when both are given
    (an empty offsets tensor, as TorchRec's ``empty()`` makes, also means "no rows")."""
    if not is_index_tensor(offsets):
        check_index_tensor(owner, "offsets", offsets)
    if lengths is None or offsets.numel() == lengths.numel() + 1:
        return
    if offsets.numel() == 0 and lengths.numel() == 0:
        return
    raise ValueError(
        f"{owner}: lengths has {lengths.numel()} entries and offsets "
        f"{offsets.numel()}; offsets needs exactly one more"
    )


def check_weights(owner: str, weights: torch.Tensor, values: torch.Tensor) -> None:
    """One weight per value along the jagged dim 0; any dtype (integer weights are how an
    EmbeddingCollection with ``need_indices`` returns ids), any trailing shape."""
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"{owner}: weights must be a torch.Tensor, got {type(weights).__name__}")
    if weights.dim() == 0:
        raise ValueError(f"{owner}: weights must have at least one dimension, got a scalar")
    if weights.shape[0] != values.shape[0]:
        raise ValueError(
            f"{owner}: weights has {weights.shape[0]} entries but values has {values.shape[0]}; "
            "there must be one weight per value"
        )


def key_types(owner: str, keys: Sequence[str]) -> None:
    """Every key is a string; the error names the first that is not, and its position."""
    for position, key in enumerate(keys):
        if not isinstance(key, str):
            raise TypeError(
                f"{owner}: key at position {position} is {type(key).__name__} {key!r}, expected str"
            )


def key_index(owner: str, keys: Sequence[str]) -> dict[str, int]:
    """Map each key to its position; reject non-strings and duplicates, naming the positions."""
    key_types(owner, keys)
    index: dict[str, int] = {}
    for position, key in enumerate(keys):
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
    if offsets.numel() == 0:  # no rows
        return None if num_values == 0 else f"offsets is empty but values has {num_values} entries"
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
