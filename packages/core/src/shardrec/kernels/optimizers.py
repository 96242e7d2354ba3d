"""Optimizer updates fused into backward, applied to the rows a batch touched (pure torch).

The gradient arrives as :class:`SparseGrad`: the output gradient of each bag plus, per id, the bag
it came from and its weight. Nothing materialises one gradient row per id: on CPU one sparse-dense
``addmm_`` (a tight loop of row updates) scatters ``weight * bag gradient`` straight into the
target; on CUDA ``index_add_`` (atomics) does. SGD in fp32 updates the table that way directly;
the other rules first coalesce duplicate ids (``torch.unique``) into one fp32 gradient per row, so
each row's update is the one a dense optimizer would make from that row's gradient. No dense
gradient of a whole table is ever built. fp16/bf16 weights are updated in fp32 and rounded once.
On CPU, every rule runs :mod:`shardrec.kernels.cpu_update` instead: ids sorted once, each distinct
row's gradient summed by ``embedding_bag`` and updated in cache-sized chunks (Adagrad and Adam
measured 6-7x faster there at MLPerf shapes); the paths below serve CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardrec.kernels.cpu_update import apply_cpu_update
from shardrec.kernels.memory import zeros_rows
from shardrec.kernels.specs import FusedOptimizerConfig, OptimizerType

__all__ = ["SparseGrad", "apply_fused_update", "new_state"]


@dataclass(frozen=True, slots=True)
class SparseGrad:
    """``grad of row ids[i] += psw[i] * grad_bags[bag[i]]`` for every id ``i``.

    ``bag`` None means id ``i`` belongs to bag ``i``; ``psw`` None means weight 1.
    """

    ids: torch.Tensor
    grad_bags: torch.Tensor
    bag: torch.Tensor | None
    psw: torch.Tensor | None

    def scatter_into(self, target: torch.Tensor, index: torch.Tensor, alpha: float) -> None:
        """``target[index[i]] += alpha * psw[i] * grad_bags[bag[i]]`` (target fp32, 2-D)."""
        n = index.numel()
        if n == 0:
            return
        grads = self.grad_bags
        if target.device.type == "cpu":
            bag = self.bag if self.bag is not None else torch.arange(n, device=index.device)
            if self.psw is not None:
                values = self.psw.to(grads.dtype) * alpha
            else:
                values = torch.full((n,), alpha, dtype=grads.dtype, device=grads.device)
            coo = torch.sparse_coo_tensor(
                torch.stack([index, bag]),
                values,
                (target.shape[0], grads.shape[0]),
                check_invariants=False,
            )
            target.addmm_(coo, grads)
            return
        rows = grads if self.bag is None else grads.index_select(0, self.bag)
        if self.psw is not None:
            rows = rows * self.psw.to(grads.dtype).unsqueeze(1)
        target.index_add_(0, index, rows, alpha=alpha)

    def coalesce(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Distinct ids and the fp32 sum of their gradients."""
        unique, inverse = torch.unique(self.ids, return_inverse=True)
        summed = torch.zeros(
            unique.numel(), self.grad_bags.shape[1], dtype=torch.float32, device=self.ids.device
        )
        self.scatter_into(summed, inverse, 1.0)
        return unique, summed


def new_state(
    config: FusedOptimizerConfig, rows: int, dim: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Zero optimizer state for a storage of ``rows × dim`` (fp32, whatever the weight type)."""
    f32 = torch.float32
    if config.optimizer is OptimizerType.EXACT_ADAGRAD:
        return {"sum": zeros_rows((rows, dim), f32, device)}
    if config.optimizer is OptimizerType.ROWWISE_ADAGRAD:
        return {"sum": zeros_rows((rows,), f32, device)}
    if config.optimizer is OptimizerType.ADAM:
        return {
            "exp_avg": zeros_rows((rows, dim), f32, device),
            "exp_avg_sq": zeros_rows((rows, dim), f32, device),
        }
    return {}


def apply_fused_update(
    config: FusedOptimizerConfig,
    weight: torch.Tensor,
    state: dict[str, torch.Tensor],
    grad: SparseGrad,
    step: int,
) -> None:
    """Update ``weight`` (``[rows, dim]``) and ``state`` in place from ``grad``.

    ``step`` is the 1-based number of this update (Adam's bias correction).
    """
    lr = config.learning_rate
    if grad.ids.numel() == 0:
        return
    if weight.device.type == "cpu":
        apply_cpu_update(config, weight, state, grad, step)
        return
    if config.optimizer is OptimizerType.SGD and weight.dtype == torch.float32:
        # Summing into the weight directly equals coalescing first, up to float rounding order.
        grad.scatter_into(weight, grad.ids, -lr)
        return
    unique, g = grad.coalesce()
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
