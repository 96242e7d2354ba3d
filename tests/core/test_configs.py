"""Embedding configs keep TorchRec's names, defaults and meanings, and reject bad sizes early."""

from __future__ import annotations

import math

import pytest
import torch

from shardrec import DataType, EmbeddingBagConfig, EmbeddingConfig, PoolingType
from shardrec.modules.configs import data_type_to_dtype


def test_defaults_match_torchrec() -> None:
    config = EmbeddingBagConfig(num_embeddings=100, embedding_dim=8, name="t", feature_names=["f"])
    assert config.pooling is PoolingType.SUM
    assert config.data_type is DataType.FP32
    assert config.weight_init_max == pytest.approx(math.sqrt(1 / 100))
    assert config.weight_init_min == pytest.approx(-math.sqrt(1 / 100))
    assert config.num_features() == 1
    assert EmbeddingConfig(num_embeddings=3, embedding_dim=2).feature_names == []


def test_positional_order_is_torchrecs() -> None:
    config = EmbeddingBagConfig(10, 4, "t", DataType.FP16, ["a", "b"])
    assert (config.num_embeddings, config.embedding_dim, config.name) == (10, 4, "t")
    assert config.data_type is DataType.FP16
    assert config.num_features() == 2


def test_enums_are_str_enums() -> None:
    assert PoolingType("MEAN") is PoolingType.MEAN
    assert PoolingType.NONE == "NONE"
    assert DataType.BF16 == "BF16"
    assert data_type_to_dtype(DataType.FP16) is torch.float16
    assert data_type_to_dtype(DataType.BF16) is torch.bfloat16


def test_default_init_fn_draws_within_bounds() -> None:
    config = EmbeddingBagConfig(num_embeddings=16, embedding_dim=64, name="t", feature_names=["f"])
    weight = torch.full((16, 64), 99.0)
    assert config.init_fn is not None
    config.init_fn(weight)
    assert float(weight.abs().max()) <= 0.25
    assert float(weight.std()) > 0.05


def test_custom_init_bounds_are_used() -> None:
    config = EmbeddingConfig(
        num_embeddings=4, embedding_dim=3, name="t", weight_init_min=1.0, weight_init_max=1.0
    )
    weight = torch.zeros(4, 3)
    assert config.init_fn is not None
    config.init_fn(weight)
    assert torch.equal(weight, torch.ones(4, 3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_embeddings": 0, "embedding_dim": 4}, "num_embeddings of table 'bad' must be >= 1"),
        ({"num_embeddings": 4, "embedding_dim": 0}, "embedding_dim of table 'bad' must be >= 1"),
        ({"num_embeddings": -3, "embedding_dim": 4}, "num_embeddings"),
    ],
)
def test_sizes_below_one_are_rejected(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EmbeddingBagConfig(name="bad", feature_names=["f"], **kwargs)


def test_non_int_size_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="embedding_dim of table 'x' must be an int"):
        EmbeddingConfig(num_embeddings=4, embedding_dim=2.5, name="x")  # type: ignore[arg-type]


def test_bad_pooling_and_data_type_are_named() -> None:
    with pytest.raises(ValueError, match="pooling of table 't'"):
        EmbeddingBagConfig(4, 2, "t", pooling="MAX")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="data_type of table 't'"):
        EmbeddingBagConfig(4, 2, "t", data_type="INT3")  # type: ignore[arg-type]


def test_inverted_init_bounds_are_rejected() -> None:
    with pytest.raises(ValueError, match="weight_init_min"):
        EmbeddingConfig(4, 2, "t", weight_init_min=1.0, weight_init_max=0.0)
