"""The unsharded side of a check: the same model trained on every rank's samples at once."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shardrec.modules import EmbeddingBagCollection, EmbeddingCollection
from shardrec.testing._batches import GlobalBatch
from shardrec.testing._model import EmbeddingModel, HeadModel
from shardrec.testing._ranks import RankRun

__all__ = ["Reference", "rows_by_rank", "train_reference"]


@dataclass(slots=True)
class Reference:
    """Per step and rank: the rows and per-id weights' gradient rank ``r`` must see; per step the
    dense head's gradient and each plain table's gradient; at the end the trained model."""

    model: HeadModel
    outputs: list[list[torch.Tensor]] = field(default_factory=list)
    dense_grads: list[torch.Tensor] = field(default_factory=list)
    weight_grads: list[list[torch.Tensor]] = field(default_factory=list)
    table_grads: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def tables(self) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """Every table's weight and fused optimizer state, by table name."""
        emb = self.model.emb
        assert isinstance(emb, EmbeddingBagCollection | EmbeddingCollection)
        lookup = emb.lookup
        return lookup.table_weights(), lookup.optimizer_states()

    def table_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Every table's parameter (its ``.grad`` is the table's gradient without a fused
        optimizer)."""
        emb = self.model.emb
        assert isinstance(emb, EmbeddingBagCollection | EmbeddingCollection)
        return dict(emb.lookup.named_table_parameters())


def rows_by_rank(
    model: EmbeddingModel, rows: torch.Tensor, batch: GlobalBatch
) -> list[torch.Tensor]:
    """The unsharded module's output ``rows`` for the whole ``batch``, cut into each rank's part
    (:meth:`GlobalBatch.rows_by_rank`): a row per sample for an EmbeddingBagCollection, a block
    per output name (sorted) for an EmbeddingCollection."""
    if model.pooled:
        return batch.rows_by_rank(rows)
    return batch.rows_by_rank(rows, [n.split("@")[0] for n in model.output_names()])


def train_reference(run: RankRun) -> Reference:
    """``run.steps`` steps on the global batches: the loss sums every rank's samples,
    ``run.dense_optimizer`` steps what has a gradient (the head, and tables without a fused
    optimizer); fused tables update themselves in backward."""
    model = run.model.build(run.model_seed)
    ref = Reference(model)
    tables = ref.table_parameters()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = run.dense_optimizer(trainable)
    for step in range(run.steps):
        batch = run.batch(step)
        kjt = batch.kjt(None, weights_need_grad=run.model.weighted)
        rows, loss = model(kjt)
        loss.backward()
        ref.outputs.append(rows_by_rank(run.model, rows.detach(), batch))
        assert model.dense.weight.grad is not None
        ref.dense_grads.append(model.dense.weight.grad.clone())
        weights = kjt.weights_or_none()
        if weights is not None and weights.grad is not None:
            grads = batch.split_by_key(weights.grad)
            ref.weight_grads.append([batch.entries(grads, r) for r in range(len(batch.sizes))])
        ref.table_grads.append(
            {t: p.grad.to_dense().clone() for t, p in tables.items() if p.grad is not None}
        )
        opt.step()
        opt.zero_grad()
    return ref


def reference_outputs(ref: Reference, run: RankRun) -> list[torch.Tensor]:
    """The trained reference's rows for ``run.batch(0)``, by rank (what a loaded model gives)."""
    batch = run.batch(0)
    with torch.no_grad():
        rows, _ = ref.model(batch.kjt(None))
    return rows_by_rank(run.model, rows, batch)
