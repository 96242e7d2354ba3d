"""Record the large storages that torch ops create: to test that code makes no copy of a table,
or allocates only what it owns."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["Allocation", "record_allocations"]


@dataclass(frozen=True)
class Allocation:
    """One new storage an op made: the op (``aten.clone.default``), the output tensor's shape,
    dtype and device, and the storage's size in bytes and address (``data_ptr``)."""

    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    nbytes: int
    address: int


_Span = tuple[torch.device, int, int]


def _span(storage: torch.UntypedStorage) -> _Span:
    start = storage.data_ptr()
    return storage.device, start, start + storage.nbytes()


def _input_spans(args: Any, kwargs: Any) -> list[_Span]:
    """The memory each tensor or storage argument can reach (its whole storage)."""
    spans = []
    for leaf in tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.layout == torch.strided and not leaf.is_meta:
            spans.append(_span(leaf.untyped_storage()))
        elif isinstance(leaf, torch.UntypedStorage) and leaf.device.type != "meta":
            spans.append(_span(leaf))  # set_'s source (a TypedStorage arrives as one too)
    return spans


# TorchDispatchMode is untyped in torch: subclassing it and its __init__ are untyped calls.
class _Recorder(TorchDispatchMode):  # type: ignore[no-untyped-call]
    def __init__(self, min_bytes: int, seen: list[Allocation]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.min_bytes = min_bytes
        self.seen = seen

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        # Taken before the call: an input that the op grows (resize_, out=) gets new memory,
        # which is an allocation.
        inputs = _input_spans(args, kwargs)
        out = func(*args, **kwargs)
        made: set[int] = set()
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.is_meta:
                continue
            storage = t.untyped_storage()
            device, lo, hi = _span(storage)
            if storage.nbytes() < self.min_bytes or lo in made:
                continue
            # A view, an in-place op, or set_ onto an input's storage (or a slice of one, which
            # is a storage of its own with another data_ptr): memory that was there already.
            if any(d == device and a <= lo and hi <= b for d, a, b in inputs):
                continue
            made.add(lo)
            self.seen.append(
                Allocation(str(func), tuple(t.shape), t.dtype, t.device, storage.nbytes(), lo)
            )
        return out


@contextmanager
def record_allocations(min_bytes: int) -> Iterator[list[Allocation]]:
    """Records each new storage of at least ``min_bytes`` bytes, off the meta device, that a torch
    op creates while the context is active, in the order made.

    A dispatch mode sees every op below autograd, factory functions (``torch.empty``,
    ``torch.zeros``) included. New means the output's memory lies outside every tensor's and
    storage's argument of the op: views, in-place ops and ``set_`` onto an existing storage (or a
    slice of one) are not allocations. Memory made without an op is not seen: storages read by
    ``torch.load`` or built from a buffer, ``torch.from_numpy``. Contexts nest; each records
    what is made inside it.

    ::

        from shardrec.testing import record_allocations

        with record_allocations(min_bytes=table.nbytes) as made:
            save(path, model, step=1)
        assert made == [], "a copy of a table was made"  # each an Allocation(op, shape, ...)
    """
    if min_bytes < 0:
        raise ValueError(f"record_allocations: min_bytes must be >= 0, got {min_bytes}")
    seen: list[Allocation] = []
    with _Recorder(min_bytes, seen):
        yield seen
