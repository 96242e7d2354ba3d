"""``dlrm evaluate`` holds the tables once: it builds them shard by shard (never whole first), has
and reads no optimizer state, and reads the checkpoint's weights straight into the model's own
tensors (no copy of a table is made), after verifying the checkpoint as before."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner

import shardrec_dlrm.training.evaluate as evaluate_module
import shardrec_dlrm.training.sharding as sharding_module
from shardrec.distributed.checkpoint import SafeFileSystemReader
from shardrec.testing import Allocation, record_allocations
from shardrec_dlrm.cli import main
from shardrec_dlrm.training.evaluate import EvaluateConfig, evaluate

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "tests" / "data" / "criteo_sample" / "criteo_sample.txt"
ROWS, DIM = 2000, 8
TABLE_BYTES = ROWS * DIM * 4
MODEL = (
    f"--embedding-dim {DIM} --num-embeddings {ROWS} --dense-arch-layer-sizes 8,{DIM} "
    "--over-arch-layer-sizes 8,1 --val-fraction 0.2 --test-fraction 0.2 --device cpu"
).split()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained with exact Adagrad (fused state as large as the tables, and dense state)."""
    root = tmp_path_factory.mktemp("eval_memory") / "ckpt"
    args = ["train", "--data", str(SAMPLE), *MODEL, "--optimizer", "adagrad", "--quiet"]
    args += ["--batch-size", "32", "--checkpoint-dir", str(root)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return root


def test_evaluate_reads_weights_only_straight_into_the_model(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[dict[str, Any]] = []
    runs: list[Any] = []
    real_build = getattr(sharding_module, "build_dlrm")  # noqa: B009 (not in its __all__)
    real_shard = getattr(evaluate_module, "shard_model")  # noqa: B009

    def recording_build(*args: Any, **kwargs: Any) -> Any:
        built.append(kwargs)
        return real_build(*args, **kwargs)

    def recording_shard(*args: Any, **kwargs: Any) -> Any:
        runs.append(real_shard(*args, **kwargs))
        return runs[-1]

    monkeypatch.setattr(sharding_module, "build_dlrm", recording_build)
    monkeypatch.setattr(evaluate_module, "shard_model", recording_shard)

    read: list[str] = []
    into_model: list[bool] = []
    real_read = SafeFileSystemReader.read_data

    def recording_read(self: SafeFileSystemReader, plan: LoadPlan, planner: LoadPlanner) -> Any:
        spans = []
        for module in runs[-1].model.modules():
            for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                start = t.untyped_storage().data_ptr()
                spans.append((start, start + t.untyped_storage().nbytes()))
        for item in plan.items:
            read.append(item.dest_index.fqn)
            if item.type == LoadItemType.TENSOR:
                ptr = planner.resolve_tensor(item).data_ptr()
                into_model.append(any(lo <= ptr < hi for lo, hi in spans))
        return real_read(self, plan, planner)

    monkeypatch.setattr(SafeFileSystemReader, "read_data", recording_read)
    copies: list[Allocation] = []
    real_load = getattr(evaluate_module, "load_for_evaluation")  # noqa: B009

    def watched_load(*args: Any, **kwargs: Any) -> int:
        with record_allocations(TABLE_BYTES) as seen:
            step: int = real_load(*args, **kwargs)
        copies.extend(seen)
        return step

    monkeypatch.setattr(evaluate_module, "load_for_evaluation", watched_load)
    config = EvaluateConfig(checkpoint=str(checkpoint), data=str(SAMPLE), device="cpu")
    result = evaluate(config)

    [kwargs] = built
    assert kwargs["embedding_device"].type == "meta"  # not built whole, then sharded
    model = runs[-1].model
    lookups = [m for m in model.modules() if hasattr(m, "optimizer_states")]
    assert lookups, "no lookup found"
    for lookup in lookups:
        assert all(not s for s in lookup.optimizer_states().values())  # no optimizer state built
    tables = [k for k in read if k.startswith("model.") and "embedding_bags" in k]
    assert len(tables) == 26
    assert not [k for k in read if not k.startswith("model.")]  # no optimizer state read
    assert into_model
    assert all(into_model)  # every tensor read lands in the model's memory
    assert copies == []  # and no table-sized copy was made on the way
    assert 0.0 <= result.metrics["auc"] <= 1.0


def test_in_place_load_gives_the_model_the_default_load_gives(checkpoint: Path) -> None:
    from shardrec.distributed.checkpoint import load
    from shardrec_dlrm.training.checkpointing import saved_model_config
    from shardrec_dlrm.training.config import TrainConfig
    from shardrec_dlrm.training.parallel import ParallelState

    config = TrainConfig(data=str(SAMPLE), model=saved_model_config(str(checkpoint)), device="cpu")
    state = ParallelState.init("cpu")
    try:
        fresh = sharding_module.shard_model(config, state)
        load(checkpoint, fresh.model)
        in_place = sharding_module.shard_model(config, state, weights_to_load=True)
        load(checkpoint, in_place.model, in_place=True)
        a, b = fresh.model.state_dict(), in_place.model.state_dict()
        assert a.keys() == b.keys()
        for key in a:
            left, right = a[key], b[key]
            if hasattr(left, "local_shards"):
                left, right = left.local_shards()[0].tensor, right.local_shards()[0].tensor
            assert torch.equal(left, right), key
    finally:
        state.close()
