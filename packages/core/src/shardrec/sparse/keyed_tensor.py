"""KeyedTensor: a dense tensor sliced by key along one dim, e.g. pooled embeddings."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from shardrec.sparse import _validation as check
from shardrec.sparse._regroup import regroup as _regroup

_OWNER = "KeyedTensor"


class KeyedTensor:
    """One dense tensor, sliced along ``key_dim`` into consecutive per-key blocks.

    ::

        keys            ["product", "user"]
        length_per_key  [4, 2]
        values          (B, 6)      columns 0..3 are "product", 4..5 are "user"

    The constructor checks keys (distinct strings) and that ``length_per_key`` covers ``values``
    along ``key_dim`` (ValueError; TorchRec checks neither); all of it is host-side metadata, so
    nothing waits on a device and there is nothing left for a ``validate()``. With no keys, any
    ``values`` are accepted.
    """

    __slots__ = ("_key_dim", "_key_index", "_keys", "_length_per_key", "_offset_per_key", "_values")

    def __init__(
        self,
        keys: Sequence[str],
        length_per_key: Sequence[int],
        values: torch.Tensor,
        key_dim: int = 1,
    ) -> None:
        keys = list(keys)
        key_index = check.key_index(_OWNER, keys)
        per_key = list(length_per_key)
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"{_OWNER}: values must be a torch.Tensor, got {type(values).__name__}")
        if len(per_key) != len(keys):
            raise ValueError(
                f"{_OWNER}: length_per_key has {len(per_key)} entries for {len(keys)} keys"
            )
        for key, size in zip(keys, per_key, strict=True):
            if not check.is_int(size) or size < 0:
                raise ValueError(
                    f"{_OWNER}: length for key {key!r} is {size!r}, expected an int >= 0"
                )
        # With no keys there is nothing to slice, and any values do (TorchRec's empty
        # KeyedTensor holds ``torch.Tensor()``).
        if keys:
            key_dim = _checked_key_dim(values, key_dim, sum(per_key))
        self._keys = keys
        self._key_index = key_index
        self._length_per_key = per_key
        self._offset_per_key = [0, *itertools.accumulate(per_key)]
        self._values = values
        self._key_dim = key_dim

    @staticmethod
    def from_tensor_list(
        keys: Sequence[str],
        tensors: Sequence[torch.Tensor],
        key_dim: int = 1,
        cat_dim: int = 1,
    ) -> KeyedTensor:
        """Concatenate one tensor per key along ``cat_dim``; a key's length is its key_dim size."""
        if len(keys) != len(tensors):
            raise ValueError(
                f"{_OWNER}.from_tensor_list: {len(keys)} keys but {len(tensors)} tensors"
            )
        if not tensors:
            raise ValueError(
                f"{_OWNER}.from_tensor_list: no tensors (use KeyedTensor(keys=[], ...) for none)"
            )
        per_key = [t.shape[key_dim] for t in tensors]
        return KeyedTensor(keys, per_key, torch.cat(list(tensors), dim=cat_dim), key_dim=key_dim)

    def keys(self) -> list[str]:
        return self._keys

    def values(self) -> torch.Tensor:
        return self._values

    def key_dim(self) -> int:
        return self._key_dim

    def device(self) -> torch.device:
        return self._values.device

    def length_per_key(self) -> list[int]:
        return self._length_per_key

    def size_in_bytes(self) -> int:
        return self._values.element_size() * self._values.numel()

    def offset_per_key(self) -> list[int]:
        return self._offset_per_key

    def __getitem__(self, key: str) -> torch.Tensor:
        index = self._key_index.get(key)
        if index is None:
            raise KeyError(f"{_OWNER} has no key {key!r}; keys are {self._keys}")
        start = self._offset_per_key[index]
        return self._values.narrow(self._key_dim, start, self._length_per_key[index])

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Per-key views of ``values``."""
        parts = torch.split(self._values, self._length_per_key, dim=self._key_dim)
        return dict(zip(self._keys, parts, strict=True))

    @staticmethod
    def regroup(
        keyed_tensors: Sequence[KeyedTensor], groups: Sequence[Sequence[str]]
    ) -> list[torch.Tensor]:
        """For each group of keys, one tensor: the keys' blocks side by side, in the group's order.

        A key present in several KeyedTensors is taken from the first.
        """
        return _regroup(keyed_tensors, groups)

    @staticmethod
    def regroup_as_dict(
        keyed_tensors: Sequence[KeyedTensor],
        groups: Sequence[Sequence[str]],
        keys: Sequence[str],
    ) -> dict[str, torch.Tensor]:
        """``regroup``, named: ``keys[i]`` names the tensor of ``groups[i]``."""
        if len(keys) != len(groups):
            raise ValueError(
                f"{_OWNER}.regroup_as_dict: {len(keys)} names for {len(groups)} groups"
            )
        return dict(zip(keys, _regroup(keyed_tensors, groups), strict=True))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> KeyedTensor:
        return KeyedTensor(
            self._keys,
            self._length_per_key,
            self._values.to(device, non_blocking=non_blocking),
            key_dim=self._key_dim,
        )

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        self._values.record_stream(stream)

    def __str__(self) -> str:
        """TorchRec's printed form; ``repr()`` gives one with tensors."""
        if not self._keys:
            return "KeyedTensor()\n"
        body = ",\n".join(f'    "{key}": {value.tolist()}' for key, value in self.to_dict().items())
        return f"KeyedTensor({{\n{body}\n}})\n"

    def __repr__(self) -> str:
        if not self._keys:
            return f"KeyedTensor({{}}, values={tuple(self._values.shape)})"
        body = ",\n".join(f'    "{key}": {value!r}' for key, value in self.to_dict().items())
        return f"KeyedTensor(key_dim={self._key_dim}, {{\n{body}\n}})"


def _checked_key_dim(values: torch.Tensor, key_dim: int, total: int) -> int:
    """``key_dim`` made non-negative, once it is in range and ``total`` covers values along it."""
    if not -values.dim() <= key_dim < values.dim():
        raise ValueError(
            f"{_OWNER}: key_dim {key_dim} is out of range for values of shape {tuple(values.shape)}"
        )
    key_dim %= values.dim()
    if total != values.shape[key_dim]:
        raise ValueError(
            f"{_OWNER}: length_per_key sums to {total} but values has {values.shape[key_dim]} "
            f"entries along key_dim {key_dim} (shape {tuple(values.shape)})"
        )
    return key_dim
