"""``managed_ids``: the DLRM's tables behind managed ids, fed Criteo's raw ids (no modulo)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from shardrec import KeyedJaggedTensor
from shardrec.modules.mc_collection import managed_table_stats
from shardrec_dlrm.data.schema import SPARSE_KEYS
from shardrec_dlrm.data.synth_drift import synth_drift
from shardrec_dlrm.model.build import build_dlrm
from shardrec_dlrm.model.config import ModelConfig, model_config_from_dict
from shardrec_dlrm.model.managed import ManagedEmbeddingBags

SMALL: dict[str, Any] = {
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


@pytest.mark.parametrize("buckets", [1, 3])
def test_two_processes_train_managed_tables_as_one_does(tmp_path: Path, buckets: int) -> None:
    from shardrec_dlrm.training.config import TrainConfig
    from shardrec_dlrm.training.launch import run_training

    synth_drift(tmp_path / "d", rows=1_400, seed=2, live=16, turnover=3.0)

    def run(nproc: int, batch: int) -> dict[str, float]:
        config = TrainConfig(
            data=str(tmp_path / "d"),
            model=ModelConfig(**SMALL, managed_ids="lru", managed_buckets=buckets),
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


def test_managed_buckets_split_every_table_and_are_saved_with_the_model() -> None:
    model = build_dlrm(ModelConfig(**SMALL, managed_ids="lru", managed_buckets=3))
    sparse = model.model.sparse_arch.embedding_bag_collection
    assert isinstance(sparse, ManagedEmbeddingBags)
    mcc = sparse.managed.managed_collision_collection
    assert {t: len(b) for t, b in mcc.buckets_by_table().items()} == {
        f"t_{k}": 3 for k in SPARSE_KEYS
    }
    assert {layout.num_buckets for layout in mcc.bucket_layouts().values()} == {3}
    config = ModelConfig(**SMALL, managed_ids="lfu", managed_buckets=3)
    assert model_config_from_dict(vars_of(config), source="test").managed_buckets == 3
    # A record written before the option existed holds tables of one bucket.
    older = {k: v for k, v in vars_of(config).items() if k != "managed_buckets"}
    assert model_config_from_dict(older, source="test").managed_buckets == 1


def test_managed_buckets_that_cannot_be_built_are_refused_naming_the_setting(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match="managed_buckets 2 needs managed tables"):
        ModelConfig(**SMALL, managed_buckets=2)
    with pytest.raises(ValueError, match="managed_buckets must be positive, got 0"):
        ModelConfig(**SMALL, managed_ids="lru", managed_buckets=0)
    sizes = (32,) * 5 + (4,) + (32,) * 20
    with pytest.raises(ValueError, match=r"table C6 \(t_cat_5\) of 4 rows.*at most 3"):
        ModelConfig(**SMALL, num_embeddings_per_feature=sizes, managed_ids="lru", managed_buckets=4)

    from click.testing import CliRunner

    from shardrec_dlrm.cli import main

    out = CliRunner().invoke(main, ["train", "--data", str(tmp_path), "--managed-buckets", "2"])
    assert out.exit_code == 2
    assert "managed_buckets 2 needs managed tables" in out.output


def test_dlrm_train_managed_buckets_reach_the_model_and_a_resume_must_keep_them(
    tmp_path: Path,
) -> None:
    import json

    from click.testing import CliRunner

    from shardrec_dlrm.cli import main
    from shardrec_dlrm.training.checkpointing import saved_model_config

    synth_drift(tmp_path / "d", rows=600, seed=3, live=16, turnover=3.0)
    ckpt = tmp_path / "ckpt"
    args = (
        f"train --data {tmp_path / 'd'} --managed-ids lru --no-shuffle --embedding-dim 4"
        " --num-embeddings 32 --dense-arch-layer-sizes 8,4 --over-arch-layer-sizes 8,1"
        " --batch-size 64 --optimizer rowwise_adagrad --learning-rate 0.05 --device cpu"
        f" --limit-train-batches 4 --limit-val-batches 1 --limit-test-batches 1 --quiet"
        f" --checkpoint-dir {ckpt} --checkpoint-every 2"
    ).split()
    out = CliRunner().invoke(main, [*args, "--managed-buckets", "3"])
    assert out.exit_code == 0, out.output
    assert json.loads((ckpt / "run_config.json").read_text())["model"]["managed_buckets"] == 3
    assert saved_model_config(str(ckpt)).managed_buckets == 3
    # The checkpoint holds each table's buckets, one map each.
    key = "_managed_collision_modules.t_cat_0.2._map.slots"
    assert any(key.encode() in f.read_bytes() for f in ckpt.glob("step-*/*") if f.is_file())
    assert not any(
        b"_managed_collision_modules.t_cat_0.3." in f.read_bytes()
        for f in ckpt.glob("step-*/*")
        if f.is_file()
    )
    scored = CliRunner().invoke(
        main, ["evaluate", "--checkpoint", str(ckpt), "--data", str(tmp_path / "d")]
    )
    assert scored.exit_code == 0, scored.output

    refused = CliRunner().invoke(main, [*args, "--resume", "--managed-buckets", "4"])
    assert refused.exit_code != 0
    assert "managed_buckets 3 -> 4" in refused.output, refused.output
    # Left out, the option is its default, 1: that is another model too.
    refused = CliRunner().invoke(main, [*args, "--resume"])
    assert "managed_buckets 3 -> 1" in refused.output, refused.output
    resumed = CliRunner().invoke(main, [*args, "--resume", "--managed-buckets", "3"])
    assert resumed.exit_code == 0, resumed.output
