"""``TableBatchedEmbedding``: all tables of a module looked up in one fused call per group.

This is the contract the embedding modules and the sharders build on::

    tbe = TableBatchedEmbedding(
        tables=[TableSpec(name="t0", num_embeddings=100, embedding_dim=8), ...],
        features=[FeatureSpec(name="f0", table="t0"), FeatureSpec(name="f1", table="t0"), ...],
        pooled=True,                 # False: sequence (unpooled) mode
        is_weighted=False,           # True: the KJT's weights scale each id
        # None: plain mode (.grad); else the update is fused into backward
        optimizer=FusedOptimizerConfig(optimizer=OptimizerType.SGD, learning_rate=0.1),
        backend=None,                # torch | fbgemm | auto; None: $SHARDREC_KERNEL_BACKEND
        # (the backend of tables whose TableSpec.storage is None; a StorageChoice names another)
        device=torch.device("cpu"),  # "meta": nothing allocated until reset_parameters()/to_empty()
    )
    pooled = tbe(kjt)                # kjt.keys() == the feature names, in order

Shapes (``F`` features, ``B`` samples, ``L[f][b]`` ids in bag ``(f, b)``, ``D_f`` feature f's dim)::

    pooled:   (F, B, L[f][b]) -> [B, D_0 + ... + D_{F-1}]      feature-major column blocks, fp32
    sequence: (F, B, L[f][b]) -> [[sum_b L[f][b], D_f] for f]   a list, one tensor per feature, fp32

Storage: each table's storage backend (``TableSpec.storage``, else ``backend=``; see
``shardrec.kernels.storage``) holds it; tables are grouped by backend and the backend's key (torch
backend: by data type and dim; FBGEMM: by data type and pooling); each group holds one fused tensor,
and ``weights[<table>]`` is an ``nn.Parameter`` that is a view into it. In plain mode the parameters
get ``.grad`` (dense, like ``nn.EmbeddingBag``); with a fused optimizer backward updates the touched
rows in place, the parameters have ``requires_grad=False``, and autograd still flows through the
output to whatever produced its inputs' consumers. ``deferred_update=True`` (with an optimizer;
torch backend) splits the two: backward keeps each table's dense gradient and the rows it touched
inside the lookup (the parameters still have ``requires_grad=False``: no outside optimizer steps
them), a hook from :meth:`TableBatchedEmbedding.register_update_hook` runs once every group's
backward is in, and :meth:`TableBatchedEmbedding.apply_update` applies the fused optimizer to the
rows it is given from the gradients it is given (a data-parallel replica sums them over ranks in
between). ``table_weights()``/``optimizer_states()`` return views,
``load_table_weights()``/``load_optimizer_states()`` copy into them. Moving the module
(``.to(device)``, ``to_empty``) moves the fused storage and re-points the parameters;
``.half()``/``.double()`` leave the tables' data types as configured.

Batches are checked (``check_inputs=True``, the default; see ``shardrec.kernels.input_checks``):
ids that are not integers, a negative length, or an id < 0 or >= the table's rows raise
:class:`~shardrec.kernels.input_checks.BadBatchError` (a ValueError) naming the feature, the table,
the id and its sample, never an out-of-bounds read. ``check_inputs=False`` keeps only the dtype
check (free); a bad id is then undefined behaviour (FBGEMM's kernel reads out of bounds).

``device=None`` is torch's default device, so ``with torch.device("meta"):`` builds on meta.

``copy.deepcopy``, ``torch.save``/``torch.load`` and ``pickle`` give a lookup whose parameters are
views of its own copied storage (it trains and checkpoints its own tables). Plain ``pickle`` writes
the fused storage once per table view (torch's storages are only shared within ``torch.save``):
prefer ``torch.save`` for big tables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Self

import torch
from torch import nn

from shardrec import ops
from shardrec.kernels.fbgemm_backend import FbgemmGroup
from shardrec.kernels.group import GroupInput, LookupGroup
from shardrec.kernels.input_checks import BadBatchError, BatchChecker
from shardrec.kernels.specs import (
    FeatureSpec,
    FusedOptimizerConfig,
    KernelBackend,
    PoolingType,
    TableSpec,
    requested_backend,
)
from shardrec.kernels.storage import StorageBackend
from shardrec.kernels.storage_groups import build_groups, resolve_default_backend
from shardrec.kernels.torch_backend import TorchGroup

if TYPE_CHECKING:
    from shardrec.sparse import KeyedJaggedTensor

__all__ = ["TableBatchedEmbedding"]

InitFn = Callable[[torch.Tensor], object]


class TableBatchedEmbedding(nn.Module):
    """Fused lookup over several tables; see the module docstring for the contract."""

    def __init__(
        self,
        *,
        tables: Sequence[TableSpec],
        features: Sequence[FeatureSpec],
        pooled: bool = True,
        is_weighted: bool = False,
        optimizer: FusedOptimizerConfig | None = None,
        backend: KernelBackend | str | None = None,
        device: torch.device | str | None = None,
        check_inputs: bool = True,
        deferred_update: bool = False,
        storage_backends: Mapping[str, StorageBackend] | None = None,
    ) -> None:
        """``storage_backends``: name -> backend for the tables' ``StorageChoice``; None: the
        built-in backends and those of installed plugins (the plugin manager's)."""
        super().__init__()
        self.tables: tuple[TableSpec, ...] = tuple(tables)
        self.features: tuple[FeatureSpec, ...] = tuple(features)
        self.pooled = pooled
        self.is_weighted = is_weighted
        self.optimizer = optimizer
        self.feature_names: tuple[str, ...] = tuple(f.name for f in self.features)
        table_index = _validate(self.tables, self.features, pooled)
        self._feature_table = [table_index[f.name] for f in self.features]
        #: Whether each lookup checks its batch (lengths >= 0, ids inside their tables): one pass
        #: over the ids and one host read. Callers that checked the batch already turn it off.
        self.check_inputs = check_inputs
        self._checker = BatchChecker(
            "TableBatchedEmbedding",
            self.feature_names,
            [f.table for f in self.features],
            [self.tables[t].num_embeddings for t in self._feature_table],
        )
        # None: the default device (``with torch.device("meta"):`` builds on meta, as torch does).
        target = torch.device(device) if device is not None else torch.get_default_device()
        self.deferred_update = _check_deferred(deferred_update, optimizer, backend)
        #: The backend of the tables without a storage choice (``auto`` resolved).
        self.backend = (
            KernelBackend.TORCH
            if deferred_update
            else resolve_default_backend(
                requested_backend(backend), self.tables, pooled, is_weighted, optimizer, target
            )
        )
        built = build_groups(
            tables=self.tables,
            feature_table=self._feature_table,
            pooled=pooled,
            is_weighted=is_weighted,
            optimizer=optimizer,
            default_backend=self.backend,
            device=target,
            deferred_update=self.deferred_update,
            storage_backends=storage_backends,
        )
        self._groups: list[LookupGroup] = [b.group for b in built]
        #: Per group: the name of the storage backend that built it.
        self.group_backends: tuple[str, ...] = tuple(b.backend for b in built)
        # Per group: its module-level table indices and feature indices (ascending).
        self._group_tables: list[list[int]] = [b.table_ids for b in built]
        self._group_features: list[list[int]] = [b.feature_ids for b in built]
        self.weights = nn.ParameterDict()
        for name, view in self._table_views().items():
            self.weights[name] = nn.Parameter(view, requires_grad=optimizer is None)
        # Fused mode: a placeholder that requires grad makes autograd call our backward.
        self._trigger = torch.zeros(0, requires_grad=optimizer is not None)

    # ---- construction -------------------------------------------------------------------------

    def _table_views(self) -> dict[str, torch.Tensor]:
        views: dict[str, torch.Tensor] = {}
        for group, table_ids in zip(self._groups, self._group_tables, strict=True):
            for t, view in zip(table_ids, group.table_weights(), strict=True):
                views[self.tables[t].name] = view
        return {spec.name: views[spec.name] for spec in self.tables}

    def _repoint_parameters(self) -> None:
        with torch.no_grad():
            for name, view in self._table_views().items():
                param = self.weights[name]
                if param.device.type == view.device.type:
                    param.data = view
                else:
                    # ``.data`` cannot change the tensor type (meta -> cpu, cpu -> cuda); swapping
                    # keeps the same Parameter object, so holders of it (the collections) follow.
                    fresh = nn.Parameter(view, requires_grad=param.requires_grad)
                    torch.utils.swap_tensors(param, fresh)  # type: ignore[no-untyped-call]

    def __setstate__(self, state: dict[str, Any]) -> None:
        # ``copy.deepcopy`` and unpickling copy the fused storage and every parameter separately:
        # re-point the copied parameters at the copied storage, or the copy's lookups would read
        # tables that its parameters (state_dict, checkpoints, optimizers) no longer see.
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        self._repoint_parameters()

    # ---- device handling ----------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._groups[0].device

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Self:
        # Only device moves apply to the fused storage: learn the target device from a probe tensor.
        probe = fn(torch.empty(0, device=self.device))
        self._move_to(probe.device)
        return self

    def _move_to(self, device: torch.device) -> None:
        for group in self._groups:
            group.move_to(device)
        self._repoint_parameters()

    def reset_parameters(
        self,
        init_fns: Mapping[str, InitFn] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Materialise (from meta: on ``device``, default cpu) and initialise every table.

        ``init_fns[table]`` is called on the table's weight view; tables without one get
        ``uniform(-sqrt(1/rows), sqrt(1/rows))``. Optimizer states are zeroed.
        """
        if self.device.type == "meta" or device is not None:
            self._move_to(torch.device(device) if device is not None else torch.device("cpu"))
        init_fns = init_fns or {}
        with torch.no_grad():
            for spec, view in zip(self.tables, self.table_weights().values(), strict=True):
                fn = init_fns.get(spec.name)
                if fn is not None:
                    fn(view)
                else:
                    bound = (1.0 / spec.num_embeddings) ** 0.5
                    view.uniform_(-bound, bound)
            for states in self.optimizer_states().values():
                for tensor in states.values():
                    tensor.zero_()

    # ---- weights and states -------------------------------------------------------------------

    def table_weights(self) -> dict[str, torch.Tensor]:
        """``{table: [rows, dim] view}`` into the fused storage (detached)."""
        return {name: p.detach() for name, p in self.weights.items()}

    def optimizer_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{table: {state name: view}}``; names from :meth:`FusedOptimizerConfig.state_names`."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for group, table_ids in zip(self._groups, self._group_tables, strict=True):
            for t, states in zip(table_ids, group.table_states(), strict=True):
                out[self.tables[t].name] = states
        return {spec.name: out[spec.name] for spec in self.tables}

    def load_table_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Copy ``weights[table]`` into each named table (a subset is fine)."""
        views = self.table_weights()
        with torch.no_grad():
            for name, src in weights.items():
                if name not in views:
                    raise KeyError(f"no table named {name!r}; tables: {sorted(views)}")
                dst = views[name]
                if tuple(src.shape) != tuple(dst.shape):
                    raise ValueError(
                        f"weight for table {name!r} has shape {tuple(src.shape)},"
                        f" expected {tuple(dst.shape)}"
                    )
                dst.copy_(src)

    def load_optimizer_states(self, states: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Copy ``states[table][name]`` into the optimizer state views.

        Adam's ``step`` is shared by the tables stored together: loading it for one table sets it
        for its group, and two tables of one group given different steps raise ValueError.
        """
        views = self.optimizer_states()
        shared: dict[int, tuple[str, int]] = {}
        for table, named in states.items():
            src_step = named.get("step")
            dst_step = views.get(table, {}).get("step")
            if src_step is None or dst_step is None or src_step.numel() != 1:
                continue
            value = int(src_step.reshape(()).item())
            where = id(dst_step) if dst_step.device.type == "meta" else dst_step.data_ptr()
            first = shared.setdefault(where, (table, value))
            if first[1] != value:
                raise ValueError(
                    f"tables {first[0]!r} and {table!r} share one Adam step counter (they are"
                    f" stored together) but were given different steps ({first[1]} and {value})"
                )
        with torch.no_grad():
            for table, named in states.items():
                if table not in views:
                    raise KeyError(f"no table named {table!r}; tables: {sorted(views)}")
                for name, src in named.items():
                    if name not in views[table]:
                        raise KeyError(
                            f"table {table!r} has no optimizer state {name!r};"
                            f" it has {sorted(views[table])}"
                        )
                    dst = views[table][name]
                    if tuple(src.shape) != tuple(dst.shape):
                        raise ValueError(
                            f"optimizer state {name!r} of table {table!r} has shape"
                            f" {tuple(src.shape)}, expected {tuple(dst.shape)}"
                        )
                    dst.copy_(src)

    # ---- fused optimizer's learning rate --------------------------------------------------------

    @property
    def learning_rate(self) -> float:
        """The learning rate the fused optimizer applies in the next backward.

        Raises ValueError in plain mode (``optimizer=None``: an outside optimizer owns the rate).
        """
        config = self._require_fused("learning_rate")
        for group in self._groups:
            if isinstance(group, FbgemmGroup) and group.module is not None:
                return ops.tbe_learning_rate(group.module)
        return config.learning_rate

    def set_learning_rate(self, lr: float) -> None:
        """Use ``lr`` in every later fused update (all tables, both backends).

        Optimizer states (Adagrad sums, Adam moments and step count) are kept, so a step after
        ``set_learning_rate(lr)`` equals a step of a lookup built with ``learning_rate=lr`` and the
        same states. ``lr`` must be a finite number >= 0; raises ValueError in plain mode.
        """
        config = self._require_fused("set_learning_rate")
        if isinstance(lr, bool) or not isinstance(lr, int | float):
            raise TypeError(f"learning rate must be a number, got {type(lr).__name__}")
        updated = dataclasses.replace(config, learning_rate=float(lr))  # validates lr
        self.optimizer = updated
        for group in self._groups:
            group.set_optimizer(updated)

    def _require_fused(self, what: str) -> FusedOptimizerConfig:
        if self.optimizer is None:
            raise ValueError(
                f"{what}: this lookup has no fused optimizer (optimizer=None); its tables are"
                " trained through .grad by an outside optimizer, whose learning rate applies"
            )
        return self.optimizer

    # ---- deferred update ----------------------------------------------------------------------

    def register_update_hook(
        self, hook: Callable[[TableBatchedEmbedding], None]
    ) -> torch.utils.hooks.RemovableHandle:
        """Call ``hook(self)`` once per backward, after every group of tables that backward
        reached has left its gradient (``deferred_update=True`` only): the hook takes the
        gradients (:meth:`take_gradients`, :meth:`take_touched_rows`) and applies them
        (:meth:`apply_update`). Without a hook nothing is applied."""
        self._require_deferred("register_update_hook")

        # Every group's backward hands the one placeholder an (empty) gradient; autograd sums
        # them and accumulates once per backward, after the last group: then the hook runs.
        def arrived(trigger: torch.Tensor) -> None:
            trigger.grad = None
            hook(self)

        handle: torch.utils.hooks.RemovableHandle = (
            self._trigger.register_post_accumulate_grad_hook(arrived)  # type: ignore[no-untyped-call]
        )
        return handle

    def take_gradients(self) -> dict[str, torch.Tensor]:
        """``{table: [rows, dim] fp32}``: the gradients backward left since the last call
        (``deferred_update=True`` only; zeros for a table no backward reached), then forgotten."""
        self._require_deferred("take_gradients")
        out: dict[str, torch.Tensor] = {}
        for group, table_ids in zip(self._groups, self._group_tables, strict=True):
            assert isinstance(group, TorchGroup)  # deferred lookups run the torch backend
            grad = group.take_gradient()
            s = group.row_starts
            for local, t in enumerate(table_ids):
                out[self.tables[t].name] = grad[s[local] : s[local + 1]]
        return {spec.name: out[spec.name] for spec in self.tables}

    def _require_deferred(self, what: str) -> None:
        if not self.deferred_update:
            raise ValueError(
                f"{what}: this lookup applies its optimizer in backward; build it with"
                " deferred_update=True to apply updates from given gradients"
            )

    def take_touched_rows(self) -> dict[str, torch.Tensor]:
        """``{table: [rows] bool mask}``: the rows whose ids some backward read since the last
        call (``deferred_update=True`` only), then forgotten. With per-id weights of 0 or a zero
        output gradient a row can be touched with a zero gradient: Adam still updates it, as in
        fused mode."""
        self._require_deferred("take_touched_rows")
        out: dict[str, torch.Tensor] = {}
        for group, table_ids in zip(self._groups, self._group_tables, strict=True):
            assert isinstance(group, TorchGroup)  # deferred lookups run the torch backend
            mask = group.take_touched()
            s = group.row_starts
            for local, t in enumerate(table_ids):
                out[self.tables[t].name] = mask[s[local] : s[local + 1]]
        return {spec.name: out[spec.name] for spec in self.tables}

    def apply_update(
        self, grads: Mapping[str, torch.Tensor], rows: Mapping[str, torch.Tensor]
    ) -> None:
        """One step of the fused optimizer from given gradients (``deferred_update=True`` only).

        ``rows[table]``: distinct int64 row ids of the table to update; ``grads[table]``: the
        table's ``[rows, dim]`` gradient (dense, as :meth:`take_gradients` gives it, or summed over
        ranks), read at those rows only. A table missing from ``rows`` is not updated. Each group
        of tables stored together counts one update (Adam's step), as one backward in fused mode
        does; a row left out keeps its weight and its state, as a row no id touched does.
        """
        self._require_fused("apply_update")
        self._require_deferred("apply_update")
        names = {spec.name for spec in self.tables}
        unknown = sorted((set(grads) | set(rows)) - names)
        if unknown:
            raise KeyError(f"apply_update: no tables named {unknown}; tables: {sorted(names)}")
        for group, table_ids in zip(self._groups, self._group_tables, strict=True):
            assert isinstance(group, TorchGroup)  # deferred lookups run the torch backend
            ids: list[torch.Tensor] = []
            values: list[torch.Tensor] = []
            for local, t in enumerate(table_ids):
                spec = self.tables[t]
                picked = rows.get(spec.name)
                if picked is None or picked.numel() == 0:
                    continue
                grad = grads.get(spec.name)
                expected = (spec.num_embeddings, spec.embedding_dim)
                if grad is None or tuple(grad.shape) != expected:
                    got = None if grad is None else tuple(grad.shape)
                    raise ValueError(
                        f"apply_update: table {spec.name!r} needs a gradient of shape {expected}"
                        f" for its rows, got {got}"
                    )
                picked = picked.to(device=group.device, dtype=torch.int64)
                ids.append(picked + group.row_starts[local])
                values.append(grad.to(group.device).index_select(0, picked).float())
            if ids:
                group.apply_rows(torch.cat(ids), torch.cat(values))
            else:
                empty = torch.zeros(0, group.dim, device=group.device)
                group.apply_rows(torch.zeros(0, dtype=torch.int64, device=group.device), empty)

    # ---- lookup -------------------------------------------------------------------------------

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor | list[torch.Tensor]:
        """Pooled ``[B, sum of dims]``, or in sequence mode one ``[ids of f, D_f]`` per feature."""
        keys = tuple(features.keys())
        if keys != self.feature_names:
            raise ValueError(
                f"KeyedJaggedTensor keys {list(keys)} do not match this lookup's features"
                f" {list(self.feature_names)} (same names, same order)"
            )
        if features.variable_stride_per_key():
            raise ValueError("variable batch size per feature is not supported by this lookup")
        weights = features.weights_or_none() if self.is_weighted else None
        if self.is_weighted and weights is None:
            raise ValueError(
                "this lookup is weighted (is_weighted=True) but the KJT has no weights"
            )
        return self.lookup(
            values=features.values(),
            offsets=features.offsets(),
            length_per_feature=features.length_per_key(),
            batch_size=features.stride(),
            weights=weights,
        )

    def lookup(
        self,
        *,
        values: torch.Tensor,
        offsets: torch.Tensor,
        length_per_feature: Sequence[int],
        batch_size: int,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """The lookup on raw KJT tensors (key-major ``offsets``, ``F * batch_size + 1`` entries)."""
        num_f = len(self.features)
        lpk = [int(n) for n in length_per_feature]
        if len(lpk) != num_f or offsets.numel() != num_f * batch_size + 1:
            raise ValueError(
                f"expected {num_f} features × batch {batch_size}"
                f" ({num_f * batch_size + 1} offsets),"
                f" got {len(lpk)} lengths per feature and {offsets.numel()} offsets"
            )
        if self.device.type == "meta":
            return self._meta_output(values, lpk, batch_size)
        if values.device.type == "meta":
            raise ValueError(
                f"the batch is on the meta device but the tables are on {self.device}: a meta"
                " batch has no ids to look up (move the batch, or build the module on meta)"
            )
        if self.check_inputs:
            self._checker.check(values, offsets.diff(), lpk, batch_size)
        else:
            problem = self._checker.dtype_problem(values)  # free: the dtype is host metadata
            if problem is not None:
                raise BadBatchError(problem)
        values = values.to(torch.int64)
        offsets = offsets.to(torch.int64)
        if weights is not None and weights.dtype != torch.float32:
            weights = weights.float()
        starts = [0]
        for n in lpk:
            starts.append(starts[-1] + n)
        outs: list[torch.Tensor] = []
        for group, feats in zip(self._groups, self._group_features, strict=True):
            inp = _slice_features(values, offsets, weights, lpk, starts, feats, batch_size)
            params = self._params_for(group)
            outs.append(group.pooled(inp, params) if self.pooled else group.sequence(inp, params))
        if self.pooled:
            return self._assemble_pooled(outs)
        return self._assemble_sequence(outs, lpk)

    def _meta_output(
        self, values: torch.Tensor, lpk: list[int], batch_size: int
    ) -> torch.Tensor | list[torch.Tensor]:
        """What a lookup on meta tables gives: outputs of the right shapes, no data (for
        shape propagation while planning a model built on meta)."""
        problem = self._checker.dtype_problem(values)
        if problem is not None:
            raise BadBatchError(problem)
        dims = [self.tables[t].embedding_dim for t in self._feature_table]
        if self.pooled:
            return torch.empty(batch_size, sum(dims), device="meta")
        return [torch.empty(n, d, device="meta") for n, d in zip(lpk, dims, strict=True)]

    def _params_for(self, group: LookupGroup) -> list[torch.Tensor]:
        if self.optimizer is not None:
            return [self._trigger]
        idx = self._groups.index(group)
        return [self.weights[self.tables[t].name] for t in self._group_tables[idx]]

    def _assemble_pooled(self, outs: list[torch.Tensor]) -> torch.Tensor:
        if len(outs) == 1:
            return outs[0]
        blocks: list[torch.Tensor | None] = [None] * len(self.features)
        for out, feats in zip(outs, self._group_features, strict=True):
            dims = [self.tables[self._feature_table[f]].embedding_dim for f in feats]
            for f, block in zip(feats, torch.split(out, dims, dim=1), strict=True):
                blocks[f] = block
        return torch.cat([b for b in blocks if b is not None], dim=1)

    def _assemble_sequence(self, outs: list[torch.Tensor], lpk: list[int]) -> list[torch.Tensor]:
        rows: list[torch.Tensor | None] = [None] * len(self.features)
        for out, feats in zip(outs, self._group_features, strict=True):
            for f, piece in zip(
                feats, torch.split(out, [lpk[f] for f in feats], dim=0), strict=True
            ):
                rows[f] = piece
        return [r for r in rows if r is not None]

    def extra_repr(self) -> str:
        opt = self.optimizer.optimizer.value if self.optimizer is not None else "none (plain .grad)"
        return (
            f"tables={len(self.tables)}, features={len(self.features)}, pooled={self.pooled},"
            f" weighted={self.is_weighted}, optimizer={opt}, backend={self.backend.value}"
        )

    def named_table_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(table name, parameter)`` pairs, in table order."""
        for spec in self.tables:
            yield spec.name, self.weights[spec.name]


def _validate(
    tables: tuple[TableSpec, ...], features: tuple[FeatureSpec, ...], pooled: bool
) -> dict[str, int]:
    if not tables:
        raise ValueError("a lookup needs at least one table")
    index: dict[str, int] = {}
    for i, spec in enumerate(tables):
        if spec.name in index:
            raise ValueError(f"duplicate table name {spec.name!r}")
        if not spec.name or "." in spec.name:
            raise ValueError(f"table name {spec.name!r} must be non-empty and contain no '.'")
        if pooled and spec.pooling is PoolingType.NONE:
            raise ValueError(f"table {spec.name!r} has pooling NONE in a pooled lookup")
        index[spec.name] = i
    by_feature: dict[str, int] = {}
    seen: set[str] = set()
    for f in features:
        if f.name in seen:
            raise ValueError(f"feature {f.name!r} is listed twice")
        seen.add(f.name)
        if f.table not in index:
            raise ValueError(f"feature {f.name!r} reads unknown table {f.table!r}")
        by_feature[f.name] = index[f.table]
    return by_feature


def _check_deferred(
    deferred: bool, optimizer: FusedOptimizerConfig | None, backend: KernelBackend | str | None
) -> bool:
    if not deferred:
        return False
    if optimizer is None:
        raise ValueError("deferred_update=True needs a fused optimizer (optimizer=None given)")
    if backend is not None and requested_backend(backend) is KernelBackend.FBGEMM:
        raise ValueError(
            "deferred_update=True runs the torch backend (FBGEMM applies its optimizer only"
            " inside its own backward); backend='fbgemm' was asked for"
        )
    return True


def _slice_features(
    values: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor | None,
    lpk: list[int],
    starts: list[int],
    feats: list[int],
    batch_size: int,
) -> GroupInput:
    """The ids of features ``feats`` (ascending) as their own key-major input, offsets from 0."""
    num_f = len(lpk)
    if len(feats) == num_f:
        return GroupInput(values, offsets, weights, lpk, batch_size)
    runs: list[tuple[int, int]] = []
    for f in feats:
        if runs and runs[-1][1] == f:
            runs[-1] = (runs[-1][0], f + 1)
        else:
            runs.append((f, f + 1))
    vals: list[torch.Tensor] = []
    offs: list[torch.Tensor] = []
    wts: list[torch.Tensor] = []
    total = 0
    for a, b in runs:
        lo, hi = starts[a], starts[b]
        vals.append(values[lo:hi])
        if weights is not None:
            wts.append(weights[lo:hi])
        offs.append(offsets[a * batch_size : b * batch_size] - (lo - total))
        total += hi - lo
    offs.append(torch.full((1,), total, dtype=offsets.dtype, device=offsets.device))
    return GroupInput(
        values=vals[0] if len(vals) == 1 else torch.cat(vals),
        offsets=torch.cat(offs),
        weights=None if weights is None else (wts[0] if len(wts) == 1 else torch.cat(wts)),
        length_per_feature=[lpk[f] for f in feats],
        batch_size=batch_size,
    )
