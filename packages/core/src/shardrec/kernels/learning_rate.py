"""Learning rate of the optimizers fused into the lookups of a whole model, sharded or not."""

from __future__ import annotations

from torch import nn

from shardrec.kernels.table_batched import TableBatchedEmbedding

__all__ = ["fused_learning_rates", "set_learning_rate"]


def set_learning_rate(module: nn.Module, lr: float) -> int:
    """Set ``lr`` on every fused-optimizer :class:`TableBatchedEmbedding` in ``module``.

    Walks ``module.modules()``, so it reaches the local lookups the sharders build inside a
    ``DistributedModelParallel`` and, through their ``lookup``, the kernels of plain
    ``EmbeddingBagCollection``/``EmbeddingCollection`` modules. Lookups in plain mode (no fused
    optimizer, e.g. data-parallel tables, trained through ``.grad`` by the dense optimizer) are
    left alone. Returns how many lookups were updated.
    """
    lookups = _fused_lookups(module)
    for lookup in lookups.values():
        lookup.set_learning_rate(lr)
    return len(lookups)


def fused_learning_rates(module: nn.Module) -> dict[str, float]:
    """``{qualified lookup name: learning rate}`` of every fused-optimizer lookup in ``module``."""
    return {name: lookup.learning_rate for name, lookup in _fused_lookups(module).items()}


def _fused_lookups(module: nn.Module) -> dict[str, TableBatchedEmbedding]:
    """Every distinct fused lookup, by qualified name.

    Registered submodules (the sharders' local lookups) are found by the walk itself; the
    collections keep theirs unregistered (their state dict is the per-table weights) and expose it
    as ``.lookup``, which is read too.
    """
    found: dict[str, TableBatchedEmbedding] = {}
    seen: set[int] = set()
    for name, sub in module.named_modules():
        if isinstance(sub, TableBatchedEmbedding):
            candidate, qualified = sub, name
        else:
            hidden = getattr(sub, "lookup", None)
            if not isinstance(hidden, TableBatchedEmbedding):
                continue
            candidate, qualified = hidden, f"{name}.lookup" if name else "lookup"
        if candidate.optimizer is None or id(candidate) in seen:
            continue
        seen.add(id(candidate))
        found[qualified] = candidate
    return found
