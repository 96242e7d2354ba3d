"""EmbeddingBagCollection benchmark: shardrec's fused kernel (both backends) against a loop of
``nn.EmbeddingBag``, TorchRec 1.8.0, and a random-gather baseline, all in one run.

    MALLOC_MMAP_THRESHOLD_=33554432 .venv/bin/python tools/bench/ebc.py [--threads 1]
        [--cases 1,20] [--only torch,fbgemm,loop,torchrec] [--rounds 4] [--cpu-time]

Workload: 26 tables with the Criteo Kaggle cardinalities capped at 1,000,000 rows, dim 64, fp32,
batch 4096, one id per feature and 20 ids per feature (uniform random ids). Measured per case:
``forward`` (under ``torch.no_grad``) and ``step`` (forward, backward of a fixed random output
gradient, and the SGD update: fused into backward for shardrec and TorchRec, a sparse
``torch.optim.SGD`` step for the ``nn.EmbeddingBag`` loop), in samples/s.

Each shardrec backend is timed twice over the same module: with its batch checks (the default:
lengths >= 0 and every id inside its table) and with ``check_inputs=False``; the report prints the
checks' cost from calls of the two alternated one by one (medians), same run.

Bytes moved: a forward reads ``ids × 256`` bytes of rows, a step reads them and reads and writes
them again (``3 × ids × 256``). The baseline is ``index_select`` of the same number of random rows
from one 1,000,000-row table, measured in the same run; ``of gather`` is the fraction of the
baseline's bytes per second that a contender reaches.

TorchRec is never imported here unless this interpreter has it: when ``.venv-peer`` exists
(``make bench-peer``; TorchRec 1.8.0 beside an editable shardrec), the script re-runs itself
there, so that every contender (TorchRec as DistributedModelParallel, one rank on gloo, fused SGD
through ``apply_optimizer_in_backward``, FBGEMM kernels) is timed in one process, in rounds that
alternate the order, under the same allocator setting and thread count. Every figure is the best
of the rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import MALLOC_ENV, free_port, measure, peer_available, run_peer

KAGGLE = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
    5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]  # fmt: skip
ROWS = [min(n, 1_000_000) for n in KAGGLE]
DIM = 64
LR = 0.01
FEATURES = [f"cat_{i}" for i in range(len(ROWS))]
Timed = Callable[[], object]
DEVICE = torch.device("cpu")  # set from --device


def _inputs(batch: int, ids: int, pool: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(ids)
    out = []
    for _ in range(pool):
        values = torch.cat([torch.randint(0, n, (batch * ids,), generator=gen) for n in ROWS])
        lengths = torch.full((len(ROWS) * batch,), ids, dtype=torch.int32)
        out.append((values.to(DEVICE), lengths.to(DEVICE)))
    return out


def _grad(batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, DIM * len(ROWS), generator=gen).to(DEVICE)


def _cycle(items: list[Any]) -> Callable[[], Any]:
    state = {"i": 0}

    def nxt() -> Any:
        state["i"] += 1
        return items[state["i"] % len(items)]

    return nxt


def _shardrec(backend: str, batch: int) -> dict[str, dict[int, tuple[Timed, Timed]]]:
    """Two contenders over one module (one copy of the tables): with the batch checks (the
    default) and with ``check_inputs=False``; each call sets the flag it is timed with."""
    import shardrec

    tables = [
        shardrec.EmbeddingBagConfig(
            name=f"t_{f}", embedding_dim=DIM, num_embeddings=n, feature_names=[f]
        )
        for f, n in zip(FEATURES, ROWS, strict=True)
    ]
    ebc = shardrec.EmbeddingBagCollection(
        tables=tables,
        fused_params={"optimizer": "sgd", "learning_rate": LR},
        backend=backend,
        device=DEVICE,
    )
    assert ebc.lookup.backend.value == backend, ebc.lookup.backend

    def run(check: bool) -> Callable[[Any], torch.Tensor]:
        def call(kjt: Any) -> torch.Tensor:
            ebc.check_inputs = check
            values: torch.Tensor = ebc(kjt).values()
            return values

        return call

    kjt_cls = shardrec.KeyedJaggedTensor
    return {
        f"shardrec-{backend}": _pair(run(True), kjt_cls, batch, None),
        f"shardrec-{backend} unchecked": _pair(run(False), kjt_cls, batch, None),
    }


def _loop(batch: int) -> dict[int, tuple[Timed, Timed]]:
    bags = torch.nn.ModuleList(
        torch.nn.EmbeddingBag(n, DIM, mode="sum", sparse=True, device=DEVICE) for n in ROWS
    )
    opt = torch.optim.SGD(bags.parameters(), lr=LR)

    def run(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=DEVICE)
        torch.cumsum(lengths, 0, out=offsets[1:])
        per_key = batch * int(lengths[0])
        outs = []
        for f, bag in enumerate(bags):
            ids = values[f * per_key : (f + 1) * per_key]
            offs = offsets[f * batch : (f + 1) * batch] - f * per_key
            outs.append(bag(ids, offs))
        return torch.cat(outs, dim=1)

    def after_backward() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _pair(None, None, batch, (run, after_backward))


def _pair(
    model: Callable[[Any], torch.Tensor] | None,
    kjt_cls: Any,
    batch: int,
    raw: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], Callable[[], None]] | None,
) -> dict[int, tuple[Timed, Timed]]:
    grad = _grad(batch)
    run, after = raw if raw is not None else (None, None)
    cases: dict[int, tuple[Timed, Timed]] = {}
    for ids in CASES:
        data = _inputs(batch, ids, 4)
        if raw is None:
            assert model is not None
            pool = [kjt_cls(keys=FEATURES, values=v, lengths=n) for v, n in data]
            for kjt in pool:
                kjt.length_per_key()  # host-side sizes, as a data loader would provide them
            nxt = _cycle(pool)

            def fwd(nxt: Callable[[], Any] = nxt) -> object:
                with torch.no_grad():
                    return model(nxt())

            def step(nxt: Callable[[], Any] = nxt) -> object:
                out = model(nxt())
                out.backward(grad)
                return None

        else:
            assert run is not None
            assert after is not None
            nxt = _cycle(data)

            def fwd(nxt: Callable[[], Any] = nxt, run: Any = run) -> object:
                with torch.no_grad():
                    return run(*nxt())

            def step(nxt: Callable[[], Any] = nxt, run: Any = run, after: Any = after) -> object:
                run(*nxt()).backward(grad)
                after()
                return None

        cases[ids] = (fwd, step)
    return cases


def _gather(batch: int) -> dict[int, Timed]:
    table = torch.randn(1_000_000, DIM, device=DEVICE)
    out: dict[int, Timed] = {}
    for ids in CASES:
        n = batch * ids * len(ROWS)
        pool = [torch.randint(0, 1_000_000, (n,), generator=torch.Generator().manual_seed(k))
                .to(DEVICE) for k in range(4)]  # fmt: skip
        nxt = _cycle(pool)
        out[ids] = lambda nxt=nxt: table.index_select(0, nxt())
    return out


def _torchrec(batch: int) -> dict[int, tuple[Timed, Timed]]:
    import torch.distributed as dist
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.distributed import DistributedModelParallel
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    tables = [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=DIM, num_embeddings=n, feature_names=[f])
        for f, n in zip(FEATURES, ROWS, strict=True)
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    apply_optimizer_in_backward(torch.optim.SGD, ebc.parameters(), {"lr": LR})
    model = DistributedModelParallel(ebc, device=torch.device("cpu"))
    print(f"torchrec plan: {model.plan}", file=sys.stderr)

    def run(kjt: Any) -> torch.Tensor:
        out = model(kjt)
        out = out.wait() if hasattr(out, "wait") else out
        values: torch.Tensor = out.values()
        return values

    return _pair(run, KeyedJaggedTensor, batch, None)


CASES = (1, 20)  # set from --cases
CLOCK: Callable[[], float] = time.perf_counter  # set from --cpu-time


def _synced(fn: Timed) -> Timed:
    if DEVICE.type != "cuda":
        return fn

    def run() -> object:
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def _measure_all(
    contenders: dict[str, dict[int, tuple[Timed, Timed]]],
    gathers: dict[int, Timed],
    iters: dict[int, int],
    best: dict[str, float],
    reverse: bool,
) -> None:
    """One round: every contender once per case and mode, in alternating order between rounds."""
    names = list(contenders)[::-1] if reverse else list(contenders)
    for ids in CASES:
        n = iters[ids]
        key = f"gather/{ids}"
        best[key] = min(best.get(key, float("inf")), measure(_synced(gathers[ids]), 2, n, CLOCK))
        for mode in (0, 1):
            for name in names:
                fn = contenders[name][ids][mode]
                key = f"{name}/{ids}/{('forward', 'step')[mode]}"
                best[key] = min(best.get(key, float("inf")), measure(_synced(fn), 2, n, CLOCK))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--iters", type=int, default=10, help="timed calls per measure (1 id)")
    parser.add_argument(
        "--pairs", type=int, default=30, help="interleaved calls per side for the checks' cost"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--in-peer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-peer", action="store_true", help="skip TorchRec")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (TorchRec and FBGEMM: cpu)")
    parser.add_argument("--cases", default="1,20", help="ids per feature, comma-separated")
    parser.add_argument(
        "--only", default="", help="comma-separated contenders (torch,fbgemm,loop,torchrec)"
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the thread's CPU time instead of wall time (steadier on a loaded machine)",
    )
    args = parser.parse_args()
    global DEVICE, CASES, CLOCK
    DEVICE = torch.device(args.device)
    CASES = tuple(int(c) for c in args.cases.split(","))
    CLOCK = time.thread_time if args.cpu_time else time.perf_counter
    only = set(args.only.split(",")) - {""}
    has_torchrec = importlib.util.find_spec("torchrec") is not None
    if not has_torchrec and not args.no_peer and DEVICE.type == "cpu" and peer_available():
        # TorchRec lives in .venv-peer, beside an editable shardrec: run every contender there,
        # in one process, so that all of them share the machine's state round by round.
        print(run_peer([str(Path(__file__).resolve()), *sys.argv[1:], "--in-peer"]), end="")
        return 0
    torch.set_num_threads(args.threads)
    iters = {1: args.iters, 20: max(2, args.iters // 4)}
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]:
        print("warning: run with MALLOC_MMAP_THRESHOLD_=33554432 (see docs/benchmarks.md)")
    from shardrec import ops

    contenders: dict[str, dict[int, tuple[Timed, Timed]]] = {}
    if not only or "torch" in only:
        contenders.update(_shardrec("torch", args.batch))
    if ops.fbgemm_available() and DEVICE.type == "cpu" and (not only or "fbgemm" in only):
        contenders.update(_shardrec("fbgemm", args.batch))
    if not only or "loop" in only:
        contenders["nn.EmbeddingBag loop"] = _loop(args.batch)
    peer = has_torchrec and not args.no_peer and DEVICE.type == "cpu"
    if peer and (not only or "torchrec" in only):
        contenders["torchrec"] = _torchrec(args.batch)
    gathers = _gather(args.batch)
    best: dict[str, float] = {}
    for r in range(args.rounds):
        _measure_all(contenders, gathers, iters, best, reverse=r % 2 == 1)
    _report(best, args, list(contenders))
    _report_checks(contenders, args.pairs)
    return 0


def _interleaved(a: Timed, b: Timed, pairs: int) -> tuple[float, float]:
    """Median seconds of ``a`` and of ``b``, called alternately (``a b b a a b ...``): on a shared
    machine, load that drifts between two blocks of calls would be charged to one of them."""
    times: tuple[list[float], list[float]] = ([], [])
    fns = (_synced(a), _synced(b))
    for fn in fns:
        fn()
    for i in range(pairs):
        for k in (0, 1) if i % 2 == 0 else (1, 0):
            start = CLOCK()
            fns[k]()
            times[k].append(CLOCK() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _report_checks(contenders: dict[str, dict[int, tuple[Timed, Timed]]], pairs: int) -> None:
    """The batch checks' cost, checked against unchecked calls of the same module, interleaved."""
    print(f"\nbatch checks (check_inputs=True vs False, same module, {pairs} interleaved pairs,"
          " medians):")  # fmt: skip
    print("| backend | ids per feature | forward with / without | step with / without |")
    print("|---|---|---|---|")
    for name in contenders:
        if f"{name} unchecked" not in contenders:
            continue
        for ids in CASES:
            ratios = []
            for mode in (0, 1):
                on = contenders[name][ids][mode]
                off = contenders[f"{name} unchecked"][ids][mode]
                t_on, t_off = _interleaved(on, off, pairs)
                ratios.append(f"{t_on * 1e3:.2f} / {t_off * 1e3:.2f} ms ({t_on / t_off - 1:+.1%})")
            print(f"| {name} | {ids} | {ratios[0]} | {ratios[1]} |")


def _report(best: dict[str, float], args: argparse.Namespace, names: list[str]) -> None:
    b = args.batch
    where = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    print(f"\n{where}: batch {b}, dim {DIM}, 26 tables (Kaggle capped at 1M), fp32,"
          f" torch {torch.__version__}, threads {args.threads},"
          f" clock {'thread CPU time' if args.cpu_time else 'wall'},"
          f" MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_')}")  # fmt: skip
    ref = "torchrec" if "torchrec" in names else names[-1]
    for ids in CASES:
        rows = b * ids * len(ROWS)
        gather_bw = rows * DIM * 4 / best[f"gather/{ids}"]
        print(f"\n{ids} id(s) per feature: gather baseline {gather_bw / 1e9:.2f} GB/s")
        print(f"| contender | forward samples/s | step samples/s | forward vs {ref} |"
              f" step vs {ref} | forward of gather | step of gather |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for name in names:
            f, s = best[f"{name}/{ids}/forward"], best[f"{name}/{ids}/step"]
            rf, rs = best[f"{ref}/{ids}/forward"], best[f"{ref}/{ids}/step"]
            fbw, sbw = rows * DIM * 4 / f, 3 * rows * DIM * 4 / s
            print(f"| {name} | {b / f:,.0f} | {b / s:,.0f} | {rf / f:.2f}x | {rs / s:.2f}x |"
                  f" {fbw / gather_bw:.2f} | {sbw / gather_bw:.2f} |")  # fmt: skip


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"\n({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    raise SystemExit(code)
