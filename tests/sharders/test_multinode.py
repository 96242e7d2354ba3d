"""Two machines, played on this one: ``torchrun --nnodes 2 --nproc-per-node 2`` started twice
(node ranks 0 and 1, one rendezvous port), training ``multinode_train.py`` with table-row-wise
tables, must learn what the unsharded module learns from the same global batches."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .multinode_train import STEPS, TABLES, Model, make_batch

pytestmark = pytest.mark.multiprocess

SCRIPT = Path(__file__).resolve().parent / "multinode_train.py"
NODES, PER_NODE = 2, 2
WORLD = NODES * PER_NODE
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(node_rank: int, port: int, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", str(NODES), "--nproc-per-node", str(PER_NODE),
            "--node-rank", str(node_rank),
            "--master-addr", "127.0.0.1", "--master-port", str(port),
            str(SCRIPT), str(out),
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip


def test_two_torchrun_nodes_match_the_unsharded_module(tmp_path: Path) -> None:
    port = _free_port()
    nodes = [_torchrun(n, port, tmp_path) for n in range(NODES)]
    logs = []
    try:
        for node in nodes:
            logs.append(node.communicate(timeout=TIMEOUT_S)[0].decode(errors="replace"))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    for n, (node, log) in enumerate(zip(nodes, logs, strict=True)):
        assert node.returncode == 0, f"node {n} exited {node.returncode}:\n{log[-4000:]}"
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    # torchrun made two nodes of two: ranks 0, 1 on node 0 and 2, 3 on node 1.
    assert [r["launcher"] for r in results] == [
        {"GROUP_RANK": r // PER_NODE, "LOCAL_RANK": r % PER_NODE, "LOCAL_WORLD_SIZE": PER_NODE}
        for r in range(WORLD)
    ]

    reference = Model()
    lr = 0.05
    for step in range(STEPS):
        rows, loss = reference(make_batch(step, WORLD, None))
        loss.backward()
        for rank, chunk in enumerate(torch.split(rows.detach(), len(rows) // WORLD)):
            torch.testing.assert_close(
                results[rank]["outputs"][step], chunk, atol=1e-5, rtol=1e-5,
                msg=f"rank {rank}, step {step}",
            )  # fmt: skip
        with torch.no_grad():
            for p in reference.dense.parameters():
                p -= lr * p.grad
                p.grad = None
    weights = reference.emb.lookup.table_weights()
    for name, *_ in TABLES:
        rebuilt = torch.full_like(weights[name], float("nan"))
        for result in results:
            for tensor, (row, col) in result["shards"][name]:
                rebuilt[row : row + tensor.shape[0], col : col + tensor.shape[1]] = tensor
        torch.testing.assert_close(rebuilt, weights[name], atol=1e-5, rtol=1e-5, msg=name)
