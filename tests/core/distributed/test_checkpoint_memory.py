"""A save writes the model's own memory (no copy of a table or its optimizer state is made), and a
load with ``in_place=True`` reads straight into the model: the state is never held twice.

Tables of one lookup live in one storage, so each table (and each table's Adagrad ``sum``) is a
view into a larger storage: the case where DCP's writer used to clone every tensor and keep the
clones until the file was written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from shardrec.distributed.checkpoint import CorruptCheckpointError, load, save
from shardrec.distributed.checkpoint.save_planner import exact_storage
from shardrec.modules import EmbeddingBagCollection
from shardrec.modules.configs import EmbeddingBagConfig
from shardrec.testing import record_allocations

ROWS, DIM = 300, 16
TABLE_BYTES = ROWS * DIM * 4


def make_model(seed: int) -> nn.Module:
    """Three tables of one shape (one lookup group, one storage), exact Adagrad, a dense layer."""
    torch.manual_seed(seed)
    configs = [
        EmbeddingBagConfig(
            num_embeddings=ROWS, embedding_dim=DIM, name=f"t{i}", feature_names=[f"f{i}"]
        )
        for i in range(3)
    ]
    ebc = EmbeddingBagCollection(configs, fused_params={"optimizer": "adagrad"})
    model = nn.Sequential()
    model.add_module("ebc", ebc)
    model.add_module("top", nn.Linear(3 * DIM, 1))
    ebc.reset_parameters()
    with torch.no_grad():
        for states in ebc.lookup.optimizer_states().values():
            for t in states.values():
                t.uniform_(0, 1)
    return model


def table_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every table's weight and optimizer state (views into the lookup's storages)."""
    lookup: Any = model.get_submodule("ebc").lookup
    out = {f"{k}.weight": v for k, v in lookup.table_weights().items()}
    for table, states in lookup.optimizer_states().items():
        out |= {f"{table}.{name}": t for name, t in states.items()}
    return out


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.untyped_storage().data_ptr()
    return start, start + t.untyped_storage().nbytes()


def test_exact_storage_shares_memory_and_owns_exactly_its_bytes() -> None:
    flat = torch.arange(40, dtype=torch.float32)
    view = flat[8:20].view(3, 4)
    alias = exact_storage(view)
    assert alias.untyped_storage().nbytes() == view.nbytes
    assert alias.data_ptr() == view.data_ptr()
    assert torch.equal(alias, view)
    del flat, view
    assert torch.equal(alias, torch.arange(8, 20, dtype=torch.float32).view(3, 4))
    column = torch.zeros(4, 4)[:, 1]  # not one byte range: left as it is
    assert exact_storage(column) is column


def test_save_writes_the_models_memory_without_copying_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_model(0)
    tables = table_tensors(model)
    assert all(t.untyped_storage().nbytes() > t.nbytes for t in tables.values())  # views
    spans = {_span(t) for t in tables.values()}
    written: list[torch.Tensor] = []
    real_save = torch.save

    def recording_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(obj, torch.Tensor):
            written.append(obj)
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", recording_save)
    with record_allocations(TABLE_BYTES) as copies:
        save(tmp_path, model, step=1)
    monkeypatch.undo()
    assert copies == []
    # Every table tensor written is the model's memory itself, and owns exactly its bytes (so
    # torch.save writes no more than the table).
    table_sized = [t for t in written if t.nbytes == TABLE_BYTES]
    assert len(table_sized) == len(tables) == 6
    for t in table_sized:
        assert t.untyped_storage().nbytes() == t.nbytes
        assert any(lo <= t.data_ptr() < hi for lo, hi in spans), "a copy was written"

    fresh = make_model(1)
    assert load(tmp_path, fresh) == 1
    for key, value in table_tensors(fresh).items():
        assert torch.equal(value, tables[key]), key


def test_load_in_place_reads_into_the_model_without_a_second_copy(tmp_path: Path) -> None:
    saved = make_model(0)
    save(tmp_path, saved, step=3)
    fresh = make_model(1)
    before = {k: v.data_ptr() for k, v in table_tensors(fresh).items()}
    with record_allocations(TABLE_BYTES) as copies:
        assert load(tmp_path, fresh, in_place=True) == 3
    assert copies == []
    after = table_tensors(fresh)
    assert {k: v.data_ptr() for k, v in after.items()} == before
    for key, value in table_tensors(saved).items():
        assert torch.equal(after[key], value), key
    for a, b in zip(saved.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_default_load_reads_into_fresh_tensors(tmp_path: Path) -> None:
    """The guarantee ``in_place`` gives up: without it, the weights are read into a copy first."""
    save(tmp_path, make_model(0), step=3)
    with record_allocations(TABLE_BYTES) as copies:
        load(tmp_path, make_model(1))
    assert len(copies) >= 6


def test_load_in_place_still_verifies_before_reading(tmp_path: Path) -> None:
    path = save(tmp_path, make_model(0), step=3)
    data = next(path.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[-100] ^= 0xFF
    data.write_bytes(bytes(raw))
    fresh = make_model(1)
    before = {k: v.clone() for k, v in table_tensors(fresh).items()}
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        load(tmp_path, fresh, in_place=True)
    for key, value in table_tensors(fresh).items():
        assert torch.equal(value, before[key]), key
