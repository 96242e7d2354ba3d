"""The containers as pytree nodes, so that torch.compile / torch.export see their tensors.

Children are the tensors the object holds (absent optional ones are left out, since pytree would
otherwise carry ``None`` leaves); the context is what is static: which fields are present, the
keys, the stride and the host-side per-key sizes. A KJT with a variable batch per key also
keeps its per-rank batch sizes in the context and, when it has inverse indices, their key names
there and their tensor as the last child.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import _pytree as fx_pytree
from torch.utils import _pytree as pytree

from shardrec.sparse.jagged_tensor import JaggedTensor
from shardrec.sparse.keyed_jagged_tensor import KeyedJaggedTensor
from shardrec.sparse.keyed_tensor import KeyedTensor

_FIELDS = ("_values", "_weights", "_lengths", "_offsets")

_Present = tuple[str, ...]
_JtContext = _Present
_PerRank = tuple[tuple[int, ...], ...] | None
_KjtContext = tuple[
    _Present, tuple[str, ...], int, tuple[int, ...] | None, _PerRank, tuple[str, ...] | None
]
_INVERSE = "_inverse_indices"
_KtContext = tuple[tuple[str, ...], tuple[int, ...], int]


def _present(obj: JaggedTensor | KeyedJaggedTensor) -> _Present:
    return tuple(name for name in _FIELDS if getattr(obj, name) is not None)


def _fields(present: _Present, children: list[Any]) -> dict[str, Any]:
    found = dict(zip(present, children, strict=True))
    return {name: found.get(name) for name in _FIELDS}


def _jt_flatten(jt: JaggedTensor) -> tuple[list[torch.Tensor], _JtContext]:
    present = _present(jt)
    return [getattr(jt, name) for name in present], present


def _jt_flatten_with_keys(jt: JaggedTensor) -> tuple[list[tuple[Any, Any]], _JtContext]:
    present = _present(jt)
    return [(pytree.GetAttrKey(name), getattr(jt, name)) for name in present], present


def _jt_unflatten(children: Any, context: _JtContext) -> JaggedTensor:
    f = _fields(context, list(children))
    return JaggedTensor._trusted(f["_values"], f["_weights"], f["_lengths"], f["_offsets"])


def _kjt_context(kjt: KeyedJaggedTensor) -> _KjtContext:
    per_key = kjt.length_per_key_or_none()
    inverse = kjt.inverse_indices_or_none()
    return (
        _present(kjt),
        tuple(kjt.keys()),
        kjt.stride(),
        None if per_key is None else tuple(per_key),
        tuple(map(tuple, kjt.stride_per_key_per_rank())) if kjt.variable_stride_per_key() else None,
        None if inverse is None else tuple(inverse[0]),
    )


def _kjt_children(kjt: KeyedJaggedTensor, context: _KjtContext) -> list[tuple[str, torch.Tensor]]:
    children = [(name, getattr(kjt, name)) for name in context[0]]
    inverse = kjt.inverse_indices_or_none()
    if inverse is not None:
        children.append((_INVERSE, inverse[1]))
    return children


def _kjt_flatten(kjt: KeyedJaggedTensor) -> tuple[list[torch.Tensor], _KjtContext]:
    context = _kjt_context(kjt)
    return [t for _, t in _kjt_children(kjt, context)], context


def _kjt_flatten_with_keys(
    kjt: KeyedJaggedTensor,
) -> tuple[list[tuple[Any, Any]], _KjtContext]:
    context = _kjt_context(kjt)
    children = _kjt_children(kjt, context)
    return [(pytree.GetAttrKey(name), t) for name, t in children], context


def _kjt_unflatten(children: Any, context: _KjtContext) -> KeyedJaggedTensor:
    present, keys, stride, per_key, per_rank, inverse_names = context
    tensors = list(children)
    inverse = None
    if inverse_names is not None:
        inverse = (list(inverse_names), tensors.pop())
    f = _fields(present, tensors)
    per_key_list = None if per_key is None else list(per_key)
    offset_per_key = None
    if per_key_list is not None:
        offset_per_key = [0]
        for n in per_key_list:
            offset_per_key.append(offset_per_key[-1] + n)
    return KeyedJaggedTensor._trusted(
        list(keys),
        None,
        f["_values"],
        f["_weights"],
        f["_lengths"],
        f["_offsets"],
        stride,
        per_key_list,
        offset_per_key,
        None if per_rank is None else [list(r) for r in per_rank],
        inverse,
    )


def _kt_flatten(kt: KeyedTensor) -> tuple[list[torch.Tensor], _KtContext]:
    return [kt.values()], (tuple(kt.keys()), tuple(kt.length_per_key()), kt.key_dim())


def _kt_flatten_with_keys(kt: KeyedTensor) -> tuple[list[tuple[Any, Any]], _KtContext]:
    children, context = _kt_flatten(kt)
    return [(pytree.GetAttrKey("_values"), children[0])], context


def _kt_unflatten(children: Any, context: _KtContext) -> KeyedTensor:
    keys, per_key, key_dim = context
    return KeyedTensor(list(keys), list(per_key), next(iter(children)), key_dim=key_dim)


def _spec_fields(obj: JaggedTensor | KeyedJaggedTensor, present: _Present) -> list[torch.Tensor]:
    """The tensors a recorded spec expects, derived when this object lacks them (lengths from
    offsets or the reverse); a spec with weights needs an object with weights."""
    getters = {
        "_values": obj.values,
        "_weights": obj.weights,
        "_lengths": obj.lengths,
        "_offsets": obj.offsets,
    }
    return [getters[name]() for name in present]


def _jt_flatten_spec(jt: JaggedTensor, spec: pytree.TreeSpec) -> list[torch.Tensor]:
    present: _JtContext = spec.context
    return _spec_fields(jt, present)


def _kjt_flatten_spec(kjt: KeyedJaggedTensor, spec: pytree.TreeSpec) -> list[torch.Tensor]:
    context: _KjtContext = spec.context
    fields = _spec_fields(kjt, context[0])
    if context[5] is not None:
        fields.append(kjt.inverse_indices()[1])
    return fields


def _kt_flatten_spec(kt: KeyedTensor, spec: pytree.TreeSpec) -> list[torch.Tensor]:
    """The values in the key order the spec recorded: an exported program was traced with one
    order, and a KeyedTensor built elsewhere may come with its keys in another."""
    context: _KtContext = spec.context
    keys = context[0]
    if tuple(kt.keys()) == keys:
        return [kt.values()]
    return [KeyedTensor.regroup([kt], [list(keys)])[0]]


def register() -> None:
    """Register the three containers (idempotent)."""
    if JaggedTensor in pytree.SUPPORTED_NODES:
        return
    pytree.register_pytree_node(
        JaggedTensor,
        _jt_flatten,
        _jt_unflatten,
        serialized_type_name="shardrec.JaggedTensor",
        flatten_with_keys_fn=_jt_flatten_with_keys,
    )
    pytree.register_pytree_node(
        KeyedJaggedTensor,
        _kjt_flatten,
        _kjt_unflatten,
        serialized_type_name="shardrec.KeyedJaggedTensor",
        flatten_with_keys_fn=_kjt_flatten_with_keys,
    )
    pytree.register_pytree_node(
        KeyedTensor,
        _kt_flatten,
        _kt_unflatten,
        serialized_type_name="shardrec.KeyedTensor",
        flatten_with_keys_fn=_kt_flatten_with_keys,
    )
    fx_pytree.register_pytree_flatten_spec(JaggedTensor, _jt_flatten_spec)
    fx_pytree.register_pytree_flatten_spec(KeyedJaggedTensor, _kjt_flatten_spec)
    fx_pytree.register_pytree_flatten_spec(KeyedTensor, _kt_flatten_spec)
