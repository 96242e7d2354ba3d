"""The pure-PyTorch table-batched lookup: one storage per (data type, dim), one lookup call.

Tables of one group are stacked in one ``[sum of rows, dim]`` tensor; a feature's ids are shifted by
the first row of its table, so all features of the group are looked up by one ``F.embedding_bag``
(pooled) or ``F.embedding`` (sequence) call. ``MEAN`` pooling is a ``SUM`` with per-id weights
``1 / bag length``, which lets SUM and MEAN tables of the same dim share the call. In fused mode
backward never forms a dense gradient of a table: it hands the output gradient (read in place) and
each id's bag to the fused optimizer, which updates the touched rows in place; with several ids per
bag and SGD, tables far smaller than their ids are updated by one small dense GEMM instead.
Per-id weights that require grad (and only those) are an input of the lookup too: each gets the dot
product of its bag's output gradient with the row it scaled, as FBGEMM's kernel gives it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, NamedTuple, Protocol

import torch
import torch.nn.functional as F

from shardrec.kernels.group import GroupInput
from shardrec.kernels.memory import empty_rows, zeros_rows
from shardrec.kernels.optimizers import SparseGrad, apply_fused_update, new_state
from shardrec.kernels.specs import (
    FusedOptimizerConfig,
    OptimizerType,
    PoolingType,
    TableSpec,
    data_type_to_dtype,
)

__all__ = ["RowAllocator", "TorchGroup", "allocate_in_memory"]

_META: Final = torch.device("meta")


class RowAllocator(Protocol):
    """Gives a :class:`TorchGroup` its tensors: a storage backend that keeps rows elsewhere
    (a memory-mapped file) passes its own.

    ``what`` is ``"weight"`` (the group's ``[rows, dim]`` storage) or an optimizer state's name
    (``"sum"``, ``"exp_avg"``...). A state must come back zero-filled; the weight may hold anything
    (it is initialised or loaded after). On ``meta`` nothing is allocated: return a meta tensor.
    """

    def __call__(
        self, what: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor: ...


def allocate_in_memory(
    what: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The built-in allocation: ordinary tensors, big CPU ones on huge pages."""
    if what == "weight":
        return empty_rows(shape, dtype, device)
    return zeros_rows(shape, dtype, device)


class TorchGroup:
    """Tables that share one data type and one dim, stored in one tensor.

    The pure-torch lookup and fused optimizers over a ``[sum of rows, dim]`` storage; ``allocate``
    decides where that storage and the optimizer state live (memory by default). A storage
    backend that only changes where rows live builds this group with its own allocator.
    """

    # Class defaults, so lookups pickled before deferred updates (or allocators) existed still load.
    allocate: RowAllocator = staticmethod(allocate_in_memory)
    deferred_update: bool = False
    pending: torch.Tensor | None = None
    touched: torch.Tensor | None = None

    def __init__(
        self,
        *,
        tables: Sequence[TableSpec],
        feature_tables: Sequence[int],
        optimizer: FusedOptimizerConfig | None,
        device: torch.device,
        deferred_update: bool = False,
        allocate: RowAllocator = allocate_in_memory,
    ) -> None:
        self.tables = tuple(tables)
        self.allocate = allocate
        self.feature_tables = tuple(feature_tables)
        self.optimizer = optimizer
        # Deferred: backward keeps dense gradients (``take_gradient``); ``apply_rows`` updates.
        self.deferred_update = deferred_update
        # Deferred: the gradient and the rows some backward read an id of, until taken.
        self.pending: torch.Tensor | None = None
        self.touched: torch.Tensor | None = None
        self.dim = self.tables[0].embedding_dim
        self.dtype = data_type_to_dtype(self.tables[0].data_type)
        starts = [0]
        for t in self.tables:
            starts.append(starts[-1] + t.num_embeddings)
        self.row_starts = starts
        self.num_rows = starts[-1]
        bases = [starts[t] for t in self.feature_tables]
        small = device if device.type != "meta" else torch.device("cpu")
        self._feature_base = torch.tensor(bases, dtype=torch.int64, device=small)
        self._bases_all_zero = not any(bases)
        mean = [self.tables[t].pooling is PoolingType.MEAN for t in self.feature_tables]
        self._mean = torch.tensor(mean, dtype=torch.bool, device=small)
        self._any_mean = any(mean)
        self._all_mean = all(mean)
        # Updates applied so far (Adam's bias correction): a 0-d int64 on the host, exposed as the
        # "step" state of every table of the group (they step together), so a load writes into it.
        self.step_count = torch.zeros((), dtype=torch.int64)
        # Layout of multi-id bags. Key-major (the default, None) reads one table after another,
        # which measured twice as fast in embedding_bag on CPU as interleaving the tables per
        # sample; the pooled rows are then transposed. Sample-major stays for tests.
        self.key_major: bool | None = None
        self._aranges: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._bag_rows: dict[tuple[int, int, int, torch.device], torch.Tensor] = {}
        self.storage = allocate("weight", (self.num_rows, self.dim), self.dtype, device)
        # The state's names and shapes, from meta tensors (nothing allocated twice).
        shapes = {} if optimizer is None else new_state(optimizer, self.num_rows, self.dim, _META)
        self.state: dict[str, torch.Tensor] = {
            name: allocate(name, tuple(t.shape), t.dtype, device) for name, t in shapes.items()
        }

    @property
    def device(self) -> torch.device:
        return self.storage.device

    def move_to(self, device: torch.device) -> None:
        if device == self.device:
            return
        was_meta = self.device.type == "meta"
        storage = self.allocate("weight", tuple(self.storage.shape), self.dtype, device)
        if not was_meta:
            storage.copy_(self.storage)
        self.storage = storage
        state = {}
        for name, old in self.state.items():
            new = self.allocate(name, tuple(old.shape), old.dtype, device)
            if not was_meta:
                new.copy_(old)
            state[name] = new
        self.state = state
        self._feature_base = self._feature_base.to(device)
        self._mean = self._mean.to(device)

    def set_optimizer(self, optimizer: FusedOptimizerConfig) -> None:
        # Backward reads ``self.optimizer`` on every update; the states stay as they are.
        if self.optimizer is None or optimizer.optimizer is not self.optimizer.optimizer:
            raise ValueError("a group's fused optimizer can change its hyper-parameters only")
        self.optimizer = optimizer

    def table_weights(self) -> list[torch.Tensor]:
        s = self.row_starts
        return [self.storage[s[i] : s[i + 1]] for i in range(len(self.tables))]

    def table_states(self) -> list[dict[str, torch.Tensor]]:
        s = self.row_starts
        out = [
            {k: v[s[i] : s[i + 1]] for k, v in self.state.items()} for i in range(len(self.tables))
        ]
        if self.optimizer is not None and "step" in self.optimizer.state_names():
            for states in out:
                states["step"] = self.step_count
        return out

    def _global_ids(self, inp: GroupInput) -> torch.Tensor:
        return self._storage_rows(inp.values, inp.length_per_feature)

    def _storage_rows(self, values: torch.Tensor, lpk: Sequence[int]) -> torch.Tensor:
        """Key-major local ids (``lpk[f]`` ids of feature f) as rows of the group's storage."""
        if self._bases_all_zero or values.numel() == 0:
            return values
        if len(set(lpk)) == 1:
            # As many ids per feature (fixed-size batches): one broadcast add.
            return (values.view(len(lpk), -1) + self._feature_base.view(-1, 1)).view(-1)
        counts = torch.tensor(lpk, dtype=torch.int64, device=values.device)
        base = torch.repeat_interleave(self._feature_base, counts, output_size=values.numel())
        return values + base

    def _arange(self, n: int, device: torch.device) -> torch.Tensor:
        cached = self._aranges.get((n, device))
        if cached is None:
            cached = torch.arange(n, dtype=torch.int64, device=device)
            self._aranges = {(n, device): cached}
        return cached

    def _key_major_bag_rows(
        self, lengths: torch.Tensor, batch: int, nf: int, n: int
    ) -> torch.Tensor:
        """For each key-major id, the sample-major row ``b * F + f`` of its bag ``(f, b)``."""
        device = lengths.device
        num_bags = batch * nf
        per_bag = n // num_bags if num_bags else 0
        fixed = per_bag > 0 and per_bag * num_bags == n and bool((lengths == per_bag).all())
        # Fixed-size bags (the usual batch): the same rows every step, kept; else one row per bag.
        key = (batch, nf, per_bag if fixed else 0, device)
        rows = self._bag_rows.get(key)
        if rows is None:
            # Position f * B + b holds b * F + f.
            rows = self._arange(num_bags, device).view(batch, nf).t().reshape(-1)
            if fixed:
                rows = rows.repeat_interleave(per_bag)
            self._bag_rows = {key: rows}
        if fixed:
            return rows
        return torch.repeat_interleave(rows, lengths, output_size=n)

    def _sample_major(self, inp: GroupInput) -> _SampleMajor:
        """Lay the bags out for ``embedding_bag``.

        With one id per bag (the common case) the ids are reordered from key-major ``(f, b)`` to
        sample-major ``(b, f)``: ``embedding_bag`` then writes ``[B * F, D]`` rows that already
        are the ``[B, F * D]`` output, and backward reads the output gradient in place; moving ids
        (8 bytes each) is far cheaper than transposing pooled rows (``4 * D`` bytes each) twice.
        Bags of several ids stay key-major (see ``key_major``).
        """
        nf, batch = len(self.feature_tables), inp.batch_size
        num_bags, n = nf * batch, inp.values.numel()
        device = inp.values.device
        lengths = inp.offsets.diff()
        one_per_bag = n == num_bags and (n == 0 or int(lengths.max()) == 1)
        if one_per_bag:
            ids = torch.empty(batch, nf, dtype=torch.int64, device=device)
            if self._bases_all_zero:
                ids.t().copy_(inp.values.view(nf, batch))
            else:
                torch.add(inp.values.view(nf, batch), self._feature_base.view(nf, 1), out=ids.t())
            weights = inp.weights
            psw = None if weights is None else weights.view(nf, batch).t().reshape(-1)
            return _SampleMajor(ids.view(-1), self._arange(num_bags + 1, device), psw, None)
        if self.key_major is None or self.key_major:
            return self._key_major(inp, lengths)
        lengths_sm = lengths.view(nf, batch).t().reshape(-1)
        starts_sm = inp.offsets[:-1].view(nf, batch).t().reshape(-1)
        offsets_sm = torch.zeros(num_bags + 1, dtype=torch.int64, device=device)
        torch.cumsum(lengths_sm, 0, out=offsets_sm[1:])
        shift = torch.repeat_interleave(starts_sm - offsets_sm[:-1], lengths_sm, output_size=n)
        gather = shift.add_(self._arange(n, device))
        ids_sm = self._global_ids(inp).index_select(0, gather)
        psw_sm: torch.Tensor | None = None
        if inp.weights is not None:
            psw_sm = inp.weights.index_select(0, gather)
        if self._any_mean:
            inv = 1.0 / lengths_sm.clamp(min=1).to(torch.float32)
            if not self._all_mean:
                inv = torch.where(self._mean.repeat(batch), inv, torch.ones_like(inv))
            scale = torch.repeat_interleave(inv, lengths_sm, output_size=n)
            psw_sm = scale if psw_sm is None else psw_sm * scale
        return _SampleMajor(ids_sm, offsets_sm, psw_sm, lengths_sm)

    def _key_major(self, inp: GroupInput, lengths: torch.Tensor) -> _SampleMajor:
        """Bags in the KJT's own order; the pooled rows are transposed instead of the ids."""
        n = inp.values.numel()
        psw = inp.weights
        if self._any_mean:
            inv = 1.0 / lengths.clamp(min=1).to(torch.float32)
            if not self._all_mean:
                per_bag = self._mean.repeat_interleave(inp.batch_size)
                inv = torch.where(per_bag, inv, torch.ones_like(inv))
            scale = torch.repeat_interleave(inv, lengths, output_size=n)
            psw = scale if psw is None else psw * scale
        # Pooled feature by feature, each from its own table's rows: no storage rows needed
        # until backward asks for them.
        local = _pools_per_feature(self.storage, inp.batch_size)
        return _SampleMajor(
            inp.values if local else self._global_ids(inp),
            inp.offsets,
            psw,
            lengths,
            key_major=True,
            length_per_feature=tuple(inp.length_per_feature),
            local_ids=local,
        )

    def pooled(self, inp: GroupInput, params: Sequence[torch.Tensor]) -> torch.Tensor:
        sm = self._sample_major(inp)
        out: torch.Tensor
        if sm.psw is not None and sm.psw.requires_grad:
            # Per-id weights that need a gradient (e.g. made by a learnable module) are an input.
            out = _WeightedPooledLookup.apply(  # type: ignore[no-untyped-call]
                self, sm, inp.batch_size, len(self.feature_tables), sm.psw, *params
            )
            return out
        out = _PooledLookup.apply(  # type: ignore[no-untyped-call]
            self, sm, inp.batch_size, len(self.feature_tables), *params
        )
        return out

    def sequence(self, inp: GroupInput, params: Sequence[torch.Tensor]) -> torch.Tensor:
        ids = self._global_ids(inp)
        out: torch.Tensor = _SequenceLookup.apply(self, ids, *params)  # type: ignore[no-untyped-call]
        return out

    def _small_table_sgd(
        self, grad: SparseGrad, lpk: Sequence[int], batch: int
    ) -> SparseGrad | None:
        """Fused SGD of key-major multi-id bags: features of tiny tables updated densely.

        A table of ``R`` rows read by ``n`` ids of ``B`` bags gets ``-lr * C @ G`` with ``C`` the
        ``[R, B]`` per-bag id counts (times the ids' weights) and ``G`` the feature's ``[B, D]``
        output gradient: one small GEMM instead of ``n`` row updates, worth it when ``R * B`` is
        well under ``8 * n``. Returns the rest of the gradient (the other features' ids), or None
        when no feature qualifies.
        """
        assert self.optimizer is not None
        assert grad.bag is not None
        nf = len(self.feature_tables)
        starts = [0]
        for n in lpk:
            starts.append(starts[-1] + n)
        small = [
            f
            for f, t in enumerate(self.feature_tables)
            if lpk[f] and self.tables[t].num_embeddings * batch <= 8 * lpk[f]
        ]
        if not small:
            return None
        lr = self.optimizer.learning_rate
        grad_bf = grad.grad_bags.view(batch, nf, self.dim)
        for f in small:
            t = self.feature_tables[f]
            rows = self.tables[t].num_embeddings
            lo, hi = starts[f], starts[f + 1]
            local = grad.ids[lo:hi] - self.row_starts[t]
            bag = grad.bag[lo:hi].div(nf, rounding_mode="floor")
            counts = torch.zeros(rows * batch, dtype=torch.float32, device=grad.ids.device)
            if grad.psw is not None:
                weights = grad.psw[lo:hi].to(torch.float32)
            else:
                weights = torch.ones(hi - lo, dtype=torch.float32, device=grad.ids.device)
            counts.index_add_(0, local.mul_(batch).add_(bag), weights)
            table = self.storage[self.row_starts[t] : self.row_starts[t + 1]]
            table.addmm_(counts.view(rows, batch), grad_bf[:, f, :], alpha=-lr)
        keep = [(starts[f], starts[f + 1]) for f in range(nf) if f not in small and lpk[f]]
        if not keep:
            return SparseGrad(ids=grad.ids[:0], grad_bags=grad.grad_bags, bag=None, psw=None)
        bag_rows = grad.bag

        def take(x: torch.Tensor) -> torch.Tensor:
            return (
                torch.cat([x[a:b] for a, b in keep])
                if len(keep) > 1
                else x[keep[0][0] : keep[0][1]]
            )

        return SparseGrad(
            ids=take(grad.ids),
            grad_bags=grad.grad_bags,
            bag=take(bag_rows),
            psw=None if grad.psw is None else take(grad.psw),
        )

    def backward_rows(
        self, grad: SparseGrad, num_params: int, sm: _SampleMajor | None = None, batch: int = 0
    ) -> tuple[torch.Tensor | None, ...]:
        """Apply the fused update (fused mode) or build the tables' dense gradients (plain mode,
        and fused mode with a deferred update)."""
        if self.optimizer is not None and self.deferred_update:
            return self._defer(grad, num_params)
        if self.optimizer is not None:
            if (
                sm is not None
                and sm.key_major
                and sm.length_per_feature
                and self.optimizer.optimizer is OptimizerType.SGD
                and self.dtype == torch.float32
                and self.storage.device.type == "cpu"
            ):
                rest = self._small_table_sgd(grad, sm.length_per_feature, batch)
                if rest is not None:
                    grad = rest
            self.step_count += 1
            step = int(self.step_count)
            apply_fused_update(self.optimizer, self.storage, self.state, grad, step)
            return (None,) * num_params
        dense = torch.zeros(self.num_rows, self.dim, dtype=torch.float32, device=grad.ids.device)
        grad.scatter_into(dense, grad.ids, 1.0)
        dense = dense.to(self.dtype)
        s = self.row_starts
        return tuple(dense[s[i] : s[i + 1]] for i in range(len(self.tables)))

    def _defer(self, grad: SparseGrad, num_params: int) -> tuple[torch.Tensor | None, ...]:
        """Deferred mode: keep the dense gradient and the touched rows for ``take_*``."""
        device = grad.ids.device
        if self.pending is None:
            self.pending = torch.zeros(self.num_rows, self.dim, dtype=torch.float32, device=device)
        grad.scatter_into(self.pending, grad.ids, 1.0)
        if self.touched is None:
            self.touched = torch.zeros(self.num_rows, dtype=torch.bool, device=device)
        self.touched[grad.ids] = True
        # The placeholder gets an (empty) gradient, so its post-accumulate hook counts this group.
        return (torch.zeros(0),) * num_params

    def take_gradient(self) -> torch.Tensor:
        """Deferred mode: the ``[num_rows, dim]`` fp32 gradient since the last call (cleared)."""
        pending = self.pending
        self.pending = None
        if pending is None:
            return torch.zeros(self.num_rows, self.dim, dtype=torch.float32, device=self.device)
        return pending

    def take_touched(self) -> torch.Tensor:
        """Deferred mode: a ``[num_rows]`` bool mask of the rows backward saw an id of since the
        last call (then cleared)."""
        touched = self.touched
        self.touched = None
        if touched is None:
            return torch.zeros(self.num_rows, dtype=torch.bool, device=self.device)
        return touched

    def apply_rows(self, ids: torch.Tensor, grad_rows: torch.Tensor) -> None:
        """One fused-optimizer step: distinct storage rows ``ids`` get the gradients ``grad_rows``
        (``[len(ids), dim]`` fp32). The step counter advances even when ``ids`` is empty, as one
        backward of the group does."""
        assert self.optimizer is not None
        self.step_count += 1
        grad = SparseGrad(ids=ids, grad_bags=grad_rows, bag=None, psw=None)
        apply_fused_update(self.optimizer, self.storage, self.state, grad, int(self.step_count))


class _SampleMajor(NamedTuple):
    """Sample-major bags: ids, offsets (``B * F + 1``), per-id weights, per-bag lengths.

    ``lengths`` is None when every bag holds exactly one id (id ``i`` is bag ``i``).
    """

    ids: torch.Tensor
    offsets: torch.Tensor
    psw: torch.Tensor | None
    lengths: torch.Tensor | None
    key_major: bool = False
    length_per_feature: tuple[int, ...] = ()
    # Key-major only: ``ids`` are each feature's own table rows, not the storage's (see
    # ``_pool_into_columns``); backward shifts them.
    local_ids: bool = False


class _PooledLookup(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        group: TorchGroup,
        sm: _SampleMajor,
        batch_size: int,
        num_features: int,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        weight = group.storage
        psw = sm.psw.to(weight.dtype) if sm.psw is not None else None
        if sm.local_ids:
            out = _pool_into_columns(group, sm, batch_size, psw)
        else:
            bags = F.embedding_bag(
                sm.ids,
                weight,
                sm.offsets,
                mode="sum",
                per_sample_weights=psw,
                include_last_offset=True,
            )
            if sm.key_major:
                out = bags.view(num_features, batch_size, group.dim).transpose(0, 1)
                out = out.reshape(batch_size, num_features * group.dim)
            else:
                out = bags.view(batch_size, num_features * group.dim)
        ctx.group = group
        ctx.shape = (batch_size, num_features)
        ctx.sm = sm
        ctx.num_params = len(params)
        return out.float() if out.dtype != torch.float32 else out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        sparse = _sparse_grad(ctx, grad)
        param_grads = ctx.group.backward_rows(sparse, ctx.num_params, ctx.sm, ctx.shape[0])
        return (None, None, None, None, *param_grads)


# A feature's ``[B, D]`` block of pooled rows from which key-major bags are pooled by one call per
# feature straight into the output's columns (CPU only). Below it, one call for all features and a
# transpose of the pooled rows is faster (each call costs ~15 us); above it, the transpose's
# second output-sized buffer and the storage rows of every id cost more, mostly in page faults
# (at MLPerf shapes, 26 features, batch 1,024, dim 128, 1 thread: 3,000-7,000 faults per forward
# before, 640-1,600 after, and faster in 9 rounds of 12; docs/benchmarks.md has the figures).
PER_FEATURE_MIN_BYTES: Final = 64 << 10


def _pools_per_feature(weight: torch.Tensor, batch_size: int) -> bool:
    block = batch_size * weight.shape[1] * weight.element_size()
    return weight.device.type == "cpu" and block >= PER_FEATURE_MIN_BYTES


def _pool_into_columns(
    group: TorchGroup, sm: _SampleMajor, batch_size: int, psw: torch.Tensor | None
) -> torch.Tensor:
    """Key-major bags of local ids pooled into the ``[B, F * D]`` output, one call per feature
    reading its table's rows and writing its column block in place (the same sums, bag by bag,
    as one call over all features). Nothing id-sized is allocated, and the output is on huge
    pages when big: on a CPU a fresh buffer is page-faulted in again on every step whenever the
    heap was trimmed after the previous one, which made this forward up to twice as slow from
    one process to the next."""
    weight, dim, rows = group.storage, group.dim, group.row_starts
    out = empty_rows((batch_size, len(sm.length_per_feature) * dim), weight.dtype, weight.device)
    # Row f is feature f's B + 1 offsets (a view: consecutive rows share an entry), from 0.
    windows = sm.offsets.unfold(0, batch_size + 1, batch_size)
    offsets = windows - windows[:, :1]
    start = 0
    for f, n in enumerate(sm.length_per_feature):
        t = group.feature_tables[f]
        torch.ops.aten._embedding_bag_forward_only.out(
            weight[rows[t] : rows[t + 1]],
            sm.ids[start : start + n],
            offsets[f],
            False,
            0,  # sum
            False,
            None if psw is None else psw[start : start + n],
            True,  # include_last_offset
            -1,
            out0=out[:, f * dim : (f + 1) * dim],
            # The kernel's other outputs, empty so that it may size them (eager and compiled
            # sizes differ by one; resizing a non-empty one warns).
            out1=torch.empty(0, dtype=torch.int64),
            out2=torch.empty(0, dtype=torch.int64),
            out3=torch.empty(0, dtype=torch.int64),
        )
        start += n
    return out


def _sparse_grad(ctx: Any, grad: torch.Tensor) -> SparseGrad:
    """The output gradient of a pooled lookup as per-bag rows, with each id's bag."""
    group: TorchGroup = ctx.group
    sm: _SampleMajor = ctx.sm
    # The output gradient is read in place, sample-major (row ``b * F + f`` is bag (f, b)):
    # key-major ids point at their bag's row there instead of transposing the gradient.
    grad_bags = grad.contiguous().view(-1, group.dim)
    ids = group._storage_rows(sm.ids, sm.length_per_feature) if sm.local_ids else sm.ids
    bag = None
    if sm.key_major:
        assert sm.lengths is not None
        batch, nf = ctx.shape
        bag = group._key_major_bag_rows(sm.lengths, batch, nf, sm.ids.numel())
    elif sm.lengths is not None:
        bag = torch.repeat_interleave(
            group._arange(grad_bags.shape[0], grad_bags.device),
            sm.lengths,
            output_size=sm.ids.numel(),
        )
    return SparseGrad(ids=ids, grad_bags=grad_bags, bag=bag, psw=sm.psw)


class _WeightedPooledLookup(torch.autograd.Function):
    """``_PooledLookup`` whose per-id weights ``psw`` are an input that needs a gradient.

    A bag is ``sum_i psw_i * row_i``, so ``grad psw_i = <grad of i's bag, row_i>``, read from the
    rows the forward used: before the fused update of backward changes them. (A MEAN bag's
    ``1 / length`` is already in ``psw``; autograd carries it to the KJT's weights.)
    """

    @staticmethod
    def forward(
        ctx: Any,
        group: TorchGroup,
        sm: _SampleMajor,
        batch_size: int,
        num_features: int,
        psw: torch.Tensor,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        out: torch.Tensor = _PooledLookup.forward(ctx, group, sm, batch_size, num_features, *params)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        group: TorchGroup = ctx.group
        sparse = _sparse_grad(ctx, grad)
        per_id = sparse.grad_bags if sparse.bag is None else sparse.grad_bags[sparse.bag]
        rows = group.storage.index_select(0, sparse.ids).to(per_id.dtype)
        grad_psw = (per_id * rows).sum(dim=1).to(ctx.sm.psw.dtype)
        param_grads = group.backward_rows(sparse, ctx.num_params, ctx.sm, ctx.shape[0])
        return (None, None, None, None, grad_psw, *param_grads)


class _SequenceLookup(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, group: TorchGroup, ids: torch.Tensor, *params: torch.Tensor
    ) -> torch.Tensor:
        out = F.embedding(ids, group.storage)
        ctx.group = group
        ctx.num_params = len(params)
        ctx.save_for_backward(ids)
        return out.float() if out.dtype != torch.float32 else out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        group: TorchGroup = ctx.group
        (ids,) = ctx.saved_tensors
        sparse = SparseGrad(ids=ids, grad_bags=grad.contiguous(), bag=None, psw=None)
        param_grads = group.backward_rows(sparse, ctx.num_params)
        return (None, None, *param_grads)
