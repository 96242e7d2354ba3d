"""Small building blocks for :class:`~shardrec.distributed.types.Awaitable` results.

``Ready(x)`` is a result that needs no communication; ``Mapped(a, fn)`` applies ``fn`` to ``a``'s
result once (a sharded module's input distribution turns the ids it received into its context
this way); ``Then(a, start)`` is a second collective that needs the first's result (``advance()``
waits for ``a`` and starts the second); ``AllOf([a, b])`` advances and waits several, in order
(every rank in the same order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic

from typing_extensions import TypeVar

from shardrec.distributed.types import Awaitable

__all__ = ["AllOf", "Mapped", "Ready", "Then"]

T = TypeVar("T")
S = TypeVar("S")


class Ready(Generic[T]):
    """An :class:`Awaitable` whose value is already here."""

    def __init__(self, value: T) -> None:
        self._value = value

    def advance(self) -> None:
        pass

    def wait(self) -> T:
        return self._value


class Mapped(Generic[S, T]):
    """``fn`` of ``source``'s result, computed on the first ``wait()`` and kept."""

    def __init__(self, source: Awaitable[S], fn: Callable[[S], T]) -> None:
        self._source = source
        self._fn = fn
        self._done = False
        self._value: T | None = None

    def advance(self) -> None:
        self._source.advance()

    def wait(self) -> T:
        if not self._done:
            self._value = self._fn(self._source.wait())
            self._done = True
        return self._value  # type: ignore[return-value]  # set above; T may include None


class Then(Generic[S, T]):
    """Two dependent collectives: ``start`` issues the second from the first's result.

    ``advance()`` waits for ``source`` and calls ``start`` (once); ``wait()`` advances, then waits
    for the second. Every rank calls them in the same order, so the second collective is issued
    in the same order everywhere.
    """

    def __init__(self, source: Awaitable[S], start: Callable[[S], Awaitable[T]]) -> None:
        self._source = source
        self._start = start
        self._next: Awaitable[T] | None = None

    def advance(self) -> None:
        if self._next is None:
            self._next = self._start(self._source.wait())

    def wait(self) -> T:
        self.advance()
        assert self._next is not None
        return self._next.wait()


class AllOf(Generic[T]):
    """Several awaitables as one: advanced and waited in the order given."""

    def __init__(self, parts: Sequence[Awaitable[T]]) -> None:
        self._parts = list(parts)

    def advance(self) -> None:
        for part in self._parts:
            part.advance()

    def wait(self) -> list[T]:
        return [part.wait() for part in self._parts]
