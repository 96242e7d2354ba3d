"""``--comm-precision``: pooled embeddings and their gradients travel in bf16 or fp16 between the
ranks. A short run on ``dlrm synth`` data at 2 processes must validate within 0.001 AUC of the
same run in fp32 (the per-element error bound is proved in tests/sharders/test_comm_precision.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from shardrec_dlrm.cli import main
from shardrec_dlrm.data import synth
from shardrec_dlrm.model.config import ModelConfig
from shardrec_dlrm.training.config import CommPrecision, TrainConfig
from shardrec_dlrm.training.launch import run_training

# Row-wise: the reduce-scatter path (partial sums added on the receiver in fp32).
MODEL = ModelConfig(
    embedding_dim=16,
    num_embeddings=1000,
    dense_arch_layer_sizes=(32, 16),
    over_arch_layer_sizes=(32, 1),
)


def run(data: Path, precision: CommPrecision) -> dict[str, float]:
    config = TrainConfig(
        data=str(data),
        model=MODEL,
        batch_size=128,
        learning_rate=0.5,
        val_fraction=0.2,
        sharding="row_wise",
        device="cpu",
        comm_precision=precision,
        quiet=True,
    )
    return run_training(config, nproc=2)


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    data = tmp_path_factory.mktemp("synth")
    synth(data, rows=100_000, seed=1)
    return data, run(data, "fp32")


@pytest.mark.multiprocess
@pytest.mark.parametrize("precision", ["bf16"])
def test_validation_auc_within_0_001_of_fp32(
    fp32_run: tuple[Path, dict[str, float]], precision: CommPrecision
) -> None:
    data, fp32 = fp32_run
    compressed = run(data, precision)
    assert fp32["val/auc"] > 0.65, "the fp32 run learned nothing: the comparison proves nothing"
    assert abs(compressed["val/auc"] - fp32["val/auc"]) <= 0.001, (fp32, compressed)
    assert fp32 != compressed, "the compressed run trained exactly as fp32: nothing was compressed"


def test_comm_precision_is_checked() -> None:
    with pytest.raises(ValueError, match="comm_precision must be one of fp32, fp16, bf16"):
        TrainConfig(data=".", comm_precision="int8")  # type: ignore[arg-type]


def test_the_option_reaches_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import shardrec_dlrm.training.launch

    seen: list[TrainConfig] = []
    monkeypatch.setattr(
        shardrec_dlrm.training.launch,
        "run_training",
        lambda config, nproc: seen.append(config) or {},
    )
    train = ["train", "--data", str(tmp_path), "--comm-precision"]
    result = CliRunner().invoke(main, [*train, "bf16"])
    assert result.exit_code == 0, result.output
    assert seen[0].comm_precision == "bf16"
    bad = CliRunner().invoke(main, [*train, "int8"])
    assert bad.exit_code == 2
    assert "'int8' is not one of 'fp32', 'fp16', 'bf16'" in bad.output
