"""What the checkpoint tests share: a small model with fused optimizer state, snapshots of it, and
``reseal``, which rewrites a checkpoint's sidecar the way a forger would (fresh file list and
checksums), so that a test reaches the checks behind verification."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from shardrec.modules import EmbeddingBagCollection
from shardrec.modules.configs import EmbeddingBagConfig


def make_model(seed: int, optimizer: str = "rowwise_adagrad") -> nn.Module:
    torch.manual_seed(seed)
    configs = [
        EmbeddingBagConfig(num_embeddings=50, embedding_dim=8, name="t0", feature_names=["f0"]),
        EmbeddingBagConfig(num_embeddings=30, embedding_dim=4, name="t1", feature_names=["f1"]),
    ]
    model = nn.Sequential()
    model.add_module("ebc", EmbeddingBagCollection(configs, fused_params={"optimizer": optimizer}))
    model.add_module("top", nn.Linear(12, 1))
    model.ebc.reset_parameters()
    with torch.no_grad():
        for states in model.ebc.lookup.optimizer_states().values():
            for t in states.values():
                t.uniform_(0, 1)
    return model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for table, states in model.ebc.lookup.optimizer_states().items():
        for name, t in states.items():
            out[f"state.{table}.{name}"] = t.clone()
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def reseal(path: Path) -> None:
    """Recompute the sidecar's file list (the regular files now in ``path``) and checksum."""
    sidecar = path / "shardrec.json"
    body = json.loads(sidecar.read_text())
    body.pop("checksum")
    files = {}
    for name in sorted(os.listdir(path)):
        file = path / name
        if name != "shardrec.json" and file.is_file() and not file.is_symlink():
            data = file.read_bytes()
            files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    body["files"] = files
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    body["checksum"] = hashlib.sha256(canonical).hexdigest()
    sidecar.write_text(json.dumps(body))
