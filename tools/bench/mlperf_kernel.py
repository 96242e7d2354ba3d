"""The fused embedding kernel at MLPerf DLRMv2 shapes, against TorchRec and the machine's gather
limit, in one run.

    MALLOC_MMAP_THRESHOLD_=33554432 .venv/bin/python tools/bench/mlperf_kernel.py \\
        [--batch 2048] [--cap 200000] [--rounds 3] [--iters 5] [--threads N] [--cpu-time]
        [--optimizer adagrad|rowwise_adagrad] [--device cpu|cuda] [--no-peer]

Workload: the 26 MLPerf tables (Criteo 1TB cardinalities, capped at 40M rows by MLPerf) capped
again at ``--cap`` rows so that three copies of them (shardrec with and without FBGEMM, TorchRec),
each with its Adagrad state, fit this machine's memory: at the default 200,000 rows that is
1.72M rows, 0.88 GB of fp32 weights and as much of state per copy; dim 128; the MLPerf pooling
factors 3,2,1,2,6,1,1,1,1,7,3,8,1,6,9,5,1,1,1,12,100,27,10,3,1,1 (214 ids per sample, summed per
table); ids uniform over each capped table (as the MLPerf multi-hot extra ids are). Capping keeps
the ids per step and the bytes per id of the real shapes; it makes the tables small enough that
more of them sits in the CPU caches than at 40M rows, which favours every contender alike.

Measured: ``forward`` (no grad) and ``step`` (forward, backward of a fixed output gradient, and
the fused Adagrad update, lr 0.004, eps 1e-8: exact Adagrad by default, which is MLPerf's rule
(the reference, mlcommons/training ``recommendation_v2/torchrec_dlrm/dlrm_main.py``, applies
``torch.optim.Adagrad`` in backward to the sparse arch, which TorchRec runs as FBGEMM's
EXACT_ADAGRAD), and row-wise Adagrad, a second rule, with ``--optimizer rowwise_adagrad``; TorchRec
through ``apply_optimizer_in_backward`` of ``torch.optim.Adagrad`` or
``torchrec.optim.RowWiseAdagrad``, which run FBGEMM's fused kernels) in samples/s, best of
``--rounds`` alternating rounds, each the median of ``--iters`` calls.

The floor: ``index_select`` and ``embedding_bag`` (sum, the step's bags), both into kept buffers
(a fresh output is page-faulted in again whenever the heap was trimmed), of the step's ids (each
table's ids offset into one table holding all 26 tables' rows, on huge pages where the machine
gives them as shardrec's tables are, so the same rows are read) read ``ids x 512`` bytes; the
faster one's bytes per second are the machine's gather limit. ``of gather`` is a contender's
bytes per second over that limit: a forward moves ``ids x 512`` bytes; a step at least
``ids x 512 + distinct x 2 x (512 + state)`` (the forward's read, then each distinct row of the
step and its optimizer state read and written once; state 512 bytes per row for exact Adagrad, 4
for row-wise). That many bytes at the gather limit is the step's floor, so
``step of gather`` is the floor's time over the step's.

On CPU ``shardrec-torch-nojit`` is ``shardrec-torch``'s module with the compiled update
(shardrec/kernels/cpu_update_jit.py) off, so its fused update runs the torch code.

Also printed: torch's own read-modify-write of the step's distinct rows (``index_add_`` of a
kept zero buffer into the weights and into the state), the primitive a pure-torch update has.

TorchRec runs only in ``.venv-peer`` (``make bench-peer``): the script re-runs itself there, as
tools/bench/ebc.py does, so that every contender is timed in one process.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import MALLOC_ENV, free_port, measure, peer_available, run_peer

MLPERF_ROWS = [
    40_000_000, 39_060, 17_295, 7_424, 20_265, 3, 7_122, 1_543, 63, 40_000_000, 3_067_956,
    405_282, 10, 2_209, 11_938, 155, 4, 976, 14, 40_000_000, 40_000_000, 40_000_000, 590_152,
    12_973, 108, 36,
]  # fmt: skip
HOT = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1]
OPTIMIZERS = ("adagrad", "rowwise_adagrad")
DIM = 128
LR = 0.004
EPS = 1e-8
FEATURES = [f"cat_{i}" for i in range(26)]
Timed = Callable[[], object]


class Setup:
    def __init__(self, batch: int, cap: int, device: torch.device, optimizer: str) -> None:
        self.batch = batch
        self.optimizer = optimizer
        self.rows = [min(n, cap) for n in MLPERF_ROWS]
        self.device = device
        self.ids = batch * sum(HOT)
        self.pool = [self._inputs(seed) for seed in range(3)]
        gen = torch.Generator().manual_seed(99)
        self.grad = torch.randn(batch, DIM * 26, generator=gen).to(device)

    def _inputs(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        values = torch.cat(
            [
                torch.randint(0, n, (self.batch * h,), generator=gen)
                for n, h in zip(self.rows, HOT, strict=True)
            ]
        )
        lengths = torch.tensor(HOT, dtype=torch.int32).repeat_interleave(self.batch)
        return values.to(self.device), lengths.to(self.device)

    def cycle(self, items: list[Any]) -> Callable[[], Any]:
        state = {"i": 0}

        def nxt() -> Any:
            state["i"] += 1
            return items[state["i"] % len(items)]

        return nxt


def _contender(
    setup: Setup, module: Callable[[Any], torch.Tensor], kjts: list[Any]
) -> tuple[Timed, Timed]:
    nxt = setup.cycle(kjts)

    def forward() -> object:
        with torch.no_grad():
            return module(nxt())

    def step() -> object:
        torch.autograd.backward(module(nxt()), setup.grad)
        return None

    return forward, step


def _shardrec(setup: Setup, backend: str) -> tuple[Timed, Timed]:
    import shardrec

    tables = [
        shardrec.EmbeddingBagConfig(
            name=f"t_{f}", embedding_dim=DIM, num_embeddings=n, feature_names=[f]
        )
        for f, n in zip(FEATURES, setup.rows, strict=True)
    ]
    ebc = shardrec.EmbeddingBagCollection(
        tables=tables,
        fused_params={"optimizer": setup.optimizer, "learning_rate": LR, "eps": EPS},
        backend=backend,
        device=setup.device,
    )
    kjts = [shardrec.KeyedJaggedTensor(keys=FEATURES, values=v, lengths=n) for v, n in setup.pool]
    for kjt in kjts:
        kjt.length_per_key()

    def run(kjt: Any) -> torch.Tensor:
        out: torch.Tensor = ebc(kjt).values()
        return out

    return _contender(setup, run, kjts)


def _without_compiled(pair: tuple[Timed, Timed]) -> tuple[Timed, Timed]:
    """The same module, its step's fused update by the torch code (the compiled kernels of
    shardrec.kernels.cpu_update_jit off): the update before them."""
    from unittest import mock

    forward, step = pair

    def torch_update_step() -> object:
        with mock.patch("shardrec.kernels.cpu_update.run_compiled", return_value=False):
            return step()

    return forward, torch_update_step


def _torchrec(setup: Setup) -> tuple[Timed, Timed]:
    import torch.distributed as dist
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.distributed import DistributedModelParallel
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    backend = "nccl" if setup.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)
    tables = [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=DIM, num_embeddings=n, feature_names=[f])
        for f, n in zip(FEATURES, setup.rows, strict=True)
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    rule = torch.optim.Adagrad if setup.optimizer == "adagrad" else RowWiseAdagrad
    apply_optimizer_in_backward(rule, ebc.parameters(), {"lr": LR, "eps": EPS})
    model = DistributedModelParallel(ebc, device=setup.device)
    print(f"torchrec plan: {model.plan}", file=sys.stderr)
    kjts = [KeyedJaggedTensor(keys=FEATURES, values=v, lengths=n) for v, n in setup.pool]

    def run(kjt: Any) -> torch.Tensor:
        out = model(kjt)
        out = out.wait() if hasattr(out, "wait") else out
        values: torch.Tensor = out.values()
        return values

    return _contender(setup, run, kjts)


def _gather(setup: Setup) -> dict[str, Timed]:
    from shardrec.kernels.memory import empty_rows

    total = sum(setup.rows)
    # on huge pages where the machine gives them, as shardrec's storage is: the faster gather
    table = empty_rows((total, DIM), torch.float32, setup.device).normal_()
    starts = torch.tensor([0, *setup.rows[:-1]]).cumsum(0)
    flat = []
    for values, _ in setup.pool:
        # each table's ids offset to its rows in the one big table: the step's rows exactly
        per_table = torch.tensor(HOT) * setup.batch
        offsets = starts.to(setup.device).repeat_interleave(per_table.to(setup.device))
        flat.append(values + offsets)
    nxt = setup.cycle(flat)
    # into a kept buffer: a fresh output of this size would be page-faulted in on every call
    out = torch.empty(setup.ids, DIM, device=setup.device)
    index_select = lambda: torch.index_select(table, 0, nxt(), out=out)  # noqa: E731
    per_bag = torch.tensor(HOT).repeat_interleave(setup.batch).to(setup.device)
    bag_offsets = torch.cat(
        [torch.zeros(1, dtype=torch.int64, device=setup.device), per_bag.cumsum(0)[:-1]]
    )
    # into kept buffers too (the kernel's out= form; its other outputs sized as it sizes them)
    pooled = torch.empty(per_bag.numel(), DIM, device=setup.device)
    sizes = (0, per_bag.numel(), per_bag.numel())
    extra = [torch.empty(n, dtype=torch.int64, device=setup.device) for n in sizes]

    def bag() -> object:
        return torch.ops.aten._embedding_bag_forward_only.out(
            table, nxt(), bag_offsets, False, 0, False, None, False, -1,
            out0=pooled, out1=extra[0], out2=extra[1], out3=extra[2],
        )  # fmt: skip

    return {"index_select": index_select, "embedding_bag": bag}


def _update_rows(setup: Setup) -> tuple[Timed, int]:
    """The step's distinct rows read and written once in the weights and once in the state."""
    from shardrec.kernels.memory import zeros_rows

    total = sum(setup.rows)
    weights = zeros_rows((total, DIM), torch.float32, setup.device)
    state_shape = (total, DIM) if setup.optimizer == "adagrad" else (total,)
    state = zeros_rows(state_shape, torch.float32, setup.device)
    starts = torch.tensor([0, *setup.rows[:-1]]).cumsum(0).to(setup.device)
    per_table = (torch.tensor(HOT) * setup.batch).to(setup.device)
    distinct = [torch.unique(v + starts.repeat_interleave(per_table)) for v, _ in setup.pool]
    most = max(d.numel() for d in distinct)
    zero_rows = torch.zeros(most, DIM, device=setup.device)
    zero_state = torch.zeros((most, *state_shape[1:]), device=setup.device)
    nxt = setup.cycle(distinct)

    def update() -> object:
        rows = nxt()
        weights.index_add_(0, rows, zero_rows[: rows.numel()])
        return state.index_add_(0, rows, zero_state[: rows.numel()])

    return update, round(sum(d.numel() for d in distinct) / len(distinct))


def _synced(fn: Timed, device: torch.device) -> Timed:
    if device.type != "cuda":
        return fn

    def run() -> object:
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--cap", type=int, default=200_000, help="rows per table at most")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="adagrad",
        help="fused rule: adagrad is exact Adagrad, MLPerf DLRMv2's rule; rowwise_adagrad a second",
    )
    parser.add_argument("--no-peer", action="store_true", help="skip TorchRec")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the thread's CPU time (steadier on a loaded machine; use with --threads 1)",
    )
    parser.add_argument("--in-peer", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    has_torchrec = importlib.util.find_spec("torchrec") is not None
    if not has_torchrec and not args.no_peer and peer_available():
        print(run_peer([str(Path(__file__).resolve()), *sys.argv[1:], "--in-peer"]), end="")
        return 0
    torch.set_num_threads(args.threads)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]:
        print("warning: run with MALLOC_MMAP_THRESHOLD_=33554432 (see docs/benchmarks.md)")
    from shardrec import ops

    setup = Setup(args.batch, args.cap, device, args.optimizer)
    contenders: dict[str, tuple[Timed, Timed]] = {"shardrec-torch": _shardrec(setup, "torch")}
    if device.type == "cpu":
        contenders["shardrec-torch-nojit"] = _without_compiled(contenders["shardrec-torch"])
    if ops.fbgemm_available() and device.type == "cpu":
        contenders["shardrec-fbgemm"] = _shardrec(setup, "fbgemm")
    if has_torchrec and not args.no_peer:
        contenders["torchrec"] = _torchrec(setup)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    update, distinct = _update_rows(setup)
    gathers = {name: _synced(fn, device) for name, fn in _gather(setup).items()}
    gathers["update_rows"] = _synced(update, device)
    times: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for name, fn in gathers.items():
            times.setdefault(name, []).append(measure(fn, 1, args.iters, clock))
        names = list(contenders) if r % 2 == 0 else list(contenders)[::-1]
        for mode, label in ((0, "forward"), (1, "step")):
            for name in names:
                fn = _synced(contenders[name][mode], device)
                times.setdefault(f"{name}/{label}", []).append(measure(fn, 1, args.iters, clock))
    _report(setup, args, times, list(contenders), distinct)
    return 0


def _report(
    setup: Setup,
    args: argparse.Namespace,
    times: dict[str, list[float]],
    names: list[str],
    distinct: int,
) -> None:
    where = torch.cuda.get_device_name() if setup.device.type == "cuda" else "cpu"
    row_bytes = setup.ids * DIM * 4
    # the machine's gather limit: the faster of the two bare gathers of the step's rows
    floor = min(("index_select", "embedding_bag"), key=lambda n: min(times[n]))
    g = min(times[floor])
    limit = row_bytes / g
    print(f"{where}: batch {setup.batch}, {setup.ids} ids per step ({sum(HOT)} per sample),"
          f" dim {DIM}, tables capped at {args.cap} rows ({sum(setup.rows)} rows), fp32,"
          f" {args.optimizer}, {distinct} distinct rows per step,"
          f" torch {torch.__version__}, threads {args.threads},"
          f" {args.rounds} rounds x median of {args.iters},"
          f" clock {'thread CPU time' if args.cpu_time else 'wall'}")  # fmt: skip
    for name in ("index_select", "embedding_bag"):
        t = min(times[name])
        print(f"bare {name} of the step's rows: {row_bytes / t / 1e9:.2f} GB/s"
              f" (rounds spread {max(times[name]) / t - 1:.0%})")  # fmt: skip
    print(f"gather limit: {limit / 1e9:.2f} GB/s ({floor})")
    state_row = DIM * 4 if args.optimizer == "adagrad" else 4
    step_bytes = row_bytes + distinct * 2 * (DIM * 4 + state_row)
    print(f"step floor: {step_bytes / 1e6:.0f} MB at the gather limit,"
          f" {step_bytes / limit * 1e3:.1f} ms ({row_bytes / step_bytes:.0%} of it the forward's"
          " read)")  # fmt: skip
    rmw = min(times["update_rows"])
    print(f"torch index_add_ of the distinct rows into weights and state: {rmw * 1e3:.1f} ms,"
          f" {distinct * 2 * (DIM * 4 + state_row) / rmw / 1e9:.2f} GB/s"
          f" (rounds spread {max(times['update_rows']) / rmw - 1:.0%})")  # fmt: skip
    ref = "torchrec" if "torchrec" in names else None
    print("| contender | forward samples/s | step samples/s | spread fwd / step | forward vs"
          " torchrec | step vs torchrec | forward of gather | step of gather |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        f, s = min(times[f"{name}/forward"]), min(times[f"{name}/step"])
        sf = max(times[f"{name}/forward"]) / f - 1
        ss = max(times[f"{name}/step"]) / s - 1
        if ref is not None:
            rf, rs = min(times[f"{ref}/forward"]), min(times[f"{ref}/step"])
            vs = f"{rf / f:.2f}x | {rs / s:.2f}x"
        else:
            vs = "- | -"
        print(f"| {name} | {setup.batch / f:,.0f} | {setup.batch / s:,.0f} |"
              f" {sf:.0%} / {ss:.0%} | {vs} |"
              f" {row_bytes / f / limit:.2f} | {step_bytes / s / limit:.2f} |")  # fmt: skip


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    raise SystemExit(code)
