"""Checkpoint files: atomic saves (a killed save leaves the last one loadable), ``latest``, no
unpickling of code at load, the dense optimizer's state, and errors that name what is wrong."""

from __future__ import annotations

import inspect
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from shardrec.distributed.checkpoint import (
    CheckpointError,
    latest,
    load,
    read_sidecar,
    save,
    step_dir,
)
from shardrec.modules import EmbeddingBagCollection
from shardrec.modules.configs import EmbeddingBagConfig

from ._checkpoint_helpers import assert_same, make_model, reseal, snapshot


def test_round_trip_with_fused_and_dense_optimizer_state(tmp_path: Path) -> None:
    model = make_model(0)
    opt = torch.optim.Adam(model.top.parameters(), lr=0.01, betas=(0.8, 0.9))
    model.top(torch.randn(4, 12)).sum().backward()
    opt.step()
    path = save(tmp_path, model, step=5, optimizer=opt)
    assert path == step_dir(tmp_path, 5)
    assert read_sidecar(path)["step"] == 5

    fresh = make_model(1)
    fresh_opt = torch.optim.Adam(fresh.top.parameters(), lr=0.5)
    assert load(tmp_path, fresh, optimizer=fresh_opt) == 5
    assert_same(snapshot(model), snapshot(fresh))
    saved_state, loaded_state = opt.state_dict(), fresh_opt.state_dict()
    assert loaded_state["param_groups"][0]["lr"] == 0.01
    assert tuple(loaded_state["param_groups"][0]["betas"]) == (0.8, 0.9)
    for i in saved_state["state"]:
        for name, value in saved_state["state"][i].items():
            assert torch.equal(
                torch.as_tensor(value), torch.as_tensor(loaded_state["state"][i][name])
            )


def test_latest_picks_the_highest_complete_step(tmp_path: Path) -> None:
    assert latest(tmp_path) is None
    model = make_model(0)
    save(tmp_path, model, step=2)
    save(tmp_path, model, step=10)
    (tmp_path / ".tmp-step-00000011").mkdir()  # a save in progress is never picked
    (tmp_path / "step-00000012").mkdir()  # nor a directory without metadata
    assert latest(tmp_path) == tmp_path / "step-00000010"
    # Saving the same step again replaces it whole.
    with torch.no_grad():
        model.top.bias.fill_(3.0)
    save(tmp_path, model, step=10)
    fresh = make_model(1)
    load(tmp_path, fresh)
    assert torch.equal(fresh.top.bias.detach(), torch.full((1,), 3.0))


def test_wrong_config_fails_before_any_weight_changes(tmp_path: Path) -> None:
    save(tmp_path, make_model(0), step=1)
    configs = [
        EmbeddingBagConfig(num_embeddings=50, embedding_dim=6, name="t0", feature_names=["f0"]),
        EmbeddingBagConfig(num_embeddings=30, embedding_dim=4, name="t2", feature_names=["f1"]),
    ]
    other = nn.Sequential()
    other.add_module("ebc", EmbeddingBagCollection(configs, fused_params={"optimizer": "sgd"}))
    other.add_module("top", nn.Linear(10, 1))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load(tmp_path, other)
    msg = str(err.value)
    assert "'t0'" in msg
    assert "(50, 8)" in msg  # the checkpoint's shape
    assert "(50, 6)" in msg  # the model's shape
    assert "'t2'" in msg
    assert "missing" in msg
    assert "ebc.embedding_bags.t1.weight is in checkpoint" in msg
    for k, v in other.state_dict().items():
        assert torch.equal(before[k], v), k


def test_not_a_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load(tmp_path, make_model(0))


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned > pwned.txt",))


def test_metadata_that_would_run_code_is_refused(tmp_path: Path) -> None:
    path = save(tmp_path, make_model(0), step=1)
    (path / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(CheckpointError, match=r"\.metadata: wrong size"):
        load(tmp_path, make_model(1))  # verification sees the change first...
    reseal(path)  # ...and a forger who recomputes the checksums meets the allow-list
    with pytest.raises(CheckpointError, match=r"refusing to unpickle (posix|os|nt)\.system"):
        load(tmp_path, make_model(1))
    assert not (Path.cwd() / "pwned.txt").exists()


_CHILD = textwrap.dedent(
    """
    import time, torch
    import torch.distributed.checkpoint.filesystem as fs
    from torch import nn
    from shardrec.distributed.checkpoint import save
    from shardrec.modules import EmbeddingBagCollection
    from shardrec.modules.configs import EmbeddingBagConfig
    {make_model}

    root = {root!r}
    model = make_model(0)
    save(root, model, step=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    real = fs._write_item

    def write_then_hang(*args, **kwargs):
        result = real(*args, **kwargs)
        print("WROTE ONE ITEM", flush=True)
        time.sleep(120)
        return result

    fs._write_item = write_then_hang
    save(root, model, step=2)
    print("SAVE FINISHED", flush=True)
    """
)


def test_killed_save_leaves_previous_checkpoint_loadable(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    script = tmp_path / "child.py"
    # The child builds the same model as this file: its source travels with the script.
    source = inspect.getsource(make_model)
    script.write_text(_CHILD.format(root=str(root), make_model=source))
    with subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
            assert line.strip() == "WROTE ONE ITEM", child.stderr.read() if child.stderr else line
            os.kill(child.pid, signal.SIGKILL)  # midway through writing step 2
        finally:
            child.wait(timeout=60)
    assert (root / ".tmp-step-00000002").is_dir()  # the half-written save is there...
    assert latest(root) == root / "step-00000001"  # ...but never taken for a checkpoint
    fresh = make_model(7)
    assert load(root, fresh) == 1
    assert_same(snapshot(make_model(0)), snapshot(fresh))
    # The next save of that step clears the debris and completes.
    save(root, fresh, step=2)
    assert latest(root) == root / "step-00000002"
    assert not (root / ".tmp-step-00000002").exists()


def test_crash_inside_a_resave_of_the_same_step_keeps_the_old_one(tmp_path: Path) -> None:
    model = make_model(0)
    save(tmp_path, model, step=4)
    # A re-save of step 4 moves the old directory aside just before putting the new one in place;
    # a crash in between leaves only the old one, under its temporary name.
    (tmp_path / "step-00000004").rename(tmp_path / ".old-step-00000004")
    assert latest(tmp_path) == tmp_path / ".old-step-00000004"
    fresh = make_model(3)
    assert load(tmp_path, fresh) == 4
    assert_same(snapshot(model), snapshot(fresh))
    save(tmp_path, fresh, step=4)
    assert latest(tmp_path) == tmp_path / "step-00000004"
    assert not (tmp_path / ".old-step-00000004").exists()
