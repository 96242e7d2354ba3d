"""JaggedTensor: one feature's variable-length rows, as flat values plus lengths or offsets."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shardrec.sparse import _validation as check
from shardrec.sparse._jagged_fields import JaggedFields
from shardrec.sparse._jagged_ops import offsets_to_lengths, padded_dense

_OWNER = "JaggedTensor"


class JaggedTensor(JaggedFields):
    """Rows of different lengths, stored flat.

    ::

        rows     [[1, 2], [], [3]]
        values   [1, 2, 3]
        lengths  [2, 0, 1]
        offsets  [0, 2, 2, 3]

    ``values`` may be of any dtype, and dim 0 is the jagged dim: ids, floats, or an embedding row
    per id ``(N, D)``. Give ``lengths`` or ``offsets`` (or both); the other is derived on first
    use and kept, since deriving it is a kernel launch that callers such as embedding lookups ask
    for on every batch. ``weights`` pair one to one with values along dim 0, of any dtype: an
    EmbeddingCollection with ``need_indices`` returns the ids there, as TorchRec's does.

    Checks. The constructor checks only what it can see without reading tensor contents, so it
    never waits on a device: values and weights are tensors with a dim 0 of the same size,
    lengths/offsets are 1-D integer tensors (``IndexDtypeError``, a TypeError that is also the
    AssertionError TorchRec raises) and agree in count. ``validate()`` also reads the contents:
    negative lengths, lengths that do not sum to the number of values, offsets that do not start
    at 0 or decrease. Both raise ValueError naming the row.
    """

    _OWNER = "JaggedTensor"

    __slots__ = ()

    def __init__(
        self,
        values: torch.Tensor,
        weights: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
    ) -> None:
        check.check_values(_OWNER, values)
        if lengths is None and offsets is None:
            raise ValueError(f"{_OWNER}: give lengths= or offsets=")
        if lengths is not None and not check.is_index_tensor(lengths):
            lengths = check.as_lengths(_OWNER, lengths)
        if offsets is not None:
            check.check_offsets(_OWNER, offsets, lengths)
        if weights is not None:
            check.check_weights(_OWNER, weights, values)
        self._values = values
        self._weights = weights
        self._lengths = lengths
        self._offsets = offsets

    @classmethod
    def _trusted(
        cls,
        values: torch.Tensor,
        weights: torch.Tensor | None,
        lengths: torch.Tensor | None,
        offsets: torch.Tensor | None,
    ) -> JaggedTensor:
        """Build from pieces another container already checked (the per-key views of a KJT)."""
        jt = cls.__new__(cls)
        jt._values = values
        jt._weights = weights
        jt._lengths = lengths
        jt._offsets = offsets
        return jt

    # -- constructors ----------------------------------------------------------------------------

    @staticmethod
    def empty(
        is_weighted: bool = False,
        device: torch.device | str | None = None,
        values_dtype: torch.dtype | None = None,
        weights_dtype: torch.dtype | None = None,
        lengths_dtype: torch.dtype = torch.int32,
    ) -> JaggedTensor:
        """A JaggedTensor with no rows."""
        values = torch.empty(0, dtype=values_dtype or torch.int64, device=device)
        weights = (
            torch.empty(0, dtype=weights_dtype or torch.float32, device=device)
            if is_weighted
            else None
        )
        lengths = torch.empty(0, dtype=lengths_dtype, device=device)
        # Empty offsets as well, as TorchRec's empty() has: "no rows" either way.
        return JaggedTensor._trusted(values, weights, lengths, torch.empty_like(lengths))

    @staticmethod
    def empty_like(jt: JaggedTensor, device: torch.device | str | None = None) -> JaggedTensor:
        """A JaggedTensor with no rows and the dtypes (and weightedness) of ``jt``.

        With ``device``, TorchRec's meaning: uninitialised tensors of ``jt``'s shapes on that
        device (a buffer to ``copy_`` into), lengths and offsets as ``jt`` has them.
        """
        weights = jt._weights
        if device is None:
            return JaggedTensor._trusted(
                jt._values.new_empty((0, *jt._values.shape[1:])),
                None if weights is None else weights.new_empty((0, *weights.shape[1:])),
                jt.lengths().new_empty(0),
                None,
            )

        def like(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else torch.empty_like(t, device=device)

        return JaggedTensor._trusted(
            torch.empty_like(jt._values, device=device),
            like(weights),
            like(jt._lengths),
            like(jt._offsets),
        )

    @staticmethod
    def from_dense(
        values: Sequence[torch.Tensor],
        weights: Sequence[torch.Tensor] | None = None,
    ) -> JaggedTensor:
        """From one tensor per row: ``[tensor([1, 2]), tensor([]), tensor([3])]``."""
        if weights is not None and len(weights) != len(values):
            raise ValueError(
                f"{_OWNER}.from_dense: {len(weights)} weight rows for {len(values)} value rows"
            )
        for row, tensor in enumerate(values):
            item: object = tensor
            if not isinstance(item, torch.Tensor) or item.dim() == 0:
                raise ValueError(f"{_OWNER}.from_dense: row {row} must be a tensor with a dim 0")
        if not values:
            return JaggedTensor.empty(is_weighted=weights is not None)
        lengths = torch.tensor(
            [t.shape[0] for t in values], dtype=torch.int32, device=values[0].device
        )
        flat_weights = torch.cat(list(weights)) if weights is not None else None
        return JaggedTensor(values=torch.cat(list(values)), weights=flat_weights, lengths=lengths)

    @staticmethod
    def from_dense_lengths(
        values: torch.Tensor,
        lengths: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> JaggedTensor:
        """From padded rows ``(B, N, ...)`` and the number of real entries in each row."""
        if values.dim() < 2:
            raise ValueError(
                f"{_OWNER}.from_dense_lengths: values must be (rows, width, ...), "
                f"got shape {tuple(values.shape)}"
            )
        check.check_index_tensor(_OWNER, "lengths", lengths)
        if lengths.numel() != values.shape[0]:
            raise ValueError(
                f"{_OWNER}.from_dense_lengths: {lengths.numel()} lengths for {values.shape[0]} rows"
            )
        mask = torch.arange(values.shape[1], device=values.device) < lengths.unsqueeze(1)
        flat_weights = weights[mask] if weights is not None else None
        return JaggedTensor(values=values[mask], weights=flat_weights, lengths=lengths)

    # -- accessors -------------------------------------------------------------------------------

    def device(self) -> torch.device:
        return self._values.device

    def num_rows(self) -> int:
        """The number of rows (samples); host-side, no sync."""
        if self._lengths is not None:
            return self._lengths.numel()
        assert self._offsets is not None
        return max(self._offsets.numel() - 1, 0)

    # -- conversions -----------------------------------------------------------------------------

    def to_dense(self) -> list[torch.Tensor]:
        """One tensor per row (views into ``values``). Copies lengths to the host."""
        return _rows(self._values, self.lengths())

    def to_dense_weights(self) -> list[torch.Tensor] | None:
        if self._weights is None:
            return None
        return _rows(self._weights, self.lengths())

    def to_padded_dense(
        self, desired_length: int | None = None, padding_value: float = 0.0
    ) -> torch.Tensor:
        """``(B, N, ...)``: rows cut or padded to ``desired_length`` (default: the longest row)."""
        if desired_length is not None and desired_length < 0:
            raise ValueError(f"{_OWNER}.to_padded_dense: desired_length {desired_length} < 0")
        return padded_dense(
            self._values, self.lengths(), self.offsets(), desired_length, padding_value
        )

    def to_padded_dense_weights(
        self, desired_length: int | None = None, padding_value: float = 0.0
    ) -> torch.Tensor | None:
        if self._weights is None:
            return None
        if desired_length is not None and desired_length < 0:
            raise ValueError(
                f"{_OWNER}.to_padded_dense_weights: desired_length {desired_length} < 0"
            )
        return padded_dense(
            self._weights, self.lengths(), self.offsets(), desired_length, padding_value
        )

    # -- checks and movement ---------------------------------------------------------------------

    def validate(self) -> JaggedTensor:
        """Check the contents (a device sync): lengths non-negative and consistent with values.
        Returns self."""
        num_values = self._values.shape[0]
        if self._lengths is not None:
            bad = check.find_negative_length(self._lengths)
            if bad is not None:
                raise ValueError(
                    f"{_OWNER}: lengths[{bad}] = {int(self._lengths[bad].item())} is negative "
                    f"(row {bad})"
                )
            total = int(self._lengths.sum().item())
            if total != num_values:
                raise ValueError(
                    f"{_OWNER}: lengths sum to {total} but values has {num_values} entries"
                )
        if self._offsets is not None:
            problem = check.find_bad_offset(self._offsets, num_values)
            if problem is not None:
                raise ValueError(f"{_OWNER}: {problem}")
            if self._lengths is not None and not torch.equal(
                offsets_to_lengths(self._offsets), self._lengths.to(self._offsets.dtype)
            ):
                raise ValueError(f"{_OWNER}: lengths and offsets disagree")
        return self

    def to(self, device: torch.device | str, non_blocking: bool = False) -> JaggedTensor:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return JaggedTensor._trusted(
            self._values.to(device, non_blocking=non_blocking),
            move(self._weights),
            move(self._lengths),
            move(self._offsets),
        )

    def copy_(self, jt: JaggedTensor, non_blocking: bool = False) -> JaggedTensor:
        """Copy ``jt``'s contents into this JaggedTensor's tensors in place (for example into a
        buffer from ``empty_like(jt, device=...)``); shapes must match. Returns self."""
        self._copy_from(jt, non_blocking)
        return self

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        for t in (self._values, self._weights, self._lengths, self._offsets):
            if t is not None:
                t.record_stream(stream)

    def __str__(self) -> str:
        """TorchRec's printed form; ``repr()`` gives a compact one."""
        rows = str([t.tolist() for t in self.to_dense()])
        weights = self.to_dense_weights()
        if weights is None:
            return f"JaggedTensor({{\n    {rows}\n}})\n"
        weight_rows = str([w.tolist() for w in weights])
        return f'JaggedTensor({{\n    "values": {rows},\n    "weights": {weight_rows}\n}})\n'

    def __repr__(self) -> str:
        if self._values.numel() > 1000:
            return (
                f"JaggedTensor(rows={self.num_rows()}, values={tuple(self._values.shape)} "
                f"{self._values.dtype}, weighted={self._weights is not None})"
            )
        rows = [t.tolist() for t in self.to_dense()]
        weights = self.to_dense_weights()
        if weights is None:
            return f"JaggedTensor({rows})"
        return f"JaggedTensor({rows}, weights={[w.tolist() for w in weights]})"


def _rows(flat: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    # Values past the last row are not part of any row (TorchRec reads rows by offsets, so a
    # longer values tensor is tolerated outside validate()).
    sizes = lengths.tolist()
    total = sum(sizes)
    if total != flat.shape[0]:
        flat = flat.narrow(0, 0, total)
    return list(torch.split(flat, sizes))
