"""The CPU batch check one feature at a time (features of unequal id counts) flags exactly what the
one-pass check over per-id limits flags: an id below 0 or at its table's size, in any feature."""

from __future__ import annotations

import pytest
import torch

from shardrec.kernels import input_checks
from shardrec.kernels.input_checks import BatchChecker

ROWS = [5, 1, 40, 7]
LPK = [3, 0, 9, 2]  # unequal, one feature without ids


def checker() -> BatchChecker:
    names = [f"f{i}" for i in range(len(ROWS))]
    return BatchChecker("test", names, [f"t{i}" for i in range(len(ROWS))], ROWS)


def good_values(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randint(0, r, (n,), generator=gen) for r, n in zip(ROWS, LPK, strict=True)]
    return torch.cat(parts)


def flag(values: torch.Tensor, per_feature: bool, monkeypatch: pytest.MonkeyPatch) -> bool:
    monkeypatch.setattr(input_checks, "_PER_FEATURE_MAX", 128 if per_feature else 0)
    lengths = torch.ones(sum(LPK), dtype=torch.int64)
    return bool(checker().problem_flag(values, lengths, LPK))


@pytest.mark.parametrize("per_feature", [True, False])
def test_good_batches_pass(per_feature: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    for seed in range(5):
        assert not flag(good_values(seed), per_feature, monkeypatch)


@pytest.mark.parametrize("per_feature", [True, False])
@pytest.mark.parametrize("bad", ["negative", "at_size"])
def test_each_features_bad_id_is_flagged(
    per_feature: bool, bad: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = 0
    for f, n in enumerate(LPK):
        for position in range(n):
            values = good_values(f)
            values[start + position] = -1 if bad == "negative" else ROWS[f]
            assert flag(values, per_feature, monkeypatch), (f, position)
        start += n


def test_the_per_feature_check_runs_for_few_cpu_features(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = torch.Tensor.aminmax

    def counted(self: torch.Tensor, *args: object, **kwargs: object) -> object:
        calls["n"] += 1
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.Tensor, "aminmax", counted)
    assert not flag(good_values(0), True, monkeypatch)
    assert calls["n"] == sum(1 for n in LPK if n)
    calls["n"] = 0
    assert not flag(good_values(0), False, monkeypatch)
    assert calls["n"] == 0
