"""The learning-rate schedule: warm-up, constant, polynomial decay, frozen floor."""

from __future__ import annotations

import pytest

from shardrec_dlrm.training.schedule import MIN_LR, LRSchedule


def test_constant_without_warmup_or_decay() -> None:
    schedule = LRSchedule(base_lr=0.5)
    assert [schedule.lr(step) for step in (0, 1, 10_000)] == [0.5, 0.5, 0.5]


def test_linear_warmup_reaches_base_on_last_warmup_step() -> None:
    schedule = LRSchedule(base_lr=2.0, warmup_steps=4)
    assert [schedule.lr(step) for step in range(6)] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0])


def test_polynomial_decay_then_frozen_floor() -> None:
    schedule = LRSchedule(base_lr=1.0, warmup_steps=2, decay_start=5, decay_steps=4)
    assert schedule.lr(4) == 1.0
    for k in range(4):
        assert schedule.lr(5 + k) == pytest.approx(max(MIN_LR, ((4 - k) / 4) ** 2))
    assert schedule.lr(9) == MIN_LR
    assert schedule.lr(100) == MIN_LR


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_lr": 0.0}, "learning rate"),
        ({"base_lr": 1.0, "warmup_steps": -1}, "warmup_steps"),
        ({"base_lr": 1.0, "warmup_steps": 10, "decay_start": 5, "decay_steps": 3}, "decay_start"),
    ],
)
def test_bad_schedules_are_rejected(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LRSchedule(**kwargs)  # type: ignore[arg-type]
