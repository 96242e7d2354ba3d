"""What the worker pool raises when a case fails on some rank, dies, or hangs."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["RankFailedError", "RankTimeoutError"]


class RankFailedError(AssertionError):
    """A case raised on one or more ranks, or a worker process died.

    ``failures`` maps each failed rank to its traceback (or, for a process that died, its exit
    status). An AssertionError, so that pytest shows it as a failed test, not an error in set-up.
    """

    def __init__(self, case: str, failures: Mapping[int, str]) -> None:
        self.case = case
        self.failures = dict(sorted(failures.items()))
        ranks = ", ".join(str(r) for r in self.failures)
        body = "\n".join(f"--- rank {r} ---\n{text.rstrip()}" for r, text in self.failures.items())
        super().__init__(f"{case} failed on rank {ranks}:\n{body}")


class RankTimeoutError(TimeoutError):
    """Some ranks gave no answer within the case's time limit (a hang, usually in a collective
    that another rank never entered). ``ranks`` are those that did not answer."""

    def __init__(self, case: str, ranks: list[int], timeout_s: float) -> None:
        self.case = case
        self.ranks = sorted(ranks)
        super().__init__(
            f"{case}: rank {', '.join(str(r) for r in self.ranks)} gave no answer in "
            f"{timeout_s:g} s (hung; every worker was killed)"
        )
