"""The accessors JaggedTensor and KeyedJaggedTensor share: values, optional per-value weights, and
lengths/offsets, of which the constructor usually sets one; the other is derived on first use."""

from __future__ import annotations

from typing import ClassVar

import torch

from shardrec.sparse._jagged_ops import lengths_to_offsets, offsets_to_lengths


class JaggedFields:
    __slots__ = ("_lengths", "_offsets", "_values", "_weights")

    _OWNER: ClassVar[str]
    _values: torch.Tensor
    _weights: torch.Tensor | None
    _lengths: torch.Tensor | None
    _offsets: torch.Tensor | None

    def values(self) -> torch.Tensor:
        return self._values

    def weights(self) -> torch.Tensor:
        if self._weights is None:
            raise ValueError(f"{self._OWNER} has no weights; use weights_or_none()")
        return self._weights

    def weights_or_none(self) -> torch.Tensor | None:
        return self._weights

    def lengths(self) -> torch.Tensor:
        if self._lengths is None:
            self._lengths = offsets_to_lengths(self._offsets_or_raise())
        return self._lengths

    def lengths_or_none(self) -> torch.Tensor | None:
        return self._lengths

    def offsets(self) -> torch.Tensor:
        if self._offsets is None:
            if self._lengths is None:
                raise self._no_lengths()
            self._offsets = lengths_to_offsets(self._lengths)
        return self._offsets

    def _offsets_or_raise(self) -> torch.Tensor:
        if self._offsets is None:
            raise self._no_lengths()
        return self._offsets

    def _no_lengths(self) -> ValueError:
        # A KeyedJaggedTensor may be built without either (TorchRec allows it); only asking for
        # them fails.
        return ValueError(f"{self._OWNER} has neither lengths nor offsets")

    def size_in_bytes(self) -> int:
        """Bytes held by the tensors this object has (derived lengths/offsets included)."""
        return sum(
            t.element_size() * t.numel()
            for t in (self._values, self._weights, self._lengths, self._offsets)
            if t is not None
        )

    def offsets_or_none(self) -> torch.Tensor | None:
        return self._offsets

    def _copy_from(self, source: JaggedFields, non_blocking: bool) -> None:
        """Copy ``source``'s tensors into this object's, in place (TorchRec's ``copy_``): every
        tensor this object has, derived on the source side if it only has the other form.
        Shapes must match exactly (``Tensor.copy_`` would broadcast); nothing is copied unless
        every pair matches."""
        pairs: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        for name, mine in (
            ("values", self._values),
            ("weights", self._weights),
            ("lengths", self._lengths),
            ("offsets", self._offsets),
        ):
            if mine is None:
                continue
            theirs = _source_field(source, name)
            if theirs is None:
                raise ValueError(f"{self._OWNER}.copy_: this has {name} but the source has none")
            if theirs.shape != mine.shape:
                raise ValueError(
                    f"{self._OWNER}.copy_: {name} has shape {tuple(mine.shape)} here but "
                    f"{tuple(theirs.shape)} in the source"
                )
            pairs.append((name, mine, theirs))
        for _, mine, theirs in pairs:
            mine.copy_(theirs, non_blocking=non_blocking)


def _source_field(source: JaggedFields, name: str) -> torch.Tensor | None:
    if name == "values":
        return source._values
    if name == "weights":
        return source._weights
    has_rows = source._lengths is not None or source._offsets is not None
    if not has_rows:
        return None
    return source.lengths() if name == "lengths" else source.offsets()
