"""What a sharding check found: each difference from the unsharded module, named."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["EquivalenceError", "EquivalenceReport", "Mismatch"]


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One difference: ``what`` differs (``"output"``, ``"dense gradient"``, ``"weight"``,
    ``"optimizer state 'sum'"`` ...), in which ``phase`` (training at world size W, a checkpoint
    loaded at W'), for which table, rank and step where they apply, by how much."""

    what: str
    phase: str
    table: str | None = None
    rank: int | None = None
    step: int | None = None
    max_abs_diff: float | None = None
    detail: str = ""

    def __str__(self) -> str:
        where = [
            f"{label} {value}"
            for label, value in (("table", self.table), ("rank", self.rank), ("step", self.step))
            if value is not None
        ]
        text = f"{self.what} differs ({self.phase}"
        text += f"; {', '.join(where)})" if where else ")"
        if self.max_abs_diff is not None:
            text += f": max abs diff {self.max_abs_diff:.3g}"
        return f"{text} {self.detail}".rstrip()


@dataclass(slots=True)
class EquivalenceReport:
    """Every comparison a check made (``checked``, one line each) and what differed."""

    description: str
    mismatches: list[Mismatch] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def __str__(self) -> str:
        if self.ok:
            return f"{self.description}: matches the unsharded module ({len(self.checked)} checks)"
        lines = [
            f"{self.description}: {len(self.mismatches)} differences from the unsharded module"
        ]
        lines += [f"  - {m}" for m in self.mismatches[:_SHOWN]]
        if len(self.mismatches) > _SHOWN:
            lines.append(f"  ... and {len(self.mismatches) - _SHOWN} more")
        return "\n".join(lines)


_SHOWN = 20


class EquivalenceError(AssertionError):
    """A sharded run differs from the unsharded module; ``report`` says where."""

    def __init__(self, report: EquivalenceReport) -> None:
        self.report = report
        super().__init__(str(report))


@dataclass(frozen=True, slots=True)
class Tolerance:
    atol: float = 1e-5
    rtol: float = 1e-5

    def difference(self, got: torch.Tensor, want: torch.Tensor) -> tuple[bool, float | None, str]:
        """(differs, max abs diff, detail): shapes first, then values within tolerance."""
        if tuple(got.shape) != tuple(want.shape):
            return True, None, f"(shape {tuple(got.shape)}, expected {tuple(want.shape)})"
        if got.numel() == 0:
            return False, 0.0, ""
        got64, want64 = got.detach().double(), want.detach().double()
        diff = float((got64 - want64).abs().nan_to_num(nan=float("inf")).max())
        close = torch.allclose(got64, want64, atol=self.atol, rtol=self.rtol)
        return not close, diff, ""
