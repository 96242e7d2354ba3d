"""Optimizer updates fused into backward, applied to the rows a batch touched (pure torch).

Every rule here works on coalesced rows: duplicate ids within a batch are summed first
(``torch.unique`` + ``index_add_``), so the update of a row is the one a dense optimizer would make
from that row's gradient. No dense gradient of a whole table is ever built. The rules are written in
fp32 and rounded once into fp16/bf16 storage.
"""

from __future__ import annotations

import torch

from shardrec.kernels.specs import FusedOptimizerConfig, OptimizerType

__all__ = ["apply_fused_update", "coalesce", "new_state"]


def new_state(
    config: FusedOptimizerConfig, rows: int, dim: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Zero optimizer state for a storage of ``rows × dim`` (fp32, whatever the weight type)."""
    if config.optimizer is OptimizerType.EXACT_ADAGRAD:
        return {"sum": torch.zeros(rows, dim, device=device)}
    if config.optimizer is OptimizerType.ROWWISE_ADAGRAD:
        return {"sum": torch.zeros(rows, device=device)}
    if config.optimizer is OptimizerType.ADAM:
        return {
            "exp_avg": torch.zeros(rows, dim, device=device),
            "exp_avg_sq": torch.zeros(rows, dim, device=device),
        }
    return {}


def coalesce(ids: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct ids and the sum of their gradient rows (fp32)."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    summed = torch.zeros(unique.numel(), grads.shape[1], dtype=torch.float32, device=grads.device)
    summed.index_add_(0, inverse, grads.float())
    return unique, summed


def apply_fused_update(
    config: FusedOptimizerConfig,
    weight: torch.Tensor,
    state: dict[str, torch.Tensor],
    ids: torch.Tensor,
    grads: torch.Tensor,
    step: int,
) -> None:
    """Update ``weight`` (``[rows, dim]``) and ``state`` in place from per-id gradient ``grads``.

    ``step`` is the 1-based number of this update (Adam's bias correction).
    """
    lr = config.learning_rate
    if ids.numel() == 0:
        return
    if config.optimizer is OptimizerType.SGD and weight.dtype == torch.float32:
        # Summing into the weight directly equals coalescing first, up to float rounding order.
        weight.index_add_(0, ids, grads.to(torch.float32), alpha=-lr)
        return
    unique, g = coalesce(ids, grads)
    w = weight.index_select(0, unique).float()
    if config.optimizer is OptimizerType.SGD:
        w.sub_(g, alpha=lr)
    elif config.optimizer is OptimizerType.EXACT_ADAGRAD:
        s = state["sum"].index_select(0, unique).addcmul_(g, g)
        state["sum"].index_copy_(0, unique, s)
        w.sub_(lr * g / (s.sqrt() + config.eps))
    elif config.optimizer is OptimizerType.ROWWISE_ADAGRAD:
        s = state["sum"].index_select(0, unique) + g.square().mean(dim=1)
        state["sum"].index_copy_(0, unique, s)
        w.sub_(g * (lr / (s.sqrt() + config.eps)).unsqueeze(1))
    else:
        b1, b2 = config.beta1, config.beta2
        m = state["exp_avg"].index_select(0, unique).mul_(b1).add_(g, alpha=1.0 - b1)
        v = state["exp_avg_sq"].index_select(0, unique).mul_(b2).addcmul_(g, g, value=1.0 - b2)
        state["exp_avg"].index_copy_(0, unique, m)
        state["exp_avg_sq"].index_copy_(0, unique, v)
        m_hat = m / (1.0 - b1**step)
        v_hat = v / (1.0 - b2**step)
        w.sub_(lr * m_hat / (v_hat.sqrt() + config.eps))
    weight.index_copy_(0, unique, w.to(weight.dtype))
