"""``managed_ids``: the DLRM's tables behind managed ids, fed Criteo's raw ids (no modulo)."""

from __future__ import annotations

from pathlib import Path

import torch

from shardrec import KeyedJaggedTensor
from shardrec.modules.mc_collection import managed_table_stats
from shardrec_dlrm.data.schema import SPARSE_KEYS
from shardrec_dlrm.data.synth_drift import synth_drift
from shardrec_dlrm.model.build import build_dlrm
from shardrec_dlrm.model.config import ModelConfig, model_config_from_dict
from shardrec_dlrm.model.managed import ManagedEmbeddingBags

SMALL = {
    "embedding_dim": 4,
    "num_embeddings": 32,
    "dense_arch_layer_sizes": (8, 4),
    "over_arch_layer_sizes": (8, 1),
}


def test_raw_32_bit_ids_get_rows_of_their_own() -> None:
    model = build_dlrm(ModelConfig(**SMALL, managed_ids="lru"))
    sparse = model.model.sparse_arch.embedding_bag_collection
    assert isinstance(sparse, ManagedEmbeddingBags)
    batch = 3
    ids = torch.tensor([0, 1 + 0xFFFFFFFF, 1 + 0x1234ABCD] * len(SPARSE_KEYS))
    kjt = KeyedJaggedTensor(
        keys=list(SPARSE_KEYS), values=ids, lengths=torch.ones(ids.numel(), dtype=torch.int32)
    )
    loss, logits = model(torch.zeros(batch, 13), kjt, torch.ones(batch))
    loss.backward()
    assert logits.shape == (batch,)
    stats = managed_table_stats(model)
    assert set(stats) == {f"t_{k}" for k in SPARSE_KEYS}
    assert all(s.admitted_total == 3 and s.occupancy == 3 for s in stats.values())


def test_the_setting_is_part_of_the_saved_model_config() -> None:
    config = ModelConfig(**SMALL, managed_ids="lfu")
    raw = {k: list(v) if isinstance(v, tuple) else v for k, v in vars_of(config).items()}
    assert model_config_from_dict(raw, source="test").managed_ids == "lfu"


def vars_of(config: ModelConfig) -> dict[str, object]:
    import dataclasses

    return dataclasses.asdict(config)


def test_dlrm_train_with_managed_ids_logs_each_tables_counters(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from shardrec_dlrm.cli import main

    synth_drift(tmp_path / "d", rows=1_400, seed=1, live=16, turnover=3.0)
    args = (
        f"train --data {tmp_path / 'd'} --managed-ids lru --no-shuffle --embedding-dim 4"
        " --num-embeddings 32 --dense-arch-layer-sizes 8,4 --over-arch-layer-sizes 8,1"
        f" --batch-size 64 --optimizer rowwise_adagrad --learning-rate 0.05 --device cpu"
        f" --log-every 5 --quiet --logdir {tmp_path / 'tb'}"
    )
    out = CliRunner().invoke(main, args.split())
    assert out.exit_code == 0, out.output
    assert "val: auc=" in out.output
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for counter in ("occupancy", "occupancy_fraction", "admitted_total", "evicted_total"):
        assert f"managed/t_cat_2/{counter}" in tags
    occupancy = [e.value for e in events.Scalars("managed/t_cat_2/occupancy")]
    assert occupancy[-1] == 31.0  # 63 ids pass through a table of 31 rows: it is full
    assert [e.value for e in events.Scalars("managed/t_cat_2/evicted_total")][-1] > 0


def test_the_watch_names_each_tables_counters_and_warns_once_when_full() -> None:
    from shardrec_dlrm.training.managed_metrics import ManagedWatch

    model = build_dlrm(ModelConfig(**SMALL, managed_ids="lru"))
    watch = ManagedWatch()
    metrics, warnings = watch.read(model)
    assert metrics["managed/t_cat_0/occupancy"] == 0.0
    assert len(metrics) == 26 * 6
    assert warnings == []
    # One batch with more distinct ids than a table's 31 rows: the rest are rejected.
    batch = 40
    ids = torch.arange(1, batch * len(SPARSE_KEYS) + 1)
    kjt = KeyedJaggedTensor(
        keys=list(SPARSE_KEYS), values=ids, lengths=torch.ones(ids.numel(), dtype=torch.int32)
    )
    model(torch.zeros(batch, 13), kjt, torch.ones(batch))
    metrics, warnings = watch.read(model)
    assert metrics["managed/t_cat_0/occupancy_fraction"] == 1.0
    assert metrics["managed/t_cat_0/rejected_total"] == batch - 31
    assert len(warnings) == 26
    assert "managed table t_cat_0 is full: 9 lookup(s)" in warnings[0]
    assert watch.read(model)[1] == []  # said once per table
    assert ManagedWatch().read(build_dlrm(ModelConfig(**SMALL))) == ({}, [])


def test_two_processes_train_managed_tables_as_one_does(tmp_path: Path) -> None:
    from shardrec_dlrm.training.config import TrainConfig
    from shardrec_dlrm.training.launch import run_training

    synth_drift(tmp_path / "d", rows=1_400, seed=2, live=16, turnover=3.0)

    def run(nproc: int, batch: int) -> dict[str, float]:
        config = TrainConfig(
            data=str(tmp_path / "d"),
            model=ModelConfig(**SMALL, managed_ids="lru"),
            batch_size=batch,
            optimizer="rowwise_adagrad",
            learning_rate=0.05,
            shuffle=False,
            limit_train_batches=8,
            quiet=True,
            device="cpu",
            pipeline=False,
        )
        return run_training(config, nproc=nproc)

    # The same global batches of 128 samples: 1 x 128 and 2 x 64.
    one, two = run(1, 128), run(2, 64)
    # Sums over other numbers of ranks round differently: log losses agree to float rounding,
    # AUCs (100 rows per split, a pair is 5e-4) up to a few pairs whose order flips.
    for split in ("val", "test"):
        assert abs(one[f"{split}/log_loss"] - two[f"{split}/log_loss"]) < 1e-4, split
        assert abs(one[f"{split}/auc"] - two[f"{split}/auc"]) < 2e-3, split
