"""Managed ids, quality: validation AUC and log loss on a drifting stream, managed tables against
modulo hashing and an unbounded table.

    .venv/bin/python tools/bench/managed_quality.py DATA [--rows-per-table 4096,1024]
        [--batch-size 512] [--threads 1]

DATA is a ``dlrm synth --drift`` directory (its ``synth.json`` gives the ids per feature and the
Bayes-optimal figures). A small DLRM (embedding dim 16, dense arch 64-16, over arch 64-1, dot
interaction; row-wise Adagrad on the tables, Adagrad on the dense layers, lr 0.05) trains one pass
over the training split *in stream order* (the order the ids drift in; no shuffle), then is
evaluated on the validation split (the stream's newest rows). Contenders, per table size R:

- ``modulo``: an EmbeddingBagCollection of R rows per feature fed ``1 + id % (R - 1)``, row 0 for a
  missing value (dlrm's hashing);
- ``managed``: a ManagedCollisionEmbeddingBagCollection of R rows per feature (LRU, eviction every
  step) fed the raw 32-bit ids (missing: its own id);
- ``unbounded``: the same managed module with a row for every id the stream holds (nothing is
  evicted): the reference a table of any size could reach.

A feature with fewer distinct ids than R gets a table of that many rows plus two (the missing
value, the default row) in every contender; modulo hashing still folds its ids at random there.
Every contender starts from the same seed.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _model(kind: str, rows: list[int]) -> nn.Module:
    from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
    from shardrec.modules.managed_collision import MCHManagedCollisionModule
    from shardrec.modules.mc_collection import ManagedCollisionCollection
    from shardrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
    from shardrec_dlrm.data.schema import SPARSE_KEYS
    from shardrec_dlrm.model.dlrm import DLRM

    torch.manual_seed(0)
    configs = [
        EmbeddingBagConfig(name=f"t_{k}", num_embeddings=n, embedding_dim=16, feature_names=[k])
        for k, n in zip(SPARSE_KEYS, rows, strict=True)
    ]
    fused = {"optimizer": "rowwise_adagrad", "learning_rate": 0.05}
    ebc = EmbeddingBagCollection(configs, fused_params=fused)
    emb: nn.Module = ebc
    if kind != "modulo":
        mcc = ManagedCollisionCollection(
            {c.name: MCHManagedCollisionModule(c.num_embeddings, name=c.name) for c in configs},
            configs,
        )
        managed = ManagedCollisionEmbeddingBagCollection(ebc, mcc)

        class Pooled(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.managed = managed

            def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
                return managed.embedding_bag_configs()

            def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
                return self.managed(kjt)[0]

        emb = Pooled()
    return DLRM(
        embedding_bag_collection=emb,
        dense_in_features=13,
        dense_arch_layer_sizes=[64, 16],
        over_arch_layer_sizes=[64, 1],
    )


def _batches(split: Any, batch: int, table_rows: list[int] | None) -> Iterator[Any]:
    from shardrec_dlrm.data.batch import make_batch

    for lo in range(0, split.num_rows, batch):
        yield make_batch(split.rows(lo, lo + batch), table_rows)


def _run(kind: str, data: str, rows: list[int], batch: int) -> dict[str, float]:
    from shardrec_dlrm.data import open_dataset
    from shardrec_dlrm.metrics.binary import metrics_from_logits

    ds = open_dataset(data, num_embeddings_per_feature=None)
    model = _model(kind, rows)
    dense = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adagrad(dense, lr=0.05)
    hashing = rows if kind == "modulo" else None
    start = time.perf_counter()
    model.train()
    for b in _batches(ds.split("train"), batch, hashing):
        logits = model(b.dense_features, b.sparse_features).squeeze(-1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, b.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    outs, labels = [], []
    with torch.no_grad():
        for b in _batches(ds.split("val"), 4096, hashing):
            outs.append(model(b.dense_features, b.sparse_features).squeeze(-1))
            labels.append(b.labels)
    metrics = metrics_from_logits(torch.cat(outs), torch.cat(labels))
    return {"auc": metrics["auc"], "log_loss": metrics["log_loss"], "train_s": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    parser.add_argument("--rows-per-table", default="4096,1024")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = json.loads((Path(args.data) / "synth.json").read_text())
    ids = [int(c) for c in info["cardinalities"]]
    print(
        f"{args.data}: {info['rows']} rows, up to {max(ids)} ids per feature; Bayes-optimal "
        f"validation AUC {info['val']['auc']:.4f}, log loss {info['val']['log_loss']:.4f}"
    )
    print("| rows per table | contender | val AUC | val log loss | train s |")
    print("|---|---|---|---|---|")
    for size in (int(s) for s in args.rows_per_table.split(",")):
        # +2: a row for the missing value and the managed module's default row.
        small = [c + 2 if c + 2 <= size else size for c in ids]
        unbounded = [c + 2 for c in ids]
        for kind, rows in (("modulo", small), ("managed", small), ("unbounded", unbounded)):
            m = _run(kind, args.data, rows, args.batch_size)
            print(
                f"| {size} | {kind} | {m['auc']:.4f} | {m['log_loss']:.4f} | {m['train_s']:.0f} |",
                flush=True,
            )
    if math.isnan(float(info["val"]["auc"])):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
