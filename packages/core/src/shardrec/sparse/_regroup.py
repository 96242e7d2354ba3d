"""KeyedTensor.regroup: gather keys of several KeyedTensors into new groups, one copy per group."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from shardrec.sparse.keyed_tensor import KeyedTensor

_OWNER = "KeyedTensor.regroup"


def _locate(keyed_tensors: Sequence[KeyedTensor]) -> dict[str, tuple[int, int, int]]:
    """key -> (which KeyedTensor, start, length) along its key_dim; the first occurrence wins."""
    where: dict[str, tuple[int, int, int]] = {}
    for which, kt in enumerate(keyed_tensors):
        starts = kt.offset_per_key()
        for key, start, length in zip(kt.keys(), starts, kt.length_per_key(), strict=False):
            where.setdefault(key, (which, start, length))
    return where


def regroup(
    keyed_tensors: Sequence[KeyedTensor], groups: Sequence[Sequence[str]]
) -> list[torch.Tensor]:
    if not keyed_tensors:
        raise ValueError(f"{_OWNER}: no KeyedTensors given")
    key_dim = keyed_tensors[0].key_dim()
    first = keyed_tensors[0].values()
    for position, kt in enumerate(keyed_tensors):
        values = kt.values()
        if kt.key_dim() != key_dim:
            raise ValueError(
                f"{_OWNER}: KeyedTensor at position {position} has key_dim {kt.key_dim()}, "
                f"expected {key_dim}"
            )
        if values.dim() != first.dim() or any(
            values.shape[d] != first.shape[d] for d in range(first.dim()) if d != key_dim
        ):
            raise ValueError(
                f"{_OWNER}: KeyedTensor at position {position} has values of shape "
                f"{tuple(values.shape)}, which does not line up with {tuple(first.shape)} "
                f"outside key_dim {key_dim}"
            )
    where = _locate(keyed_tensors)
    out: list[torch.Tensor] = []
    for group_index, group in enumerate(groups):
        # Blocks that sit next to each other in the same source merge into one slice, so a group
        # that keeps a KeyedTensor's order costs one slice of it rather than one per key.
        runs: list[list[int]] = []
        for key in group:
            found = where.get(key)
            if found is None:
                raise ValueError(
                    f"{_OWNER}: key {key!r} of group {group_index} is in none of the KeyedTensors"
                )
            which, start, length = found
            if runs and runs[-1][0] == which and runs[-1][1] + runs[-1][2] == start:
                runs[-1][2] += length
            else:
                runs.append([which, start, length])
        slices = [
            keyed_tensors[which].values().narrow(key_dim, start, length)
            for which, start, length in runs
        ]
        if len(slices) == 1:
            out.append(slices[0].clone())
        elif slices:
            out.append(torch.cat(slices, dim=key_dim))
        else:
            shape = list(first.shape)
            shape[key_dim] = 0
            out.append(first.new_empty(shape))
    return out
