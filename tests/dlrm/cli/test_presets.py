"""``--preset mlperf-dcnv2``: the MLPerf DLRMv2 recipe as defaults that any option overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from shardrec_dlrm.cli import main
from shardrec_dlrm.data.multihot_lookup import MLPERF_NUM_EMBEDDINGS
from shardrec_dlrm.training.config import TrainConfig


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[TrainConfig]:
    import shardrec_dlrm.training.launch

    seen: list[TrainConfig] = []

    def fake_run(config: TrainConfig, **_: Any) -> None:
        seen.append(config)

    monkeypatch.setattr(shardrec_dlrm.training.launch, "run_training", fake_run)
    return seen


def test_train_preset_sets_the_mlperf_recipe(tmp_path: Path, captured: list[TrainConfig]) -> None:
    result = CliRunner().invoke(
        main, ["train", "--data", str(tmp_path), "--preset", "mlperf-dcnv2"]
    )
    assert result.exit_code == 0, result.output
    (config,) = captured
    model = config.model
    assert model.embedding_dim == 128
    assert model.num_embeddings_per_feature == MLPERF_NUM_EMBEDDINGS
    assert sum(MLPERF_NUM_EMBEDDINGS) == 204_184_588
    assert model.dense_arch_layer_sizes == (512, 256, 128)
    assert model.over_arch_layer_sizes == (1024, 1024, 512, 256, 1)
    assert (model.interaction_type, model.dcn_num_layers, model.dcn_low_rank_dim) == ("dcn", 3, 512)
    assert (config.optimizer, config.learning_rate, config.eps) == ("adagrad", 0.004, 1e-8)
    assert config.batch_size * 8 == 65_536
    assert config.validation_freq == 3_200
    assert config.epochs == 1


def test_options_override_the_preset(tmp_path: Path, captured: list[TrainConfig]) -> None:
    args = ["train", "--data", str(tmp_path), "--learning-rate", "0.01", "--preset", "mlperf-dcnv2"]
    result = CliRunner().invoke(main, [*args, "--batch-size", "4096", "--embedding-dim", "64",
                                       "--dense-arch-layer-sizes", "512,256,64"])  # fmt: skip
    assert result.exit_code == 0, result.output
    (config,) = captured
    assert (config.learning_rate, config.batch_size, config.model.embedding_dim) == (0.01, 4096, 64)
    assert config.model.dcn_low_rank_dim == 512  # the rest stays the preset's
    # a TOML config given with it wins over the preset too
    toml = tmp_path / "run.toml"
    toml.write_text("[train]\noptimizer = 'rowwise_adagrad'\n")
    both = ["train", "--data", str(tmp_path), "--preset", "mlperf-dcnv2", "--config", str(toml)]
    assert CliRunner().invoke(main, both).exit_code == 0
    assert captured[-1].optimizer == "rowwise_adagrad"
    assert captured[-1].model.embedding_dim == 128


def test_num_embeddings_given_replaces_the_preset_table_sizes(
    tmp_path: Path, captured: list[TrainConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = ["train", "--data", str(tmp_path), "--preset", "mlperf-dcnv2"]
    toml = tmp_path / "run.toml"
    toml.write_text("[train]\nnum_embeddings = 300\n")
    for extra in (["--num-embeddings", "100"], ["--config", str(toml)]):
        result = CliRunner().invoke(main, [*base, *extra])
        assert result.exit_code == 0, result.output
        assert captured[-1].model.num_embeddings_per_feature is None
    assert [c.model.num_embeddings for c in captured] == [100, 300]
    monkeypatch.setenv("DLRM_TRAIN_NUM_EMBEDDINGS", "200")
    assert CliRunner().invoke(main, base).exit_code == 0
    assert (captured[-1].model.num_embeddings, captured[-1].model.num_embeddings_per_feature) == (
        200,
        None,
    )
    monkeypatch.delenv("DLRM_TRAIN_NUM_EMBEDDINGS")
    # per-table sizes given too still win over --num-embeddings, from the command line or a file
    sizes = ",".join(["7"] * 26)
    result = CliRunner().invoke(main, [*base, "--num-embeddings", "100",
                                       "--num-embeddings-per-feature", sizes])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert captured[-1].model.num_embeddings_per_feature == (7,) * 26
    toml.write_text(f"[train]\nnum_embeddings_per_feature = '{sizes}'\n")
    preset = base[3:]
    for order in (["--config", str(toml), *preset], [*preset, "--config", str(toml)]):
        args = ["train", "--data", str(tmp_path), *order, "--num-embeddings", "100"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert captured[-1].model.num_embeddings_per_feature == (7,) * 26
    # without --num-embeddings the preset's sizes stay
    assert CliRunner().invoke(main, base).exit_code == 0
    assert captured[-1].model.num_embeddings_per_feature == MLPERF_NUM_EMBEDDINGS


def test_plan_preset_takes_num_embeddings() -> None:
    args = ["plan", "--preset", "mlperf-dcnv2", "--world-size", "1", "--num-embeddings", "1000"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    # the preset's dimension, the given rows: 26 tables of 1000x128 (the preset's 40M rows would
    # not fit one rank)
    assert result.output.count(" 1000x128 ") == 26


def test_unknown_preset_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["train", "--data", str(tmp_path), "--preset", "mlperf"])
    assert result.exit_code == 2
    assert "mlperf-dcnv2" in result.output


@pytest.mark.parametrize("world_size", [8, 64])
def test_plan_preset_prints_a_plan_with_memory_per_rank(world_size: int) -> None:
    result = CliRunner().invoke(
        main,
        ["plan", "--preset", "mlperf-dcnv2", "--world-size", str(world_size), "--hbm-gib", "80"],
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"{world_size} ranks" in lines[0]
    assert "batch 8192 per rank" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("rank  HBM (GiB)"))
    ranks = [line.split() for line in lines[header + 2 : header + 2 + world_size]]
    hbm_gib = sum(float(r[1]) + float(r[2]) for r in ranks)
    # the 40M-capped fp32 tables are 97.4 GiB and exact Adagrad keeps as much again: the ranks
    # together must hold at least both
    weights_gib = sum(MLPERF_NUM_EMBEDDINGS) * 128 * 4 / 2**30
    assert hbm_gib >= 2 * weights_gib
    assert all(float(r[1]) <= 68.0 for r in ranks)  # 80 GiB less the planner's reserve
