"""Pieces every built-in sharding shares: the (table, feature) pairs of a module, input routing,
the local lookup over what other ranks sent, and the sharder base class.

A *pair* is one (table, feature) lookup of the unsharded module: its output name (``feature`` or
``feature@table``), the KJT key it reads and the table. Pairs are in the module's output order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch
from torch import nn

from shardrec.distributed import comm
from shardrec.distributed.async_comm import start_all_to_all_jagged
from shardrec.distributed.qcomm import QCommsConfig
from shardrec.distributed.types import (
    Awaitable,
    EmbeddingComputeKernel,
    LocalShard,
    ParameterSharding,
    ParameterStorage,
    ShardingEnv,
    TableShards,
)
from shardrec.kernels import FeatureSpec, FusedOptimizerConfig, TableBatchedEmbedding, TableSpec
from shardrec.modules import (
    BadBatchError,
    BatchChecker,
    EmbeddingBagCollection,
    EmbeddingCollection,
    PoolingType,
)
from shardrec.modules.configs import BaseEmbeddingConfig, EmbeddingBagConfig
from shardrec.sparse import JaggedTensor, KeyedJaggedTensor

EmbeddingModule = EmbeddingBagCollection | EmbeddingCollection


@dataclass(frozen=True, slots=True)
class Pair:
    name: str
    source: str
    table: str
    dim: int


@dataclass(frozen=True, slots=True)
class ModuleView:
    """What a sharder reads from the unsharded module, restricted to the planned tables."""

    pairs: list[Pair]
    configs: dict[str, BaseEmbeddingConfig]
    pooled: bool
    is_weighted: bool
    need_indices: bool  # EmbeddingCollection: output JaggedTensors carry the ids as weights
    optimizer: FusedOptimizerConfig | None
    weights: dict[str, torch.Tensor] | None  # None: the module is on meta
    states: dict[str, dict[str, torch.Tensor]] | None
    check_inputs: bool  # the module's setting: check every batch before distributing it

    @staticmethod
    def of(module: nn.Module, tables: Sequence[str]) -> ModuleView:
        if not isinstance(module, EmbeddingBagCollection | EmbeddingCollection):
            raise TypeError(f"cannot shard {type(module).__name__}")
        configs: list[BaseEmbeddingConfig]
        if isinstance(module, EmbeddingBagCollection):
            pooled, is_weighted, need_indices = True, module.is_weighted(), False
            configs = list(module.embedding_bag_configs())
        else:
            pooled, is_weighted, need_indices = False, False, module.need_indices()
            configs = list(module.embedding_configs())
        known = {c.name for c in configs}
        missing = [t for t in tables if t not in known]
        if missing:
            raise ValueError(
                f"the plan names tables {missing} that the module lacks: {sorted(known)}"
            )
        wanted = set(tables)
        pairs: list[Pair] = []
        for config, names in zip(configs, module.embedding_names_by_table(), strict=True):
            if config.name in wanted:
                for feature, name in zip(config.feature_names, names, strict=True):
                    pairs.append(Pair(name, feature, config.name, config.embedding_dim))
        lookup = module.lookup
        on_meta = lookup.device.type == "meta"
        return ModuleView(
            pairs=pairs,
            configs={c.name: c for c in configs if c.name in wanted},
            pooled=pooled,
            is_weighted=is_weighted,
            need_indices=need_indices,
            optimizer=lookup.optimizer,
            weights=None if on_meta else lookup.table_weights(),
            states=None if on_meta else lookup.optimizer_states(),
            check_inputs=module.check_inputs,
        )

    def pooling(self, table: str) -> PoolingType:
        config = self.configs[table]
        if isinstance(config, EmbeddingBagConfig):
            return PoolingType(config.pooling)
        return PoolingType.NONE


class PairRouter:
    """Picks and orders a KJT's keys for a list of pair sources (cached per key order)."""

    def __init__(self, sources: Sequence[str], owner: str) -> None:
        self.sources = list(sources)
        self.owner = owner
        self._cache: dict[tuple[str, ...], list[int] | None] = {}

    def route(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        if not isinstance(kjt, KeyedJaggedTensor):
            raise TypeError(f"{self.owner}: expected a KeyedJaggedTensor, got {type(kjt).__name__}")
        keys = tuple(kjt.keys())
        if keys not in self._cache:
            index = {k: i for i, k in enumerate(keys)}
            absent = [s for s in self.sources if s not in index]
            if absent:
                raise ValueError(
                    f"{self.owner}: features {absent} missing from the KJT (keys: {list(keys)})"
                )
            wanted = [index[s] for s in self.sources]
            self._cache[keys] = None if wanted == list(range(len(keys))) else wanted
        order = self._cache[keys]
        return kjt if order is None else kjt.permute(order)


@dataclass(frozen=True, slots=True)
class Received:
    """What an input distribution leaves for the lookup: this rank's routed batch (its own
    samples, in the order the sharded module reads them) and the ids every rank sent here."""

    routed: KeyedJaggedTensor
    got: comm.JaggedAllToAllResult


class BatchGuard:
    """Checks this rank's batch before it is distributed, and makes a bad batch on any rank
    raise on every rank.

    ``local_flag`` reduces the routed batch to a 0-d tensor with no host read; the sharded module
    folds it into a collective every rank runs anyway (the split exchange of its input
    all-to-all) or, when it has none, into :func:`comm.flagged_ranks`. When a rank flagged,
    ``raise_for`` gathers each flagging rank's description (feature, table, the user's id, sample)
    and every rank raises the same :class:`BadBatchError`: no rank returns output, none waits.
    ``sources``/``tables``/``rows`` describe the routed KJT's keys, in order.
    """

    def __init__(
        self,
        kind: str,
        sources: Sequence[str],
        tables: Sequence[str],
        rows: Sequence[int],
        *,
        enabled: bool,
        env: ShardingEnv,
    ) -> None:
        self.kind = kind
        self.checker = BatchChecker(kind, sources, tables, rows)
        self.enabled = enabled
        self.env = env

    @staticmethod
    def of(view: ModuleView, pairs: Sequence[Pair], kind: str, env: ShardingEnv) -> BatchGuard:
        return BatchGuard(
            kind,
            [p.source for p in pairs],
            [p.table for p in pairs],
            [view.configs[p.table].num_embeddings for p in pairs],
            enabled=view.check_inputs,
            env=env,
        )

    def local_flag(self, routed: KeyedJaggedTensor) -> torch.Tensor:
        """Nonzero when this rank's batch is bad: the dtype always, the contents when enabled."""
        values = routed.values()
        if self.checker.dtype_problem(values) is not None:
            return torch.ones((), dtype=torch.bool, device=values.device)
        if not self.enabled:
            return torch.zeros((), dtype=torch.bool, device=values.device)
        return self.checker.problem_flag(values, routed.lengths(), routed.length_per_key())

    def check_alone(self, routed: KeyedJaggedTensor) -> None:
        """Checks disabled, no collective to carry a flag: the free dtype check, on this rank."""
        problem = self.checker.dtype_problem(routed.values())
        if problem is not None:
            raise BadBatchError(f"rank {self.env.rank}: {problem}", ranks=(self.env.rank,))

    def send_nothing(
        self, routed: KeyedJaggedTensor, ids: torch.Tensor, reject: torch.Tensor
    ) -> Awaitable[comm.JaggedAllToAllResult]:
        """Enter the split exchange of a batch that failed its checks here with no ids at all:
        every rank learns of it there (bucketing negative lengths would go wrong). ``ids``: any
        tensor of the dtype the module sends its ids in."""
        world = self.env.world_size
        return start_all_to_all_jagged(
            routed.lengths()[:0],
            ids[:0],
            None,
            lengths_per_rank=[0] * world,
            values_per_rank=[0] * world,
            batch_size=routed.stride(),
            pg=self.env.pg,
            reject=reject,
        )

    def received(self, routed: KeyedJaggedTensor, got: comm.JaggedAllToAllResult) -> Received:
        """The context of a finished input distribution; raises on every rank if any rejected."""
        if got.rejected_by:
            self.raise_for(routed, got.rejected_by)
        return Received(routed, got)

    def raise_for(self, routed: KeyedJaggedTensor, ranks: Sequence[int]) -> NoReturn:
        """Raise on every rank (all of them call this with the same ``ranks``)."""
        mine: str | None = None
        if self.env.rank in ranks:
            mine = self.checker.find_problem(
                routed.values(), routed.lengths(), routed.length_per_key(), routed.stride()
            )
            mine = mine or f"{self.kind}: the batch failed its checks"
        problems = comm.gather_objects(mine, self.env.pg)
        lines = [f"rank {r}: {p}" for r, p in enumerate(problems) if p is not None]
        raise BadBatchError(
            f"{self.kind}: the batch of rank(s) {list(ranks)} failed its checks (every rank"
            " raises this error; no rank returned output):\n  " + "\n  ".join(lines),
            ranks=ranks,
        )


@dataclass(frozen=True, slots=True)
class LocalTable:
    """One table this rank holds: a rectangle of a global table."""

    name: str  # the local kernel's table name
    table: str  # the global table
    row_offset: int
    col_offset: int
    rows: int
    cols: int
    global_rows: int
    global_cols: int


def build_local_lookup(
    view: ModuleView,
    local_tables: Sequence[LocalTable],
    features: Sequence[tuple[str, str]],
    *,
    pooling_sum: bool,
    device: torch.device,
    optimizer: FusedOptimizerConfig | None,
    check_inputs: bool = True,
    deferred_update: bool = False,
) -> TableBatchedEmbedding | None:
    """The fused kernel over this rank's shards, filled from the unsharded module.

    ``features`` are (kernel feature name, local table name). Returns None when the rank holds
    nothing. ``pooling_sum`` forces SUM pooling (row-wise: partial sums, MEAN applied after).
    ``check_inputs``: whether the kernel checks the (shard-local) ids it gets; a sharded module
    that checks the user's batch with a :class:`BatchGuard` before distributing it passes False.
    ``deferred_update``: backward leaves the gradients to the caller, which applies the fused
    optimizer later (a data-parallel replica, after summing them over ranks).
    """
    if not local_tables:
        return None
    specs = []
    for lt in local_tables:
        config = view.configs[lt.table]
        pooling = view.pooling(lt.table)
        if pooling is PoolingType.MEAN and pooling_sum:
            pooling = PoolingType.SUM
        specs.append(
            TableSpec(
                name=lt.name,
                num_embeddings=lt.rows,
                embedding_dim=lt.cols,
                pooling=pooling,
                data_type=config.data_type,
            )
        )
    tbe = TableBatchedEmbedding(
        tables=specs,
        features=[FeatureSpec(name=n, table=t) for n, t in features],
        pooled=view.pooled,
        is_weighted=view.is_weighted,
        optimizer=optimizer,
        device=device,
        check_inputs=check_inputs,
        deferred_update=deferred_update,
    )
    if view.weights is None:
        init = {}
        for lt in local_tables:
            fn = view.configs[lt.table].init_fn
            if fn is not None:
                init[lt.name] = fn
        tbe.reset_parameters(init_fns=init, device=device)
        return tbe
    tbe.load_table_weights(
        {
            lt.name: view.weights[lt.table][
                lt.row_offset : lt.row_offset + lt.rows, lt.col_offset : lt.col_offset + lt.cols
            ]
            for lt in local_tables
        }
    )
    if view.states is not None:
        states: dict[str, dict[str, torch.Tensor]] = {}
        local_views = tbe.optimizer_states()
        for lt in local_tables:
            for name, src in view.states.get(lt.table, {}).items():
                target = local_views.get(lt.name, {}).get(name)
                if target is None:
                    # A lookup without that state (a data-parallel table, trained by the dense
                    # optimizer) keeps none of the fused optimizer's.
                    continue
                if src.dim() == 0:
                    # A per-table scalar (Adam's step): the same on every shard of the table.
                    if target.dim() == 0:
                        states.setdefault(lt.name, {})[name] = src
                    continue
                rows = src[lt.row_offset : lt.row_offset + lt.rows]
                if src.dim() == 2 and target.dim() == 2:
                    rows = rows[:, lt.col_offset : lt.col_offset + lt.cols]
                if tuple(rows.shape) == tuple(target.shape):
                    states.setdefault(lt.name, {})[name] = rows
        tbe.load_optimizer_states(states)
    return tbe


def table_shards(
    tbe: TableBatchedEmbedding | None,
    local_tables: Sequence[LocalTable],
    all_tables: Sequence[str],
    *,
    replicated: bool = False,
) -> dict[str, TableShards]:
    """Per global table, this rank's weight and optimizer-state shards (views)."""
    out = {t: TableShards(weight=[], optimizer_state={}, replicated=replicated) for t in all_tables}
    if tbe is None:
        return out
    weights = tbe.table_weights()
    states = tbe.optimizer_states()
    for lt in local_tables:
        entry = out[lt.table]
        gshape = (lt.global_rows, lt.global_cols)
        entry.weight.append(LocalShard(weights[lt.name], (lt.row_offset, lt.col_offset), gshape))
        for name, tensor in states[lt.name].items():
            if tensor.dim() == 0:
                # A per-table scalar (Adam's step): every shard holds the same value.
                shard = LocalShard(tensor, (), ())
            elif tensor.dim() == 1:
                shard = LocalShard(tensor, (lt.row_offset,), (lt.global_rows,))
            else:
                shard = LocalShard(tensor, (lt.row_offset, lt.col_offset), gshape)
            entry.optimizer_state.setdefault(name, []).append(shard)
    return out


def storage_bytes(tensor: torch.Tensor, compute_device_type: str) -> dict[str, int]:
    kind = ParameterStorage.DDR if compute_device_type == "cpu" else ParameterStorage.HBM
    return {kind.value: tensor.numel() * tensor.element_size()}


class EmbeddingSharderBase:
    """A sharder of one sharding type for an EmbeddingBagCollection or an EmbeddingCollection."""

    sharding_type: str
    kernels: tuple[str, ...] = (EmbeddingComputeKernel.FUSED.value,)

    def __init__(self, module_type: type[nn.Module]) -> None:
        if module_type not in (EmbeddingBagCollection, EmbeddingCollection):
            raise TypeError(f"no built-in sharder for {module_type.__name__}")
        self._module_type = module_type

    @property
    def module_type(self) -> type[nn.Module]:
        return self._module_type

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return [self.sharding_type]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        return list(self.kernels) if sharding_type == self.sharding_type else []

    def storage_usage(
        self, tensor: torch.Tensor, compute_device_type: str, compute_kernel: str
    ) -> dict[str, int]:
        return storage_bytes(tensor, compute_device_type)

    def check_plan(self, params: Mapping[str, ParameterSharding], env: ShardingEnv) -> None:
        for table, ps in params.items():
            if ps.sharding_type != self.sharding_type:
                raise ValueError(
                    f"{type(self).__name__} got table {table!r} planned {ps.sharding_type!r}"
                )
            bad = [r for r in ps.ranks if not 0 <= r < env.world_size]
            if bad:
                raise ValueError(
                    f"table {table!r}: ranks {bad} outside world size {env.world_size}"
                )

    def qcomms_of(self, params: Mapping[str, ParameterSharding]) -> QCommsConfig | None:
        """The wire dtypes of the part's pooled outputs: its tables share one output collective,
        so their plans must agree (None, or all fp32: no compression)."""
        configs = {table: ps.qcomms for table, ps in params.items()}
        chosen = {c for c in configs.values() if c is not None and not c.is_fp32}
        if len(chosen) > 1 or (chosen and None in configs.values()):
            listed = ", ".join(f"{t}: {c}" for t, c in configs.items())
            raise ValueError(
                f"{self.sharding_type} tables of one module share their output collective, so"
                f" their qcomms must agree; got {listed}"
            )
        return next(iter(chosen), None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._module_type.__name__})"


@dataclass(frozen=True, slots=True)
class StackedInput:
    """What every rank sent us, as one key-major batch: sender blocks stacked along the batch.

    Sample ``s * batch + b`` is sample ``b`` of rank ``s`` (bags past rank ``s``'s batch are
    empty), so the pooled output's rows for rank ``s`` are one contiguous block: when every rank
    has the same batch, the output *is* the send buffer of the output all-to-all.
    ``seg_len[s][f]`` counts the ids rank ``s`` sent for feature ``f``.
    """

    values: torch.Tensor
    offsets: torch.Tensor
    weights: torch.Tensor | None
    length_per_feature: list[int]
    batch: int  # per sender (the largest batch)
    batches: list[int]
    seg_len: list[list[int]]


def stack_senders(
    lengths: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor | None,
    lengths_per_rank: Sequence[int],
    batches: Sequence[int],
    n_features: int,
) -> StackedInput:
    """Reorder a jagged all-to-all's result (sender-major) into feature-major, senders stacked."""
    world = len(batches)
    b_max = max(batches) if batches else 0
    pieces = [
        p.view(n_features, b)
        for p, b in zip(torch.split(lengths, list(lengths_per_rank)), batches, strict=True)
    ]
    if all(b == b_max for b in batches):
        grid = torch.stack(pieces, dim=1) if world > 1 else pieces[0].unsqueeze(1)
    else:
        grid = lengths.new_zeros((n_features, world, b_max))
        for s, p in enumerate(pieces):
            grid[:, s, : batches[s]] = p
    seg = torch.stack([p.sum(dim=1) for p in pieces]).to(torch.int64)  # [world, n_features]
    seg_len = seg.tolist()
    flat_lengths = grid.reshape(-1).to(torch.int64)
    offsets = torch.zeros(flat_lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(flat_lengths, 0, out=offsets[1:])
    if world > 1 and n_features > 1 and values.numel():
        # Segment (s, f) moves from sender-major to feature-major order.
        starts = torch.cumsum(seg.reshape(-1), 0) - seg.reshape(-1)
        seg_t = seg.t().reshape(-1)
        start_t = starts.view(world, n_features).t().reshape(-1)
        total = values.numel()
        shift = start_t - (torch.cumsum(seg_t, 0) - seg_t)
        index = torch.repeat_interleave(shift, seg_t, output_size=total) + torch.arange(
            total, device=values.device
        )
        values = values[index]
        if weights is not None:
            weights = weights[index]
    return StackedInput(
        values=values,
        offsets=offsets,
        weights=weights,
        length_per_feature=[sum(seg_len[s][f] for s in range(world)) for f in range(n_features)],
        batch=b_max,
        batches=list(batches),
        seg_len=seg_len,
    )


def pooled_send_buffer(out: torch.Tensor, stacked: StackedInput) -> tuple[torch.Tensor, list[int]]:
    """The rows of the stacked output that go back to each sender, flat, and their sizes."""
    width = out.shape[1] if out.dim() == 2 else 0
    sizes = [b * width for b in stacked.batches]
    if all(b == stacked.batch for b in stacked.batches):
        return out.reshape(-1), sizes
    cuts: list[int] = []
    for b in stacked.batches:
        cuts.extend((b, stacked.batch - b))
    parts = torch.split(out, cuts)
    return torch.cat([p.reshape(-1) for p in parts[0::2]]), sizes


def nothing_to_send(device: torch.device, received_weights: torch.Tensor | None) -> torch.Tensor:
    """The (empty) pooled send buffer of a rank that looked nothing up.

    When the per-id weights it received require grad, the buffer is an empty slice of them: their
    gradient is then zeros and the rank enters the weights' backward all-to-all like its peers,
    which would otherwise wait for it.
    """
    if received_weights is not None and received_weights.requires_grad:
        return received_weights[:0].to(torch.float32)
    return torch.zeros(0, device=device)


def sequence_send_buffer(
    rows: list[torch.Tensor], stacked: StackedInput
) -> tuple[torch.Tensor, list[int]]:
    """Per sender, its ids' rows feature by feature, flat; and the sizes per sender."""
    world = len(stacked.batches)
    chunks = [
        torch.split(r, [stacked.seg_len[s][f] for s in range(world)]) for f, r in enumerate(rows)
    ]
    per_sender = [[chunks[f][s].reshape(-1) for f in range(len(rows))] for s in range(world)]
    sizes = [sum(int(c.numel()) for c in cs) for cs in per_sender]
    flat = [c for cs in per_sender for c in cs]
    return (torch.cat(flat) if flat else stacked.values.new_zeros(0, dtype=torch.float32)), sizes


def sequence_output(
    values: torch.Tensor, routed: KeyedJaggedTensor, index: int, need_indices: bool
) -> JaggedTensor:
    """An EmbeddingCollection output for key ``index`` of ``routed``.

    With ``need_indices`` the ids ride in the weights slot (TorchRec's convention, as the
    unsharded collection does).
    """
    batch = routed.stride()
    lengths = routed.lengths()[index * batch : (index + 1) * batch]
    if not need_indices:
        return JaggedTensor(values=values, lengths=lengths)
    per_key = routed.offset_per_key()
    ids = routed.values()[per_key[index] : per_key[index + 1]]
    return JaggedTensor(values=values, weights=ids, lengths=lengths)


def check_tiling(
    table: str, sharding: str, pieces: str, cuts: Sequence[tuple[int, int, int]], total: int
) -> None:
    """``cuts`` (offset, size, rank), sorted by offset, must tile ``[0, total)``: no gap, no
    overlap, no empty piece. The error names the table and the pieces."""
    at = 0
    for offset, size, _ in cuts:
        if offset != at or size < 1:
            break
        at += size
    else:
        if at == total:
            return
    raise ValueError(
        f"{sharding} table {table!r}: {pieces} (offset, size, rank) {list(cuts)} do not tile"
        f" [0, {total})"
    )
