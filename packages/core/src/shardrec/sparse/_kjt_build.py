"""KeyedJaggedTensor constructors that assemble from other containers: from_jt_dict, empty_like."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from shardrec.sparse.jagged_tensor import JaggedTensor

if TYPE_CHECKING:
    from shardrec.sparse.keyed_jagged_tensor import KeyedJaggedTensor

_OWNER = "KeyedJaggedTensor"


def from_jt_dict(
    cls: type[KeyedJaggedTensor], jt_dict: Mapping[str, JaggedTensor]
) -> KeyedJaggedTensor:
    keys = list(jt_dict)
    if not keys:
        return cls.empty()
    jts = list(jt_dict.values())
    weighted = jts[0].weights_or_none() is not None
    for key, jt in zip(keys, jts, strict=True):
        if not isinstance(jt, JaggedTensor):
            raise TypeError(
                f"{_OWNER}.from_jt_dict: value for key {key!r} is {type(jt).__name__}, "
                "expected JaggedTensor"
            )
        if (jt.weights_or_none() is not None) != weighted:
            raise ValueError(
                f"{_OWNER}.from_jt_dict: key {key!r} "
                f"{'has' if not weighted else 'lacks'} weights unlike key {keys[0]!r}"
            )
    values = torch.cat([jt.values() for jt in jts])
    lengths = torch.cat([jt.lengths() for jt in jts])
    weights = torch.cat([jt.weights() for jt in jts]) if weighted else None
    rows = [jt.num_rows() for jt in jts]
    uniform = min(rows) == max(rows)
    return cls(
        keys,
        values,
        weights=weights,
        lengths=lengths,
        stride=rows[0] if uniform else None,
        length_per_key=[jt.values().shape[0] for jt in jts],
        stride_per_key_per_rank=None if uniform else [[n] for n in rows],
    )


def empty_like(
    cls: type[KeyedJaggedTensor], kjt: KeyedJaggedTensor, device: torch.device | str | None
) -> KeyedJaggedTensor:
    weights = kjt._weights
    inverse = kjt._inverse_indices
    if device is not None:

        def like(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else torch.empty_like(t, device=device)

        return cls._trusted(
            kjt._keys,
            kjt._key_index,
            torch.empty_like(kjt._values, device=device),
            like(weights),
            like(kjt._lengths),
            like(kjt._offsets),
            kjt._stride,
            kjt._length_per_key,
            kjt._offset_per_key,
            kjt._stride_per_key_per_rank,
            None if inverse is None else (inverse[0], torch.empty_like(inverse[1], device=device)),
        )
    lengths = kjt._lengths if kjt._lengths is not None else kjt._offsets
    return cls._trusted(
        [],
        {},
        kjt._values.new_empty((0, *kjt._values.shape[1:])),
        None if weights is None else weights.new_empty((0, *weights.shape[1:])),
        kjt._values.new_empty(0, dtype=torch.int32) if lengths is None else lengths.new_empty(0),
        None,
        kjt._stride,
        [],
        [0],
    )
