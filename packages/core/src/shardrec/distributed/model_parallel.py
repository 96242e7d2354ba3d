"""``DistributedModelParallel``: shards a model's embedding modules and data-parallelises the rest.

::

    model = DistributedModelParallel(module, device=torch.device("cpu"))
    print(model.plan)            # module, table, sharding type, kernel, ranks
    out = model(kjt)             # the unsharded module's output structure

With ``sharders=None`` the sharders come from the ``shardrec`` entry points (the built-in ones are
registered by the ``shardrec-sharders`` distribution, exactly as a third party would). With
``plan=None`` :func:`create_plan` makes one.
"""

from __future__ import annotations

import atexit
import gc
import inspect
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from shardrec.distributed.awaitables import AllOf, Mapped, Ready
from shardrec.distributed.planner import PlanReport, plan_with_report
from shardrec.distributed.plugins import load_sharder_registry
from shardrec.distributed.sharder_index import SharderIndex
from shardrec.distributed.sharding.contract import (
    AsyncOutputModule,
    NamedEmbeddingOutputs,
    ReplicatedModule,
    embedding_tables,
)
from shardrec.distributed.sharding.state_dict import table_key_prefix as key_prefix_of
from shardrec.distributed.sharding_plan import shardable_modules
from shardrec.distributed.types import (
    Awaitable,
    ModuleSharder,
    ParameterSharding,
    PipelinableModule,
    ShardedEmbeddingModule,
    ShardingEnv,
    ShardingPlan,
    TableShards,
)
from shardrec.sparse import JaggedTensor, KeyedJaggedTensor, KeyedTensor

__all__ = ["DistributedModelParallel", "ShardedModuleGroup", "create_plan", "shard_module"]


def create_plan(
    module: nn.Module,
    sharders: Sequence[ModuleSharder],
    env: ShardingEnv,
    device: torch.device,
) -> ShardingPlan:
    """The plan DMP uses when it is given none: the planner's, on ``env``'s ranks and ``device``
    (rank 0 plans and broadcasts)."""
    return plan_with_report(module, sharders, env, device)[0]


class ShardedModuleGroup(nn.Module):
    """One embedding module sharded by several sharders: each part serves some tables.

    Every part reads the same input KJT and picks its own features; outputs are merged back into
    the unsharded module's order (a KeyedTensor, or a dict of JaggedTensors).
    """

    def __init__(self, parts: Sequence[nn.Module], output_names: Sequence[str]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.output_names = list(output_names)
        self._columns: torch.Tensor | None = None

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor | dict[str, JaggedTensor]:
        if self.parts_not_pipelinable():
            return self._merge([part(kjt) for part in self.parts])
        # Every part's ids travel at once, and each part's rows travel while the next computes.
        return self.compute_and_output_dist(self.input_dist(kjt).wait())

    def parts_not_pipelinable(self) -> list[str]:
        """The type names of parts without the :class:`PipelinableModule` split."""
        return [type(p).__name__ for p in self.parts if not isinstance(p, PipelinableModule)]

    def input_dist(self, kjt: KeyedJaggedTensor) -> Awaitable[list[Any]]:
        """Every part's input distribution, started in part order (raises TypeError when a part
        has none: see :meth:`parts_not_pipelinable`)."""
        missing = self.parts_not_pipelinable()
        if missing:
            raise TypeError(f"parts {missing} have no input_dist/compute_and_output_dist")
        parts: list[PipelinableModule[Any]] = list(self.parts)  # type: ignore[arg-type]
        return AllOf([part.input_dist(kjt) for part in parts])

    def compute_and_output_dist(self, ctx: list[Any]) -> KeyedTensor | dict[str, JaggedTensor]:
        return self.compute_and_start_output_dist(ctx).wait()

    def compute_and_start_output_dist(
        self, ctx: list[Any]
    ) -> Awaitable[KeyedTensor | dict[str, JaggedTensor]]:
        """Each part's lookup and output distribution, in part order; a part that can leave its
        output distribution in flight (:class:`AsyncOutputModule`) does, and ``wait()`` waits for
        all and merges them."""
        pending: list[Awaitable[KeyedTensor | dict[str, JaggedTensor]]] = []
        for part, c in zip(self.parts, ctx, strict=True):
            if isinstance(part, AsyncOutputModule):
                pending.append(part.compute_and_start_output_dist(c))
            else:
                pipelinable: PipelinableModule[Any] = part  # type: ignore[assignment]
                pending.append(Ready(pipelinable.compute_and_output_dist(c)))
        return Mapped(AllOf(pending), self._merge)

    def _merge(
        self, outs: list[KeyedTensor | dict[str, JaggedTensor]]
    ) -> KeyedTensor | dict[str, JaggedTensor]:
        if all(isinstance(o, KeyedTensor) for o in outs):
            kts: list[KeyedTensor] = outs  # type: ignore[assignment]
            keys = [k for kt in kts for k in kt.keys()]  # noqa: SIM118
            dims = [d for kt in kts for d in kt.length_per_key()]
            values = torch.cat([kt.values() for kt in kts], dim=1)
            if keys != self.output_names:
                if self._columns is None or self._columns.device != values.device:
                    starts = [0]
                    for d in dims:
                        starts.append(starts[-1] + d)
                    at = {k: i for i, k in enumerate(keys)}
                    cols = [
                        c
                        for name in self.output_names
                        for c in range(starts[at[name]], starts[at[name] + 1])
                    ]
                    self._columns = torch.tensor(cols, dtype=torch.int64, device=values.device)
                values = values.index_select(1, self._columns)
                at = {k: i for i, k in enumerate(keys)}
                dims = [dims[at[name]] for name in self.output_names]
            return KeyedTensor(keys=self.output_names, length_per_key=dims, values=values)
        merged: dict[str, JaggedTensor] = {}
        for o in outs:
            assert isinstance(o, dict)
            merged.update(o)
        return {name: merged[name] for name in self.output_names}

    @property
    def table_key_prefix(self) -> str:
        """Where the unsharded module kept its tables: its parts' (each a ``TableKeyPrefixed``)."""
        prefixes = {key_prefix_of(p) for p in self.parts}
        if len(prefixes) != 1:
            raise TypeError(f"the parts of one module disagree on its table keys: {prefixes}")
        return prefixes.pop()

    def local_table_shards(self) -> dict[str, TableShards]:
        out: dict[str, TableShards] = {}
        for part in self.parts:
            if isinstance(part, ShardedEmbeddingModule):
                out.update(part.local_table_shards())
        return out


def _output_names(module: nn.Module) -> list[str]:
    if not isinstance(module, NamedEmbeddingOutputs):
        raise TypeError(
            f"{type(module).__name__} is planned with several sharding types, but has no"
            " embedding_names() to put the parts' outputs back in order"
        )
    return list(module.embedding_names())


def _sharder_for(
    sharders: Sequence[ModuleSharder], module: nn.Module, sharding_type: str, device_type: str
) -> ModuleSharder:
    offered = SharderIndex.of(sharders).offered(type(module), device_type)
    found = offered.get(sharding_type)
    if found is not None:
        return found
    raise ValueError(
        f"no sharder offers sharding type {sharding_type!r} for {type(module).__name__} on"
        f" {device_type}; offered: {sorted(offered)}"
    )


def shard_module(
    module: nn.Module,
    params: Mapping[str, ParameterSharding],
    sharders: Sequence[ModuleSharder],
    env: ShardingEnv,
    device: torch.device,
    fqn: str = "",
) -> nn.Module:
    """Shard one embedding module by its table plans; several sharders give a group.

    A sharder that owns several of the planned sharding types gets all their tables in one
    ``shard`` call (a managed-collision module's sharder shards its whole module at once)."""
    found = embedding_tables(module)
    if found is not None:
        tables = [c.name for c in found[0]]
        missing = [t for t in tables if t not in params]
        unknown = [t for t in params if t not in tables]
        if missing or unknown:
            # Name only what is wrong: an empty half would read as a second cause.
            problems = [f"tables {missing} have no sharding"] if missing else []
            problems += [f"planned tables {unknown} do not exist"] if unknown else []
            raise ValueError(
                f"plan for module {fqn or '<root>'!r}: {' and '.join(problems)} (tables: {tables})"
            )
    by_type: dict[str, dict[str, ParameterSharding]] = {}
    for table, ps in params.items():
        by_type.setdefault(str(ps.sharding_type), {})[table] = ps
    by_sharder: dict[int, tuple[ModuleSharder, dict[str, ParameterSharding]]] = {}
    for st, tp in by_type.items():
        sharder = _sharder_for(sharders, module, st, device.type)
        by_sharder.setdefault(id(sharder), (sharder, {}))[1].update(tp)
    parts = [sharder.shard(module, tp, env, device) for sharder, tp in by_sharder.values()]
    if len(parts) == 1:
        return parts[0]
    return ShardedModuleGroup(parts, _output_names(module))


def _no_per_forward_buffer_sync() -> dict[str, Any]:
    """DDP's option for it: ``forward_sync_buffers`` since torch 2.13 (which deprecates
    ``broadcast_buffers``, and keeps the sync at construction), ``broadcast_buffers`` before."""
    options = inspect.signature(DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in options:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


#: Every DMP that wrapped its dense part in DDP, for :func:`_release_data_parallel_at_exit`.
_WITH_DDP: weakref.WeakSet[DistributedModelParallel] = weakref.WeakSet()
_EXIT_HOOK: list[bool] = []


def _release_data_parallel_at_exit() -> None:
    """At interpreter exit, once the process groups are destroyed, let go of every DMP's DDP.

    DDP keeps its process group (in C++ too), so a DMP still alive at exit, a script's global for
    instance, would keep its group past ``destroy_process_group`` until Python's finalisation, where
    tearing down a gloo group can abort the process (``shardrec.distributed.group_ref`` says how).
    atexit runs while the interpreter is whole: the group is ended here, its threads joined. Shards
    refer to their group weakly already; a group not destroyed by then is left as it is.
    """
    if dist.is_available() and dist.is_initialized():
        return
    released = False
    for model in list(_WITH_DDP):
        if isinstance(model._dmp_wrapped, DistributedDataParallel):
            model._dmp_wrapped = model._module
            released = True
    if released:
        gc.collect()  # DDP's own reference cycles


def _group_outlives_reducer(ddp: DistributedDataParallel, group: dist.ProcessGroup) -> None:
    """Keep ``group``'s Python object until DDP's reducer (and its logger, which shares it) are
    gone, so that the group's last reference is that object, which torch releases without the GIL.

    The reducer holds its group in C++ and is destroyed holding the GIL: as the group's last
    holder it would join a gloo group's worker threads there, and a worker waiting for the GIL
    (to release the tensors of the last collective) would never finish: the process would hang.
    """
    found = (getattr(ddp, "reducer", None), getattr(ddp, "logger", None))
    holders = [holder for holder in found if holder is not None]
    kept: list[object] = [group]
    left = [len(holders)]

    def release() -> None:
        left[0] -= 1
        if left[0] == 0:
            kept.clear()

    for holder in holders:
        # Called once the holder's C++ object is destroyed; never early, at exit.
        weakref.finalize(holder, release).atexit = False


def _replace(root: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, name = fqn.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, name, new)


class DistributedModelParallel(nn.Module):
    """Shards every shardable submodule by the plan; wraps the rest in DistributedDataParallel.

    - ``env``: default ``ShardingEnv.from_process_group()`` (the default process group).
    - ``device``: where shards and dense layers live (default cpu).
    - ``plan``: default :func:`create_plan`. ``sharders``: default, those the entry points offer.
    - ``init_data_parallel``: wrap the unsharded parameters (dense layers, data-parallel tables)
      in DDP, which all-reduces their gradients (at world size 1 there is nothing to reduce and
      nothing is wrapped).
    - ``init_parameters``: materialise parameters left on the meta device (``reset_parameters``).

    A bad batch on any rank (an id outside its table, a negative length, ids that are not
    integers) raises the same :class:`~shardrec.kernels.BadBatchError` on every rank, naming the
    rank, the feature, the table and the user's id, before any id is distributed (the sharded
    modules inherit ``check_inputs`` from the modules they shard). A DMP cannot be deep-copied or
    pickled (TypeError): copy the unsharded model and shard the copy.

    ``model.plan`` prints as a table (``model.plan_report``: the planner's report, when DMP
    planned); ``model.module`` is the model with its sharded parts in
    place; ``model.local_table_shards()`` gives, per sharded module and table, this rank's weight
    and fused-optimizer-state shards with their global offsets (for checkpoints).
    """

    def __init__(
        self,
        module: nn.Module,
        env: ShardingEnv | None = None,
        device: torch.device | None = None,
        plan: ShardingPlan | None = None,
        sharders: Sequence[ModuleSharder] | None = None,
        init_data_parallel: bool = True,
        init_parameters: bool = True,
    ) -> None:
        super().__init__()
        self.env = env if env is not None else ShardingEnv.from_process_group()
        self.device = device if device is not None else torch.device("cpu")
        # One index of who shards what, asked by the planner and by every shard_module call.
        self.sharders = (
            SharderIndex(sharders) if sharders is not None else load_sharder_registry().sharders()
        )
        # The planner's report (per rank, per table, why) when DMP planned it.
        self.plan_report: PlanReport | None = None
        if plan is None:
            plan, self.plan_report = plan_with_report(module, self.sharders, self.env, self.device)
        self.plan = plan
        found = dict(shardable_modules(module, self.sharders))
        for fqn in self.plan.plan:
            if fqn not in found:
                raise ValueError(
                    f"the plan names module {fqn or '<root>'!r}, which is not a shardable"
                    f" submodule of the model (shardable: {sorted(found)})"
                )
        self._sharded_fqns: list[str] = []
        for fqn, sub in found.items():
            params = self.plan.get_plan_for_module(fqn)
            if params is None:
                continue
            sharded = shard_module(sub, params, self.sharders, self.env, self.device, fqn)
            if fqn == "":
                module = sharded
            else:
                _replace(module, fqn, sharded)
            self._sharded_fqns.append(fqn)
        if init_parameters:
            _materialize(module, self.device, self._sharded_fqns)
        self._module = module
        self._dmp_wrapped: nn.Module = module
        if init_data_parallel:
            self.init_data_parallel()

    def init_data_parallel(self) -> None:
        """Wrap the unsharded parameters in DDP (a no-op without a process group or such params,
        and at world size 1, where averaging gradients over one rank changes nothing)."""
        if (
            isinstance(self._dmp_wrapped, DistributedDataParallel)
            or self.env.pg is None
            or self.env.world_size == 1
        ):
            return
        ignore = [
            f"{fqn}.{name}" if fqn else name
            for fqn in self._sharded_fqns
            for name, _ in _named_tensors(self._module.get_submodule(fqn))
            if not _is_replicated(self._module.get_submodule(fqn), name)
        ]
        ignored = set(ignore)
        dense = [
            p for n, p in self._module.named_parameters() if n not in ignored and p.requires_grad
        ]
        if not dense:
            return
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(  # type: ignore[no-untyped-call]
            self._module, ignore
        )
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Gradients as views of DDP's buckets save a copy of every dense gradient per step. Buffers
        # are synced once, not broadcast from rank 0 before every forward (a collective per step
        # that cost a 2-process DLRM step about 10 % on gloo here); TorchRec does the same.
        self._dmp_wrapped = DistributedDataParallel(
            self._module,
            device_ids=device_ids,
            process_group=self.env.pg,
            gradient_as_bucket_view=True,
            **_no_per_forward_buffer_sync(),
        )
        _group_outlives_reducer(self._dmp_wrapped, self.env.pg)
        _WITH_DDP.add(self)
        if not _EXIT_HOOK:
            atexit.register(_release_data_parallel_at_exit)
            _EXIT_HOOK.append(True)

    def __deepcopy__(self, memo: dict[int, Any]) -> DistributedModelParallel:
        raise TypeError(_NO_COPY)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(_NO_COPY)

    @property
    def module(self) -> nn.Module:
        """The model with its sharded parts in place (not wrapped in DDP)."""
        return self._module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._dmp_wrapped(*args, **kwargs)

    def named_sharded_modules(self) -> Iterator[tuple[str, nn.Module]]:
        for fqn in self._sharded_fqns:
            yield fqn, self._module.get_submodule(fqn) if fqn else self._module

    def pipelinable_modules(self) -> tuple[dict[str, PipelinableModule[Any]], dict[str, str]]:
        """The sharded modules whose forward splits into input distribution and the rest (FQN ->
        module), and why each other one cannot be pipelined (FQN -> reason)."""
        able: dict[str, PipelinableModule[Any]] = {}
        unable: dict[str, str] = {}
        for fqn, m in self.named_sharded_modules():
            if isinstance(m, ShardedModuleGroup):
                missing = m.parts_not_pipelinable()
                if missing:
                    unable[fqn] = f"its parts {missing} have no input_dist/compute_and_output_dist"
                    continue
            if isinstance(m, PipelinableModule):
                able[fqn] = m
            else:
                unable[fqn] = f"{type(m).__name__} has no input_dist/compute_and_output_dist"
        return able, unable

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """The unsharded model's keys (``ebc.embedding_bags.t0.weight`` ...); a sharded table's
        value is a ShardedTensor of this rank's shards. Collective: every rank calls it. The fused
        optimizer state is in ``shardrec.distributed.checkpoint.sharded_state_dict(model)``."""
        from shardrec.distributed.checkpoint import sharded_state_dict

        return sharded_state_dict(self, self.env.pg)["model"]

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> None:
        """Load unsharded keys whose values are full tensors or ShardedTensors of any layout;
        checks every key and shape before writing anything."""
        from shardrec.distributed.checkpoint import load_sharded_state_dict

        load_sharded_state_dict(self, state_dict, strict=strict)

    def local_table_shards(self) -> dict[str, dict[str, TableShards]]:
        """Module FQN -> table -> this rank's :class:`TableShards` (views into live storage)."""
        out: dict[str, dict[str, TableShards]] = {}
        for fqn, m in self.named_sharded_modules():
            if isinstance(m, ShardedEmbeddingModule):
                out[fqn] = m.local_table_shards()
        return out


_NO_COPY = (
    "DistributedModelParallel cannot be copied or pickled: its shards are bound to this process"
    " group's ranks and its dense layers to DistributedDataParallel, so a copy could not train"
    " on its own. Copy the unsharded model and wrap the copy in a new DistributedModelParallel"
    " (on every rank), or save a checkpoint (shardrec.distributed.checkpoint) and load it into"
    " one."
)


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def _is_replicated(module: nn.Module, name: str) -> bool:
    """Whether tensor ``name`` of a sharded module belongs to a data-parallel replica."""
    owner_name = name.rpartition(".")[0]
    while owner_name:
        owner = module.get_submodule(owner_name)
        if isinstance(owner, ReplicatedModule) and owner.replicated:
            return True
        owner_name = owner_name.rpartition(".")[0]
    return isinstance(module, ReplicatedModule) and module.replicated


@runtime_checkable
class _Resettable(Protocol):
    """A module that initialises its own parameters (torch's convention, e.g. ``nn.Linear``)."""

    def reset_parameters(self) -> None: ...


def _materialize(module: nn.Module, device: torch.device, sharded: Sequence[str]) -> None:
    skip = tuple(f"{f}." for f in sharded if f)
    for name, sub in module.named_modules():
        if "" in sharded or (name and (name in sharded or name.startswith(skip))):
            continue
        own = list(sub.parameters(recurse=False)) + list(sub.buffers(recurse=False))
        if any(t.device.type == "meta" for t in own):
            sub.to_empty(device=device, recurse=False)
            if isinstance(sub, _Resettable):
                sub.reset_parameters()
    for name, sub in module.named_children():
        if name not in sharded and not any(s.startswith(f"{name}.") for s in sharded):
            sub.to(device)
