"""The learning-rate schedule of the DLRM reference: linear warm-up, constant, then polynomial
decay.

``lr(step) = base * factor(step)`` where, for ``step`` counted from 0:

- warm-up: ``factor = (step + 1) / warmup_steps`` for ``step < warmup_steps`` (reaches 1 on the last
  warm-up step instead of spending the first step at a learning rate of 0);
- constant: ``factor = 1`` until ``decay_start``;
- decay: ``factor = ((decay_steps - k) / decay_steps) ** power`` for ``k = step - decay_start`` in
  ``[0, decay_steps)``, with power 2 as in the reference, never below ``min_lr / base``;
- after the decay: ``min_lr / base``, frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_LR = 1e-7


@dataclass(frozen=True, kw_only=True, slots=True)
class LRSchedule:
    base_lr: float
    warmup_steps: int = 0
    decay_start: int = 0
    decay_steps: int = 0
    power: float = 2.0
    min_lr: float = MIN_LR

    def __post_init__(self) -> None:
        if self.base_lr <= 0:
            raise ValueError(f"learning rate must be positive, got {self.base_lr}")
        for name in ("warmup_steps", "decay_start", "decay_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.decay_steps > 0 and self.decay_start < self.warmup_steps:
            raise ValueError(
                f"decay_start ({self.decay_start}) must not come before the end of warm-up "
                f"({self.warmup_steps})"
            )

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.decay_steps > 0 and step >= self.decay_start:
            decayed = step - self.decay_start
            if decayed >= self.decay_steps:
                return min(self.min_lr, self.base_lr)
            factor = ((self.decay_steps - decayed) / self.decay_steps) ** self.power
            return max(self.min_lr, self.base_lr * float(factor))
        return self.base_lr
