"""Training loops that hide the sparse input distribution behind the previous batch's compute.

::

    pipeline = TrainPipelineSparseDist(dmp, dense_optimizer, device)
    for epoch in range(epochs):
        it = iter(dataloader)
        while True:
            try:
                output = pipeline.progress(it)    # one training step
            except StopIteration:
                break                             # the pipeline takes the next epoch's iterator

``model(batch)`` must return ``(loss, output)`` (or pass ``forward=``). One step of
:class:`TrainPipelineSparseDist`, with batch ``i`` current::

    1. next(it) -> batch i+1, copied to the device (on CUDA: on a side stream); for every
       pipelined sharded module, input_dist(batch i+1's KJT): its split exchange is in flight
    2. for every pipelined module, in the order the forward calls them: wait for batch i's ids
       (sent a step ago), look up, and start the output distribution; all are now in flight
    3. forward(batch i): each pipelined module, where it is called, waits for its own rows;
       the dense work before it and the other modules' lookups ran meanwhile
    4. advance batch i+1's input distributions: wait for the splits, issue the ids' all-to-all
    5. backward(batch i), optimizer step: batch i+1's ids travel meanwhile

The weights each batch sees are the plain loop's (:class:`TrainPipelineBase`): an input
distribution moves ids only, and batch ``i+1``'s lookup runs in its own step, after batch ``i``'s
update. A bad batch raises its :class:`~shardrec.kernels.BadBatchError` on every rank in that
batch's step, before any update, as in the plain loop; the pipeline can go on with the following
batch.

Which modules are pipelined is learnt on the first step, which runs unpipelined: a sharded module
of a :class:`~shardrec.distributed.DistributedModelParallel` in the model is pipelined when it
implements :class:`~shardrec.distributed.types.PipelinableModule` and the forward called it once,
with a KJT that the batch holds as it came from the dataloader (a field of a dataclass batch, an
item of a tuple, list or dict, or the batch itself). Any other (the model builds or transforms the
KJT first, a plugin sharder without the split) runs as before, and the pipeline says so with one
:class:`PipelineFallbackWarning` naming it.

Step 2 runs a module's lookup before the forward only when it would run the same inside it: the
module leaves its output distribution in flight
(:class:`~shardrec.distributed.sharding.AsyncOutputModule`) and the first step saw it called in
the grad mode and autocast state the pipeline runs in. Any other (a module called under
``torch.no_grad()`` or inside ``torch.autocast``, a plugin without the async output) looks up and
waits where the forward calls it.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Generic, Protocol, Self, TypeAlias, cast, runtime_checkable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import TypeVar

from shardrec.distributed.model_parallel import DistributedModelParallel
from shardrec.distributed.sharding.contract import AsyncOutputModule
from shardrec.distributed.types import Awaitable, PipelinableModule
from shardrec.sparse import KeyedJaggedTensor

__all__ = [
    "PipelineFallbackWarning",
    "Pipelineable",
    "StreamRecordable",
    "TrainPipeline",
    "TrainPipelineBase",
    "TrainPipelineSparseDist",
]


class Pipelineable(Protocol):
    """A batch: it copies itself to a device (``non_blocking`` from pinned memory)."""

    def to(self, device: torch.device, non_blocking: bool = False) -> Self: ...


B = TypeVar("B", bound=Pipelineable)
Out = TypeVar("Out")
ModelForward = Callable[[nn.Module, B], tuple[torch.Tensor, Out]]


@runtime_checkable
class StreamRecordable(Protocol):
    """A batch that can mark its tensors as used on a CUDA stream (``KeyedJaggedTensor`` can):
    on CUDA the pipeline then copies it on a side stream."""

    def record_stream(self, stream: torch.cuda.Stream) -> None: ...


class PipelineFallbackWarning(UserWarning):
    """A sharded module that the pipeline runs unpipelined (its message says which and why)."""


def _call_model(model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
    loss, output = model(batch)
    return loss, output


Out_co = TypeVar("Out_co", covariant=True)


class TrainPipeline(Protocol[Out_co]):
    """One training step per ``progress``; StopIteration when the iterator is exhausted."""

    def progress(self, dataloader_iter: Iterator[Any]) -> Out_co: ...


class TrainPipelineBase(Generic[B, Out]):
    """The plain loop: copy, forward, backward, optimizer step; one batch at a time."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        device: torch.device,
        *,
        forward: ModelForward[B, Out] = _call_model,
    ) -> None:
        self._model = model
        self._optimizer = optimizer
        self._device = device
        self._forward = forward

    def progress(self, dataloader_iter: Iterator[B]) -> Out:
        batch = next(dataloader_iter).to(self._device, non_blocking=True)
        loss, output = self._forward(self._model, batch)
        self._backward_and_step(loss)
        return output

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        if self._optimizer is not None:
            self._optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        if self._optimizer is not None:
            self._optimizer.step()


# What a pipelined module's forward returns, handed back untouched: the embeddings of a sharded
# EBC / EC, a managed module's (embeddings, remapped KJT or None), a plugin's own output.
Output: TypeAlias = object


@dataclasses.dataclass(frozen=True, slots=True)
class _CallContext:
    """What decides a lookup's result and whether its gradient flows: grad mode and autocast."""

    grad: bool
    inference: bool
    autocast: tuple[tuple[str, bool, torch.dtype], ...]

    @classmethod
    def now(cls, device_types: tuple[str, ...]) -> _CallContext:
        return cls(
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            tuple(
                (d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in device_types
            ),
        )


@dataclasses.dataclass(slots=True)
class _Slot:
    """One batch's KJT for a pipelined module, its input distribution, and once step 2 started
    it, its output distribution in flight with the context it was started in."""

    kjt: KeyedJaggedTensor
    input: Awaitable[Any]
    output: Awaitable[Output] | None = None
    started_in: _CallContext | None = None


class _PipelinedForward:
    """Installed as a pipelined module's ``forward``: given the KJT whose input distribution the
    pipeline started, it finishes that one (or waits for the output distribution the pipeline
    started before the forward); any other call (an evaluation between steps) runs the module's
    own forward."""

    def __init__(
        self,
        fqn: str,
        module: PipelinableModule[Any, Output],
        original: Callable[..., Output],
        seen_in: _CallContext,
    ) -> None:
        self.fqn = fqn
        self.module = module
        self.original = original
        self.seen_in = seen_in  # the context the first (probe) step called the module in
        self.slot: _Slot | None = None

    def start(self, now: _CallContext) -> None:
        """Step 2: look up and leave the output distribution in flight, when that gives what the
        forward's own call would (see the module docstring); otherwise leave it to the call."""
        slot = self.slot
        if slot is None or now != self.seen_in or not isinstance(self.module, AsyncOutputModule):
            return
        slot.output = self.module.compute_and_start_output_dist(slot.input.wait())
        slot.started_in = now

    def __call__(self, kjt: KeyedJaggedTensor, *args: Any, **kwargs: Any) -> Output:
        slot = self.slot
        if slot is None or kjt is not slot.kjt or args or kwargs:
            return self.original(kjt, *args, **kwargs)
        self.slot = None
        if slot.output is None:
            return self.module.compute_and_output_dist(slot.input.wait())
        assert slot.started_in is not None
        if _CallContext.now(_device_types(slot.started_in)) != slot.started_in:
            # Its lookup ran before the forward in another grad mode or autocast state than this
            # call's: its result or its gradient would differ from the plain loop's.
            raise RuntimeError(
                f"TrainPipelineSparseDist: sharded module {self.fqn!r} is called in another grad"
                f" mode or autocast state than on the first step ({slot.started_in}); a model"
                " that changes it between steps cannot be pipelined (call close())"
            )
        return slot.output.wait()


def _device_types(context: _CallContext) -> tuple[str, ...]:
    return tuple(d for d, _, _ in context.autocast)


@dataclasses.dataclass(slots=True)
class _Staged(Generic[B]):
    """A batch on the device and its modules' input distributions in flight (FQN -> KJT, work)."""

    batch: B
    pending: dict[str, _Slot]


def _kjts(batch: object) -> dict[str, KeyedJaggedTensor]:
    """The KJTs a batch holds directly, by where they sit in it."""
    if isinstance(batch, KeyedJaggedTensor):
        return {"": batch}
    items: list[tuple[str, object]]
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        items = [(f.name, getattr(batch, f.name)) for f in dataclasses.fields(batch)]
    elif isinstance(batch, tuple | list):
        items = [(str(i), v) for i, v in enumerate(batch)]
    elif isinstance(batch, dict):
        items = [(str(k), v) for k, v in batch.items()]
    else:
        return {}
    return {k: v for k, v in items if isinstance(v, KeyedJaggedTensor)}


class TrainPipelineSparseDist(Generic[B, Out]):
    """Distributes batch ``i+1``'s ids while batch ``i`` trains (see the module docstring).

    ``model``: a :class:`DistributedModelParallel`, or a module holding one; ``model(batch)``
    returns ``(loss, output)`` unless ``forward(model, batch)`` says otherwise. ``optimizer``:
    the dense optimizer (None when every parameter is fused). ``progress`` returns the step's
    output and reads nothing back to the host.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        device: torch.device,
        *,
        forward: ModelForward[B, Out] = _call_model,
    ) -> None:
        self._plain: TrainPipelineBase[B, Out] = TrainPipelineBase(
            model, optimizer, device, forward=forward
        )
        self._model = model
        self._device = device
        self._forward = forward
        self._candidates: dict[str, PipelinableModule[Any, Output]] = {}
        self._unable: dict[str, str] = {}
        for prefix, sub in model.named_modules():
            if isinstance(sub, DistributedModelParallel):
                able, unable = sub.pipelinable_modules()
                dot = f"{prefix}." if prefix else ""
                self._candidates.update({f"{dot}{k}": m for k, m in able.items()})
                self._unable.update({f"{dot}{k or '<root>'}": r for k, r in unable.items()})
        self._sources: dict[str, str] = {}  # pipelined module -> where its KJT sits in a batch
        self._forwards: dict[str, _PipelinedForward] = {}  # in the order the forward calls them
        self._probed = False
        self._next: _Staged[B] | None = None
        self._device_types = tuple(dict.fromkeys(("cpu", device.type)))
        self._copy_stream: torch.cuda.Stream | None = None
        if device.type == "cuda":
            self._copy_stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]

    @property
    def pipelined_modules(self) -> list[str]:
        """The sharded modules whose input distribution runs ahead (known after one step)."""
        return list(self._sources)

    def progress(self, dataloader_iter: Iterator[B]) -> Out:
        if not self._probed:
            output = self._probe_step(self._to_device(next(dataloader_iter)))
            self._next = self._stage(dataloader_iter)
            return output
        current, self._next = self._next, None
        if current is None:
            # A new iterator (the next epoch), or the end of this one.
            current = self._stage(dataloader_iter)
            if current is None:
                raise StopIteration
        # Started before this batch's forward, so that its split exchange overlaps the forward;
        # kept before the forward runs, so that a bad batch's error leaves the pipeline able to go
        # on with the next one.
        upcoming = self._stage(dataloader_iter)
        self._next = upcoming
        for fqn, slot in current.pending.items():
            pf = self._forwards.get(fqn)
            if pf is not None:  # None after close(): the module distributes in its forward
                pf.slot = slot
        try:
            # Every rank starts them in the same order (the forward's), so the output
            # collectives are issued, and their gradients later sent, in one order everywhere.
            now = _CallContext.now(self._device_types)
            for pf in self._forwards.values():
                pf.start(now)
            loss, output = self._forward(self._model, current.batch)
        finally:
            for pf in self._forwards.values():
                pf.slot = None
        if upcoming is not None:
            for slot in upcoming.pending.values():
                slot.input.advance()
        self._plain._backward_and_step(loss)
        return output

    def close(self) -> None:
        """Give the pipelined modules their own forward back. The pipeline keeps working, each
        later step unpipelined; a batch already staged is still trained by the next step."""
        for pf in self._forwards.values():
            module = pf.module
            assert isinstance(module, nn.Module)
            if module.__dict__.get("forward") is pf:
                del module.__dict__["forward"]
        self._forwards.clear()
        self._sources.clear()

    def _stage(self, dataloader_iter: Iterator[B]) -> _Staged[B] | None:
        """The next batch on the device, its input distributions started; None at the end."""
        try:
            batch = self._to_device(next(dataloader_iter))
        except StopIteration:
            return None
        kjts = _kjts(batch)
        pending: dict[str, _Slot] = {}
        for fqn, source in self._sources.items():
            kjt = kjts[source]
            pending[fqn] = _Slot(kjt, self._candidates[fqn].input_dist(kjt))
        return _Staged(batch, pending)

    def _to_device(self, batch: B) -> B:
        """``batch.to(device)``; on CUDA, a :class:`StreamRecordable` batch is copied on a side
        stream, so that the copy (from pinned memory, where the dataloader pinned it) runs beside
        the kernels already queued rather than after them."""
        stream, given = self._copy_stream, cast(object, batch)
        if stream is None or not isinstance(given, StreamRecordable):
            return batch.to(self._device, non_blocking=True)
        current = torch.cuda.current_stream(self._device)
        with torch.cuda.stream(stream):
            moved = batch.to(self._device, non_blocking=True)
        # Nothing on the current stream reads the batch before the copy is done ...
        current.wait_stream(stream)
        # ... and its memory, allocated on the side stream, is not handed out again before the
        # current stream's work on it is done.
        recorded = cast(object, moved)
        assert isinstance(recorded, StreamRecordable)  # ``to`` returns the batch's own type
        recorded.record_stream(current)
        return moved

    def _probe_step(self, batch: B) -> Out:
        """One plain step that records what each sharded module is called with."""
        calls: dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]] = {
            fqn: [] for fqn in self._candidates
        }
        seen_in: dict[str, _CallContext] = {}  # in call order
        handles: list[RemovableHandle] = []
        for fqn, module in self._candidates.items():
            assert isinstance(module, nn.Module)

            def record(
                _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], fqn: str = fqn
            ) -> None:
                calls[fqn].append((args, kwargs))
                seen_in.setdefault(fqn, _CallContext.now(self._device_types))

            handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
        try:
            loss, output = self._forward(self._model, batch)
        finally:
            for handle in handles:
                handle.remove()
        self._plain._backward_and_step(loss)
        self._probed = True
        by_identity = {id(kjt): key for key, kjt in _kjts(batch).items()}
        reasons = dict(self._unable)
        for fqn, seen in calls.items():
            if len(seen) != 1:
                reasons[fqn] = f"the forward called it {len(seen)} times, not once"
                continue
            args, kwargs = seen[0]
            if len(args) != 1 or kwargs or id(args[0]) not in by_identity:
                reasons[fqn] = (
                    "it is not called with a KeyedJaggedTensor of the batch as the dataloader"
                    " gave it (the model builds or transforms its KJT first)"
                )
                continue
            self._sources[fqn] = by_identity[id(args[0])]
        for fqn in [f for f in seen_in if f in self._sources]:
            module = self._candidates[fqn]
            assert isinstance(module, nn.Module)
            pf = _PipelinedForward(fqn, module, module.forward, seen_in[fqn])
            # An instance attribute shadows the class's forward for nn.Module.__call__.
            module.__dict__["forward"] = pf
            self._forwards[fqn] = pf
        for fqn, reason in reasons.items():
            warnings.warn(
                f"TrainPipelineSparseDist: sharded module {fqn!r} is not pipelined: {reason};"
                " its input distribution runs, blocking, inside the forward",
                PipelineFallbackWarning,
                stacklevel=3,
            )
        return output
