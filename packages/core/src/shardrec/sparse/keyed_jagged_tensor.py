"""KeyedJaggedTensor: several sparse features for one batch, key-major in three flat tensors."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

import torch

from shardrec.sparse import _kjt_build as _build
from shardrec.sparse import _kjt_checks as _checks
from shardrec.sparse import _kjt_movement as _movement
from shardrec.sparse import _kjt_reshape as _reshape
from shardrec.sparse import _kjt_text as _text
from shardrec.sparse import _validation as check
from shardrec.sparse import _vbe as vbe
from shardrec.sparse._jagged_fields import JaggedFields
from shardrec.sparse.jagged_tensor import JaggedTensor

_OWNER = "KeyedJaggedTensor"


class KeyedJaggedTensor(JaggedFields):
    """Sparse features of one batch: for each key (feature) and each sample, a list of ids.

    ::

                 sample 0    sample 1    sample 2
        product  [101, 202]  []          [303]
        user     [404]       [505]       [606]

        keys     ["product", "user"]
        values   [101, 202, 303, 404, 505, 606]
        lengths  [2, 0, 1, 1, 1, 1]      key-major: len(keys) * stride entries
        stride   3                       the batch size

    Host-side per-key sizes. ``length_per_key()`` (ids per key, ``[3, 3]`` above) and
    ``offset_per_key()`` (``[0, 3, 6]``) are Python ints, so computing them copies from the device.
    That copy happens in one named place, ``sync()``; ``from_lengths_sync`` / ``from_offsets_sync``
    call it for you, and operations that produce new KJTs (``permute``, ``split``, ``concat``,
    ``from_jt_dict``) carry the sizes over without another copy. ``to_dict``, ``permute``,
    ``split`` and ``__getitem__`` on an unsynced KJT call ``sync()`` once and keep the result
    (measured: recomputing the sizes would cost each of those operations a device-to-host copy).

    Values may be of any dtype and shape (dim 0 is the jagged dim), as in TorchRec: integer ids
    are what an embedding lookup needs, and the lookup is where that is checked. Weights pair one
    to one with values, of any dtype.

    Checks. The constructor checks everything it can see without reading tensor contents, so it
    never waits on a device: lengths/offsets are 1-D integer tensors (``IndexDtypeError``, a
    TypeError that is also the AssertionError TorchRec raises), the number of lengths is a
    multiple of the number of keys (and agrees with ``stride=``), there is one weight per value,
    keys are distinct. ``sync()`` also checks, for free, that the lengths add up to the number of
    values. ``validate()`` reads the contents (a device sync) and checks the rest: no negative
    lengths (naming the key and sample), per-key sizes, well-formed offsets, keys that are
    strings, all tensors on one device. Call it on untrusted input.

    Operations that pick keys (``permute`` with repeated indices) may produce repeated keys;
    ``__getitem__`` then answers with the last of them.

    Variable batch per key (TorchRec's VBE, see ``docs/vbe.md``). With
    ``stride_per_key_per_rank=[[2], [4]]`` key 0 has 2 samples and key 1 has 4: lengths hold 2 + 4
    entries, key-major. ``inverse_indices=(keys, table)`` maps each of the batch's samples to a row
    of each key (``table[i, b]``), so that a user's features sent once serve all their items; the
    batch size ``stride()`` is then the table's width. :func:`~shardrec.sparse.deduplicate_features`
    builds such a KJT from a full batch.
    """

    _OWNER = "KeyedJaggedTensor"

    __slots__ = (
        "_inverse_indices",
        "_key_index",
        "_keys",
        "_length_per_key",
        "_offset_per_key",
        "_stride",
        "_stride_per_key",
        "_stride_per_key_per_rank",
    )

    _keys: list[str]
    _key_index: dict[str, int] | None
    _values: torch.Tensor
    _weights: torch.Tensor | None
    _lengths: torch.Tensor | None
    _offsets: torch.Tensor | None
    _stride: int
    _length_per_key: list[int] | None
    _offset_per_key: list[int] | None
    _stride_per_key_per_rank: list[list[int]] | None  # None: every key has stride() samples
    _stride_per_key: list[int] | None  # the sums of the above, kept with it
    _inverse_indices: vbe.InverseIndices | None

    def __init__(
        self,
        keys: Sequence[str],
        values: torch.Tensor,
        weights: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
        stride: int | None = None,
        length_per_key: Sequence[int] | None = None,
        offset_per_key: Sequence[int] | None = None,
        stride_per_key_per_rank: vbe.StridePerKeyPerRank | None = None,
        inverse_indices: vbe.InverseIndices | None = None,
    ) -> None:
        # The constructor sits on every batch's path (TorchRec's only assigns), so the common case
        # runs one cheap test per argument; the detailed checkers only run to word an error.
        keys = list(keys)
        if len(set(keys)) != len(keys):
            check.key_index(_OWNER, keys)
        if not _is_tensor(values) or values.dim() == 0:
            check.check_values(_OWNER, values)
        if weights is not None:
            check.check_weights(_OWNER, weights, values)
        if lengths is not None:
            if not check.is_index_tensor(lengths):
                lengths = check.as_lengths(_OWNER, lengths)
            num_lengths: int | None = lengths.numel()
        else:
            num_lengths = None
        if offsets is not None:
            check.check_offsets(_OWNER, offsets, lengths)
            num_lengths = max(offsets.numel() - 1, 0)
        self._stride_per_key_per_rank = None
        self._stride_per_key = None
        self._inverse_indices = None
        if stride_per_key_per_rank is not None or inverse_indices is not None:
            self._stride = self._init_vbe(
                keys, num_lengths, stride, stride_per_key_per_rank, inverse_indices
            )
        elif num_lengths is None:
            # Neither lengths nor offsets: TorchRec allows such a KJT (only asking for them fails).
            self._stride = stride or 0
        else:
            self._stride = _stride_of(keys, num_lengths, stride)
        self._keys = keys
        self._key_index = None
        self._values = values
        self._weights = weights
        self._lengths = lengths
        self._offsets = offsets
        self._length_per_key = None
        self._offset_per_key = None
        if length_per_key is not None:
            self._set_length_per_key(list(length_per_key))
        if offset_per_key is not None:
            per_key = list(offset_per_key)
            if len(per_key) != len(keys) + 1:
                raise ValueError(
                    f"{_OWNER}: offset_per_key has {len(per_key)} entries, expected {len(keys) + 1}"
                )
            self._set_length_per_key([b - a for a, b in itertools.pairwise(per_key)])

    @classmethod
    def _trusted(
        cls,
        keys: list[str],
        key_index: dict[str, int] | None,
        values: torch.Tensor,
        weights: torch.Tensor | None,
        lengths: torch.Tensor | None,
        offsets: torch.Tensor | None,
        stride: int,
        length_per_key: list[int] | None,
        offset_per_key: list[int] | None,
        stride_per_key_per_rank: list[list[int]] | None = None,
        inverse_indices: vbe.InverseIndices | None = None,
    ) -> KeyedJaggedTensor:
        """Assemble from parts that an operation on checked KJTs produced; no checks, no copies."""
        kjt = cls.__new__(cls)
        kjt._keys = keys
        kjt._key_index = key_index
        kjt._values = values
        kjt._weights = weights
        kjt._lengths = lengths
        kjt._offsets = offsets
        kjt._stride = stride
        kjt._length_per_key = length_per_key
        kjt._offset_per_key = offset_per_key
        kjt._stride_per_key_per_rank = stride_per_key_per_rank
        kjt._stride_per_key = (
            None if stride_per_key_per_rank is None else [sum(r) for r in stride_per_key_per_rank]
        )
        kjt._inverse_indices = inverse_indices
        return kjt

    def _init_vbe(
        self,
        keys: list[str],
        num_lengths: int | None,
        stride: int | None,
        given: vbe.StridePerKeyPerRank | None,
        inverse_indices: vbe.InverseIndices | None,
    ) -> int:
        """Set the VBE fields from the constructor's arguments; returns the batch size."""
        if inverse_indices is not None:
            self._inverse_indices = vbe.check_inverse_indices(_OWNER, inverse_indices)
        if given is None:
            # Inverse indices alone (a full batch that carries them): every key has stride().
            return (stride or 0) if num_lengths is None else _stride_of(keys, num_lengths, stride)
        rows = vbe.as_stride_per_key_per_rank(_OWNER, given, len(keys))
        per_key = [sum(r) for r in rows]
        if num_lengths is not None and num_lengths != sum(per_key):
            raise ValueError(
                f"{_OWNER}: {num_lengths} lengths but stride_per_key_per_rank gives "
                f"{sum(per_key)} samples ({dict(zip(keys, per_key, strict=True))})"
            )
        self._stride_per_key_per_rank = rows
        self._stride_per_key = per_key
        if stride is not None:
            return stride
        if self._inverse_indices is not None and self._inverse_indices[1].numel():
            return int(self._inverse_indices[1].shape[-1])
        return max(per_key, default=0)

    def _set_length_per_key(self, per_key: list[int]) -> None:
        if len(per_key) != len(self._keys):
            raise ValueError(
                f"{_OWNER}: length_per_key has {len(per_key)} entries for {len(self._keys)} keys"
            )
        total = sum(per_key)
        if total != self._values.shape[0]:
            raise ValueError(
                f"{_OWNER}: length_per_key sums to {total} but values has "
                f"{self._values.shape[0]} entries"
            )
        self._length_per_key = per_key
        self._offset_per_key = [0, *itertools.accumulate(per_key)]

    # -- constructors ----------------------------------------------------------------------------

    @staticmethod
    def from_lengths_sync(
        keys: Sequence[str],
        values: torch.Tensor,
        lengths: torch.Tensor,
        weights: torch.Tensor | None = None,
        stride: int | None = None,
        stride_per_key_per_rank: vbe.StridePerKeyPerRank | None = None,
        inverse_indices: vbe.InverseIndices | None = None,
    ) -> KeyedJaggedTensor:
        """Build and ``sync()``: per-key sizes ready, at the cost of one device-to-host copy."""
        kjt = KeyedJaggedTensor(
            keys,
            values,
            weights=weights,
            lengths=lengths,
            stride=stride,
            stride_per_key_per_rank=stride_per_key_per_rank,
            inverse_indices=inverse_indices,
        )
        return kjt.sync()

    @staticmethod
    def from_offsets_sync(
        keys: Sequence[str],
        values: torch.Tensor,
        offsets: torch.Tensor,
        weights: torch.Tensor | None = None,
        stride: int | None = None,
        stride_per_key_per_rank: vbe.StridePerKeyPerRank | None = None,
        inverse_indices: vbe.InverseIndices | None = None,
    ) -> KeyedJaggedTensor:
        """Build from offsets and ``sync()``."""
        kjt = KeyedJaggedTensor(
            keys,
            values,
            weights=weights,
            offsets=offsets,
            stride=stride,
            stride_per_key_per_rank=stride_per_key_per_rank,
            inverse_indices=inverse_indices,
        )
        return kjt.sync()

    @staticmethod
    def from_jt_dict(jt_dict: Mapping[str, JaggedTensor]) -> KeyedJaggedTensor:
        """One KJT from per-key JaggedTensors (no device sync). Keys with different numbers of
        rows give a variable-batch KJT, one rank, as TorchRec's."""
        return _build.from_jt_dict(KeyedJaggedTensor, jt_dict)

    @staticmethod
    def empty(
        is_weighted: bool = False,
        device: torch.device | str | None = None,
        values_dtype: torch.dtype | None = None,
        weights_dtype: torch.dtype | None = None,
        lengths_dtype: torch.dtype = torch.int32,
    ) -> KeyedJaggedTensor:
        """A KJT with no keys."""
        weights = (
            torch.empty(0, dtype=weights_dtype or torch.float32, device=device)
            if is_weighted
            else None
        )
        return KeyedJaggedTensor._trusted(
            [],
            {},
            torch.empty(0, dtype=values_dtype or torch.int64, device=device),
            weights,
            torch.empty(0, dtype=lengths_dtype, device=device),
            None,
            0,
            [],
            [0],
        )

    @staticmethod
    def empty_like(
        kjt: KeyedJaggedTensor, device: torch.device | str | None = None
    ) -> KeyedJaggedTensor:
        """A KJT with no keys and the same stride, device and dtypes as ``kjt``.

        With ``device``, TorchRec's meaning: ``kjt``'s keys and per-key sizes over uninitialised
        tensors of ``kjt``'s shapes on that device (a buffer to copy into).
        """
        return _build.empty_like(KeyedJaggedTensor, kjt, device)

    @staticmethod
    def concat(kjt_list: Sequence[KeyedJaggedTensor]) -> KeyedJaggedTensor:
        """Keys of all KJTs, in order, in one KJT. Strides must agree; keys must not repeat."""
        return _reshape.concat(KeyedJaggedTensor, kjt_list)

    # -- accessors -------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return self._keys

    def stride(self) -> int:
        """The batch size: ``len(lengths) // len(keys)``; with a variable batch per key, the
        width of the inverse indices, or else the largest key's number of samples."""
        return self._stride

    def stride_per_key(self) -> list[int]:
        """Each key's number of samples (its number of lengths)."""
        per_key = self._stride_per_key
        if per_key is None:
            return [self._stride] * len(self._keys)
        if len(per_key) != len(self._keys):
            raise vbe.row_count_error(_OWNER, len(per_key), len(self._keys))
        return per_key

    def stride_per_key_per_rank(self) -> list[list[int]]:
        """Each key's number of samples from each rank; ``[]`` when every key has ``stride()``."""
        return [] if self._stride_per_key_per_rank is None else self._stride_per_key_per_rank

    def variable_stride_per_key(self) -> bool:
        """Whether the keys have their own numbers of samples (``stride_per_key_per_rank``)."""
        return self._stride_per_key_per_rank is not None

    def inverse_indices(self) -> tuple[list[str], torch.Tensor]:
        """``(keys, table)``: sample ``b`` of the batch reads row ``table[i, b]`` of ``keys[i]``."""
        if self._inverse_indices is None:
            raise ValueError(f"{_OWNER} has no inverse_indices; use inverse_indices_or_none()")
        return self._inverse_indices

    def inverse_indices_or_none(self) -> tuple[list[str], torch.Tensor] | None:
        return self._inverse_indices

    def device(self) -> torch.device:
        return self._values.device

    def index_per_key(self) -> dict[str, int]:
        return dict(self._index())

    def _index(self) -> dict[str, int]:
        """key -> position, built on first lookup (most KJTs are never indexed by key)."""
        if self._key_index is None:
            self._key_index = {key: i for i, key in enumerate(self._keys)}
        return self._key_index

    def length_per_key(self) -> list[int]:
        """Number of ids of each key (host-side; calls ``sync()`` if not done yet)."""
        if self._length_per_key is None:
            self.sync()
        assert self._length_per_key is not None
        return self._length_per_key

    def length_per_key_or_none(self) -> list[int] | None:
        return self._length_per_key

    def offset_per_key(self) -> list[int]:
        """Start of each key's ids in ``values``, plus the end: ``len(keys) + 1`` entries."""
        if self._offset_per_key is None:
            self.sync()
        assert self._offset_per_key is not None
        return self._offset_per_key

    def offset_per_key_or_none(self) -> list[int] | None:
        return self._offset_per_key

    def lengths_offset_per_key(self) -> list[int]:
        """Start of each key's lengths in ``lengths()``, plus the end."""
        if self._stride_per_key is not None:
            return vbe.lengths_offsets(self.stride_per_key())
        return [i * self._stride for i in range(len(self._keys) + 1)]

    def flatten_lengths(self) -> KeyedJaggedTensor:
        return self

    # -- the explicit device-to-host step --------------------------------------------------------

    def sync(self) -> KeyedJaggedTensor:
        """Compute and keep the host-side per-key sizes (a device-to-host copy); returns self."""
        num_keys = len(self._keys)
        if num_keys == 0:
            self._set_length_per_key([])
            return self
        if self._stride == 0 or (
            self._stride_per_key is not None and not any(self.stride_per_key())
        ):
            self._set_length_per_key([0] * num_keys)
            return self
        if self._values.is_meta:
            # A meta tensor has no contents to count: placeholder sizes that cover the values
            # (TorchRec's choice too), so that shapes can still be traced through to_dict etc.
            share, rest = divmod(self._values.shape[0], num_keys)
            self._set_length_per_key([share + rest] + [share] * (num_keys - 1))
            return self
        if self._stride_per_key is not None:
            return self._sync_variable(self.stride_per_key())
        if self._lengths is not None:
            per_key = self._lengths.view(num_keys, self._stride).sum(dim=1).tolist()
            self._set_length_per_key(per_key)
            return self
        bounds = self._offsets_or_raise()[:: self._stride].tolist()
        if bounds[0] != 0:
            raise ValueError(f"{_OWNER}: offsets[0] is {bounds[0]}, expected 0")
        self._set_length_per_key([b - a for a, b in itertools.pairwise(bounds)])
        return self

    def _sync_variable(self, stride_per_key: list[int]) -> KeyedJaggedTensor:
        if self._lengths is not None:
            self._set_length_per_key(vbe.per_key_sums(self._lengths, stride_per_key))
            return self
        ends = torch.tensor(vbe.lengths_offsets(stride_per_key), device=self._values.device)
        bounds = self._offsets_or_raise().index_select(0, ends).tolist()
        if bounds[0] != 0:
            raise ValueError(f"{_OWNER}: offsets[0] is {bounds[0]}, expected 0")
        self._set_length_per_key([b - a for a, b in itertools.pairwise(bounds)])
        return self

    def unsync(self) -> KeyedJaggedTensor:
        """Drop the host-side per-key sizes. Returns self."""
        self._length_per_key = None
        self._offset_per_key = None
        return self

    def validate(self) -> KeyedJaggedTensor:
        """Check the contents (a device sync); ValueError names the key and sample. Returns self."""
        _checks.validate(self)
        return self

    # -- views and reshaping ---------------------------------------------------------------------

    def __getitem__(self, key: str) -> JaggedTensor:
        index = self._index().get(key)
        if index is None:
            raise KeyError(f"{_OWNER} has no key {key!r}; keys are {self._keys}")
        per_key = self.offset_per_key()
        start, end = per_key[index], per_key[index + 1]
        if self._stride_per_key is None:
            lengths = self.lengths().narrow(0, index * self._stride, self._stride)
        else:
            strides = self.stride_per_key()
            lengths = self.lengths().narrow(0, sum(strides[:index]), strides[index])
        weights = self._weights
        return JaggedTensor._trusted(
            self._values[start:end],
            None if weights is None else weights[start:end],
            lengths,
            None,
        )

    def to_dict(self, compute_offsets: bool = True) -> dict[str, JaggedTensor]:
        """One JaggedTensor per key; views into this KJT's values, weights and lengths.

        ``compute_offsets`` is accepted for TorchRec's signature; either way each JaggedTensor's
        ``offsets()`` is derived on first use (``offsets_or_none()`` is None until then), which
        measured cheaper than computing every key's upfront.
        """
        return _reshape.to_dict(self, compute_offsets)

    def permute(
        self, indices: Sequence[int], indices_tensor: torch.Tensor | None = None
    ) -> KeyedJaggedTensor:
        """A KJT whose i-th key is this KJT's ``indices[i]``-th; indices may repeat or omit keys."""
        return _reshape.permute(self, indices, indices_tensor)

    def split(self, segments: Sequence[int]) -> list[KeyedJaggedTensor]:
        """Consecutive groups of ``segments[i]`` keys each (zero allowed); views, no copies."""
        return _reshape.split(self, segments)

    # -- movement --------------------------------------------------------------------------------

    def to(
        self,
        device: torch.device | str,
        non_blocking: bool = False,
        dtype: torch.dtype | None = None,
    ) -> KeyedJaggedTensor:
        """Move every tensor to ``device``; ``dtype``, if given, converts the weights."""
        weights = self._weights
        if weights is not None:
            weights = weights.to(device, dtype=dtype or weights.dtype, non_blocking=non_blocking)
        return self._mapped(lambda t: t.to(device, non_blocking=non_blocking), weights)

    def pin_memory(self) -> KeyedJaggedTensor:
        weights = None if self._weights is None else self._weights.pin_memory()
        return self._mapped(torch.Tensor.pin_memory, weights)

    def _mapped(
        self, fn: Callable[[torch.Tensor], torch.Tensor], weights: torch.Tensor | None
    ) -> KeyedJaggedTensor:
        """This KJT with ``fn`` applied to each tensor but the weights, which are given."""
        return _movement.mapped(self, fn, weights)

    def copy_(self, kjt: KeyedJaggedTensor, non_blocking: bool = False) -> KeyedJaggedTensor:
        """Copy ``kjt``'s contents into this KJT's tensors in place (for example into a buffer
        from ``empty_like(kjt, device=...)``), with its host-side per-key sizes. Keys, strides and
        shapes must match (ValueError); nothing is copied otherwise. Returns self."""
        _movement.copy_into(self, kjt, non_blocking)
        return self

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        inverse = None if self._inverse_indices is None else self._inverse_indices[1]
        for t in (self._values, self._weights, self._lengths, self._offsets, inverse):
            if t is not None:
                t.record_stream(stream)

    def clear_storage(self) -> int:
        """Free the memory of this KJT's tensors now (their storages shrink to nothing), for
        example to return accelerator memory before the object dies. Returns the bytes freed.

        This KJT's own tensors become empty, leaving a KJT of the same keys with no samples.
        Other tensors that shared the storage (per-key JaggedTensors, views taken earlier) are
        left pointing at freed memory: do not read them afterwards.
        """
        return _movement.clear_storage(self)

    def __str__(self) -> str:
        """TorchRec's printed form; ``repr()`` gives a compact one."""
        return _text.torchrec_str(self)

    def __repr__(self) -> str:
        return _text.compact_repr(self)


def _is_tensor(value: object) -> bool:
    return isinstance(value, torch.Tensor)


def _stride_of(keys: list[str], num_lengths: int, stride: int | None) -> int:
    """Batch size from the number of lengths; rejects counts that do not divide evenly."""
    if not keys:
        if num_lengths:
            raise ValueError(f"{_OWNER}: {num_lengths} lengths but no keys")
        return stride if stride is not None else 0
    batch, rest = divmod(num_lengths, len(keys))
    if rest:
        raise ValueError(
            f"{_OWNER}: {num_lengths} lengths is not a multiple of the {len(keys)} keys "
            f"{keys}; lengths must hold len(keys) * stride entries, key-major"
        )
    if stride is not None and stride != batch:
        raise ValueError(
            f"{_OWNER}: stride={stride} but {num_lengths} lengths for {len(keys)} keys "
            f"give a batch size of {batch}"
        )
    return batch
