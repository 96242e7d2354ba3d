"""One optimizer type: every spelling a user may write is parsed once, by parse_optimizer."""

from __future__ import annotations

import enum

import pytest

from shardrec.kernels import FusedOptimizerConfig, OptimizerType, parse_optimizer


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (OptimizerType.ADAM, OptimizerType.ADAM),
        ("sgd", OptimizerType.SGD),
        ("EXACT_SGD", OptimizerType.SGD),
        ("adagrad", OptimizerType.EXACT_ADAGRAD),
        ("exact_row_wise_adagrad", OptimizerType.ROWWISE_ADAGRAD),
        ("RowWise_Adagrad", OptimizerType.ROWWISE_ADAGRAD),
    ],
)
def test_spellings_parse_to_the_enum(name: object, expected: OptimizerType) -> None:
    assert parse_optimizer(name) is expected


def test_an_enum_with_a_value_parses_like_fbgemms() -> None:
    class EmbOptimType(enum.Enum):  # FBGEMM's spelling of its optimizer enum
        EXACT_ROWWISE_ADAGRAD = "exact_row_wise_adagrad"

    assert parse_optimizer(EmbOptimType.EXACT_ROWWISE_ADAGRAD) is OptimizerType.ROWWISE_ADAGRAD


@pytest.mark.parametrize("bad", ["lamb", "", 3, None])
def test_an_unknown_optimizer_is_refused_listing_the_valid_names(bad: object) -> None:
    with pytest.raises(ValueError, match="sgd, exact_adagrad, rowwise_adagrad, adam") as info:
        parse_optimizer(bad)
    assert repr(bad) in str(info.value)


def test_the_fused_config_parses_through_it() -> None:
    config = FusedOptimizerConfig(optimizer="adagrad")  # type: ignore[arg-type]  # a user's string
    assert config.optimizer is OptimizerType.EXACT_ADAGRAD
    params = FusedOptimizerConfig.from_fused_params({"optimizer": "exact_sgd"})
    assert params.optimizer is OptimizerType.SGD
