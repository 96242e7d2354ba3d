"""``dlrm train`` on two machines of two processes, played on this one: two ``torchrun --nnodes 2
--nproc-per-node 2`` invocations (node ranks 0 and 1, one rendezvous port) with grid sharding, whose
tables are cut across the nodes and within them. The trainer takes its node layout from core
(``LOCAL_WORLD_SIZE`` through ``NodeLayout``), so the plan must say 2 ranks per host; the run must
train what one process trains on the same global batches: the same final weights and test AUC."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from shardrec_dlrm.cli import main

from .test_train import DLRM, SAMPLE, summary_metrics, words

pytestmark = pytest.mark.multiprocess

NODES, PER_NODE = 2, 2
TIMEOUT_S = 300
#: 120 training rows in global batches of 16: 7 steps. Dimension 16 is the least the planner cuts
#: into column blocks (two of its minimum 8), one block per node.
MODEL = words(
    "--embedding-dim 16 --num-embeddings 64 --dense-arch-layer-sizes 8,16 --over-arch-layer-sizes"
    " 8,1 --val-fraction 0.2 --test-fraction 0.2 --device cpu --learning-rate 0.1 --quiet"
)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node(rank: int, port: int, args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*TORCHRUN, "--nnodes", str(NODES), "--nproc-per-node", str(PER_NODE),
         "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
         "--no-python", str(DLRM), "train", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def _weights(ckpt: Path, step: int) -> dict[str, torch.Tensor]:
    from shardrec.distributed.checkpoint import load
    from shardrec_dlrm.model.build import build_dlrm
    from shardrec_dlrm.training.checkpointing import saved_model_config

    model = build_dlrm(saved_model_config(str(ckpt)))
    assert load(ckpt / f"step-{step:08d}", model) == step
    return dict(model.state_dict())


def _plan_text(logdir: Path) -> str:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events: Any = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    events.Reload()
    tag = next(t for t in events.Tags()["tensors"] if t.startswith("sharding_plan"))
    return b"".join(events.Tensors(tag)[0].tensor_proto.string_val).decode()


def test_two_torchrun_nodes_train_what_one_process_trains(tmp_path: Path) -> None:
    two, one = tmp_path / "two-nodes", tmp_path / "one"
    # Both nodes take the same options (rank 0 alone writes the events; every rank saves).
    args = ["--data", str(SAMPLE), *MODEL, "--batch-size", "4", "--sharding", "grid_shard",
            "--checkpoint-dir", str(two), "--logdir", str(tmp_path / "tb")]  # fmt: skip
    port = _free_port()
    nodes = [_node(rank, port, args) for rank in range(NODES)]
    logs = []
    try:
        for node in nodes:
            logs.append(node.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    for rank, (node, log) in enumerate(zip(nodes, logs, strict=True)):
        assert node.returncode == 0, f"node {rank} exited {node.returncode}:\n{log[-4000:]}"
    plan = _plan_text(tmp_path / "tb")
    assert "4 ranks (2 per host)" in plan, plan
    assert "grid_shard" in plan

    reference = CliRunner().invoke(
        main,
        [
            "train",
            "--data",
            str(SAMPLE),
            *MODEL,
            "--batch-size",
            "16",
            "--checkpoint-dir",
            str(one),
        ],
    )
    assert reference.exit_code == 0, reference.output
    got, want = summary_metrics(logs[0], "test:"), summary_metrics(reference.output, "test:")
    assert got["auc"] == pytest.approx(want["auc"], abs=1e-4)
    assert got["log_loss"] == pytest.approx(want["log_loss"], rel=1e-4)
    trained, expected = _weights(two, 7), _weights(one, 7)
    assert trained.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, atol=1e-5, rtol=1e-4, msg=name)
