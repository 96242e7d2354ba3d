"""The KJT operations that cut and reassemble keys: to_dict, permute, split, concat.

All of them work from the host-side per-key sizes (``length_per_key``), so that each is a
handful of torch calls whatever the number of keys: one ``torch.split`` into per-key views, one
``torch.cat`` to reassemble, one row gather of the ``(keys, stride)`` lengths matrix. No per-key
kernels, no device syncs beyond the KJT's own ``sync()``.
"""

from __future__ import annotations

import array
import itertools
import operator
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from shardrec.sparse import _validation as check
from shardrec.sparse import _vbe as vbe
from shardrec.sparse.jagged_tensor import JaggedTensor

if TYPE_CHECKING:
    from shardrec.sparse.keyed_jagged_tensor import KeyedJaggedTensor


def to_dict(kjt: KeyedJaggedTensor, compute_offsets: bool) -> dict[str, JaggedTensor]:
    keys = kjt.keys()
    if not keys:
        return {}
    per_key = kjt.length_per_key()
    values = torch.split(kjt.values(), per_key)
    lengths: Sequence[torch.Tensor] = (
        torch.split(kjt.lengths(), kjt.stride_per_key())
        if kjt.variable_stride_per_key()
        else kjt.lengths().view(len(keys), kjt.stride()).unbind(0)
    )
    # No rows: empty offsets, as TorchRec gives. Otherwise each JaggedTensor derives its offsets
    # on first use, whatever compute_offsets says: computing every key's upfront (one cumsum of
    # all lengths) cost more than the rest of to_dict together (tools/bench/kjt.py, 26 keys x
    # 4096: 31us -> 133us), and most consumers read only lengths.
    no_rows = compute_offsets and kjt.stride() == 0
    offsets: Sequence[torch.Tensor | None] = lengths if no_rows else [None] * len(keys)
    weights = kjt.weights_or_none()
    split_weights: Sequence[torch.Tensor | None] = (
        [None] * len(keys) if weights is None else torch.split(weights, per_key)
    )
    trusted = JaggedTensor._trusted
    return {
        key: trusted(v, w, n, o)
        for key, v, w, n, o in zip(keys, values, split_weights, lengths, offsets, strict=True)
    }


def _index_tensor(indices: Sequence[int], device: torch.device) -> torch.Tensor:
    """An int64 tensor of ``indices``; via a buffer, which is ~3x faster than torch.tensor(list)."""
    if not indices:
        return torch.empty(0, dtype=torch.int64, device=device)
    host = torch.frombuffer(array.array("q", indices), dtype=torch.int64)
    return host if device.type == "cpu" else host.to(device)


class _PermutePlan(NamedTuple):
    """What a permutation needs besides the KJT: checked once per (indices, number of keys)."""

    indices: tuple[int, ...]
    pick: Callable[[Sequence[Any]], list[Any]]  # [seq[i] for i in indices], at C speed
    index_cpu: torch.Tensor  # int64, never written to (shared by every permute that uses it)


_PERMUTE_PLAN_CACHE_SIZE = 256
_INT_ONLY = {int}
_permute_plans: dict[tuple[tuple[int, ...], int], _PermutePlan] = {}


def _picker(indices: tuple[int, ...]) -> Callable[[Sequence[Any]], list[Any]]:
    if len(indices) == 1:
        only = indices[0]
        return lambda seq: [seq[only]]
    if not indices:
        return lambda seq: []
    getter = operator.itemgetter(*indices)
    return lambda seq: list(getter(seq))


def _permute_plan(indices: Sequence[int], num_keys: int) -> _PermutePlan:
    """The checked, cached plan of a permutation (models permute by the same indices each batch)."""
    as_tuple = tuple(indices)
    cache_key = (as_tuple, num_keys)
    try:
        plan = _permute_plans.get(cache_key)
    except TypeError:  # an unhashable index: let the checker name it
        plan = None
    # 0.0 and True hash and compare like 0 and 1: a hit only counts for plain ints.
    if plan is not None and (not as_tuple or set(map(type, as_tuple)) == _INT_ONLY):
        return plan
    check.check_permute_indices("KeyedJaggedTensor.permute", as_tuple, num_keys)
    plan = _PermutePlan(as_tuple, _picker(as_tuple), _index_tensor(as_tuple, torch.device("cpu")))
    if len(_permute_plans) >= _PERMUTE_PLAN_CACHE_SIZE:
        _permute_plans.clear()
    _permute_plans[cache_key] = plan
    return plan


def _permute_segments(
    flat: torch.Tensor, sizes: list[int], plan: _PermutePlan, indices_tensor: torch.Tensor
) -> torch.Tensor:
    """Concatenate ``flat``'s consecutive segments of ``sizes`` in the order of ``plan``."""
    if not plan.indices:
        return flat.new_empty((0, *flat.shape[1:]))
    if min(sizes) == max(sizes) and sizes[0] > 0:
        # Equal segments (one-hot features: every key has stride ids): one row gather of a
        # (keys, size) view, which runs at copy speed, instead of a cat of per-key views.
        rest = flat.shape[1:]  # values may be rows (N, D): the jagged dim is dim 0
        blocks = flat.view(len(sizes), sizes[0], *rest).index_select(0, indices_tensor)
        return blocks.view(-1, *rest)
    # One memcpy per key, no index over all values.
    return torch.cat(plan.pick(torch.split(flat, sizes)))


def permute(
    kjt: KeyedJaggedTensor, indices: Sequence[int], indices_tensor: torch.Tensor | None
) -> KeyedJaggedTensor:
    keys = kjt.keys()
    num_keys = len(keys)
    plan = _permute_plan(indices, num_keys)
    per_key = kjt.length_per_key()
    stride = kjt.stride()
    lengths = kjt.lengths()
    if indices_tensor is None:
        indices_tensor = plan.index_cpu
        if lengths.device.type != "cpu":
            indices_tensor = indices_tensor.to(lengths.device)
    elif indices_tensor.dtype != torch.long:
        indices_tensor = indices_tensor.long()
    new_per_key = plan.pick(per_key)
    variable = kjt.variable_stride_per_key()
    if variable:
        new_lengths = _permute_segments(lengths, kjt.stride_per_key(), plan, indices_tensor)
    elif plan.indices and stride:
        new_lengths = lengths.view(num_keys, stride).index_select(0, indices_tensor).view(-1)
    else:
        new_lengths = lengths.new_empty(len(plan.indices) * stride)
    weights = kjt.weights_or_none()
    new_values = _permute_segments(kjt.values(), per_key, plan, indices_tensor)
    new_weights = (
        None if weights is None else _permute_segments(weights, per_key, plan, indices_tensor)
    )
    new_keys = plan.pick(keys)
    return type(kjt)._trusted(
        new_keys,
        None,
        new_values,
        new_weights,
        new_lengths,
        None,
        stride,
        new_per_key,
        [0, *itertools.accumulate(new_per_key)],
        plan.pick(kjt.stride_per_key_per_rank()) if variable else None,
        vbe.restrict_inverse(kjt.inverse_indices_or_none(), new_keys),
    )


def split(kjt: KeyedJaggedTensor, segments: Sequence[int]) -> list[KeyedJaggedTensor]:
    keys = kjt.keys()
    check.check_split_segments("KeyedJaggedTensor.split", segments, len(keys))
    per_key = kjt.length_per_key()
    offset_per_key = kjt.offset_per_key()
    stride = kjt.stride()
    values = kjt.values()
    weights = kjt.weights_or_none()
    lengths = kjt.lengths()
    variable = kjt.variable_stride_per_key()
    lengths_at = kjt.lengths_offset_per_key() if variable else None
    per_rank = kjt.stride_per_key_per_rank() if variable else None
    inverse = kjt.inverse_indices_or_none()
    cls = type(kjt)
    out: list[KeyedJaggedTensor] = []
    start = 0
    for size in segments:
        end = start + size
        lo, hi = offset_per_key[start], offset_per_key[end]
        sub_per_key = per_key[start:end]
        sub_lengths = (
            lengths[start * stride : end * stride]
            if lengths_at is None
            else lengths[lengths_at[start] : lengths_at[end]]
        )
        out.append(
            cls._trusted(
                keys[start:end],
                None,
                values[lo:hi],
                None if weights is None else weights[lo:hi],
                sub_lengths,
                # An empty segment: empty offsets too (TorchRec's), a valid "no rows" form.
                sub_lengths if size == 0 else None,
                stride,
                sub_per_key,
                [o - lo for o in offset_per_key[start : end + 1]],
                None if per_rank is None else per_rank[start:end],
                vbe.restrict_inverse(inverse, keys[start:end]),
            )
        )
        start = end
    return out


def concat(
    cls: type[KeyedJaggedTensor], kjt_list: Sequence[KeyedJaggedTensor]
) -> KeyedJaggedTensor:
    # One pass over the KJTs gathers what the result needs and checks strides and weights; then
    # one torch.cat per tensor. The per-key sizes pass through (no sync, no re-validation).
    owner = "KeyedJaggedTensor.concat"
    keys: list[str] = []
    values: list[torch.Tensor] = []
    lengths: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []
    new_per_key: list[int] | None = []
    stride = -1
    weighted = False
    first: KeyedJaggedTensor | None = None
    parts: list[KeyedJaggedTensor] = []
    for position, kjt in enumerate(kjt_list):
        kjt_keys = kjt.keys()
        if not kjt_keys:
            continue
        kjt_weights = kjt.weights_or_none()
        if first is None:
            first = kjt
            stride = kjt.stride()
            weighted = kjt_weights is not None
        elif kjt.variable_stride_per_key() != first.variable_stride_per_key():
            raise ValueError(
                f"{owner}: KJT at position {position} "
                f"{'has' if kjt.variable_stride_per_key() else 'lacks'} a variable batch per key "
                "unlike the first; concatenate KJTs of one kind"
            )
        elif kjt.stride() != stride and not kjt.variable_stride_per_key():
            raise ValueError(
                f"{owner}: KJT at position {position} has stride {kjt.stride()}, expected {stride} "
                "(all KJTs must have the same batch size)"
            )
        elif (kjt_weights is not None) != weighted:
            raise ValueError(
                f"{owner}: KJT at position {position} is "
                f"{'weighted' if not weighted else 'unweighted'}, unlike the first; "
                "mix weighted and unweighted KJTs is not allowed"
            )
        parts.append(kjt)
        keys += kjt_keys
        values.append(kjt.values())
        lengths.append(kjt.lengths())
        if kjt_weights is not None:
            weights.append(kjt_weights)
        if new_per_key is not None:
            per_key = kjt.length_per_key_or_none()
            if per_key is None:
                new_per_key = None
            else:
                new_per_key += per_key
    if first is None:
        return cls.empty_like(kjt_list[0]) if kjt_list else cls.empty()
    if len(set(keys)) != len(keys):
        check.key_index(owner, keys)  # raises, naming the repeated key and its positions
    per_rank: list[list[int]] | None = None
    inverse: vbe.InverseIndices | None = None
    if first.variable_stride_per_key():
        per_rank, inverse, stride = _concat_variable(owner, parts)
    return cls._trusted(
        keys,
        None,
        torch.cat(values),
        torch.cat(weights) if weighted else None,
        torch.cat(lengths),
        None,
        stride,
        new_per_key,
        None if new_per_key is None else [0, *itertools.accumulate(new_per_key)],
        per_rank,
        inverse,
    )


def _concat_variable(
    owner: str, parts: list[KeyedJaggedTensor]
) -> tuple[list[list[int]], vbe.InverseIndices | None, int]:
    """The per-rank batch sizes, inverse indices and batch size of KJTs with a variable batch
    per key, concatenated: the same number of ranks, and inverse indices on all or none."""
    per_rank: list[list[int]] = []
    ranks = {len(r) for kjt in parts for r in kjt.stride_per_key_per_rank()}
    if len(ranks) > 1:
        raise ValueError(
            f"{owner}: the KJTs' stride_per_key_per_rank have different numbers of ranks "
            f"{sorted(ranks)}"
        )
    for kjt in parts:
        per_rank += kjt.stride_per_key_per_rank()
    inverses = [vbe.restrict_inverse(kjt.inverse_indices_or_none(), kjt.keys()) for kjt in parts]
    present = [inv is not None for inv in inverses]
    if not any(present):
        return per_rank, None, max(kjt.stride() for kjt in parts)
    if not all(present):
        raise ValueError(
            f"{owner}: KJT at position {present.index(not present[0])} "
            f"{'lacks' if present[0] else 'has'} inverse_indices unlike the first; give them "
            "to all or none"
        )
    tables = [inv[1] for inv in inverses if inv is not None]
    widths = {t.shape[1] for t in tables}
    if len(widths) > 1:
        raise ValueError(
            f"{owner}: the KJTs' inverse_indices cover batches of different sizes {sorted(widths)}"
        )
    names = [name for inv in inverses if inv is not None for name in inv[0]]
    return per_rank, (names, torch.cat(tables)), widths.pop()
