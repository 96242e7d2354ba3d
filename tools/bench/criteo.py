"""Criteo data benchmark: ``dlrm preprocess`` and the batch reader, beside TorchRec's preprocessing.

    MALLOC_MMAP_THRESHOLD_=33554432 .venv/bin/python tools/bench/criteo.py [--rows 2000000]

Workload: a raw Criteo-format TSV file of ``--rows`` rows written by ``dlrm synth``
(Kaggle layout: ``train.txt``), then, each in its own process so that peak memory is per side:

- shardrec ``preprocess`` with its default threads (every core, at most 8), and with one thread (a
  per-core comparison);
- TorchRec 1.8.0 ``BinaryCriteoUtils.tsv_to_npys`` on the same file, in ``.venv-peer`` if present
  (``make bench-peer``), under the same allocator settings;
- the training batch reader on the preprocessed output: ``Split.batches`` of the train split,
  ``--batch-size`` rows, Kaggle 1M-capped table sizes (the trainer benchmark's workload), one epoch
  (best of ``--rounds``); and, apart, the CPU time of the value checks the reader makes on every
  batch (labels 0/1, dense values of the transform, ids in range), as a share of the reader's CPU
  time.

Printed: rows/s of each, the peak resident memory of its process (VmHWM), the ratios
shardrec / TorchRec (above 1: shardrec faster), and the reader's rows/s against ``--trainer-rate``,
the samples/s the trainer consumes (default 17,250: 1.5 x the 11.5k samples/s TorchRec trains
tools/bench/dlrm.py's workload at, i.e. the trainer's target).
``--impl`` runs a single side and prints JSON (what the orchestrating run calls); ``--impl reader
--dst DIR`` measures the reader alone on an existing preprocessed directory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MALLOC_ENV, peer_available, run_peer

KAGGLE_CAPPED = [min(c, 1_000_000) for c in (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
    5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)]  # fmt: skip


def _maxrss_mib() -> float:
    """This process's peak RSS in MiB (VmHWM: reset by exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _side_shardrec_preprocess(src: str, dst: str, workers: int) -> dict[str, float]:
    from shardrec_dlrm.data import preprocess

    start = time.perf_counter()
    report = preprocess(src, dst, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    return {
        "rows": report.rows,
        "seconds": seconds,
        "rows_per_s": report.rows / seconds,
        "maxrss_main_mib": _maxrss_mib(),
    }


def _side_torchrec(src: str, dst: str) -> dict[str, float]:
    import numpy as np
    from torchrec.datasets.criteo import BinaryCriteoUtils

    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    BinaryCriteoUtils.tsv_to_npys(
        src, str(out / "dense.npy"), str(out / "sparse.npy"), str(out / "labels.npy")
    )
    seconds = time.perf_counter() - start
    rows = int(np.load(out / "labels.npy", mmap_mode="r").shape[0])
    return {
        "rows": rows,
        "seconds": seconds,
        "rows_per_s": rows / seconds,
        "maxrss_main_mib": _maxrss_mib(),
    }


def _side_reader(dst: str, batch_size: int, device: str, rounds: int) -> dict[str, float]:
    import torch

    from shardrec_dlrm.data import open_dataset

    train = open_dataset(dst, num_embeddings_per_feature=KAGGLE_CAPPED).split("train")
    for _ in zip(range(20), train.batches(batch_size, seed=0, epoch=99), strict=False):
        pass  # warm the page cache and the allocator
    best = {"seconds": float("inf"), "cpu_seconds": float("inf")}
    rows = 0
    for _ in range(rounds):  # best of rounds: the machine may be shared
        wall, cpu = time.perf_counter(), time.process_time()
        rows = 0
        for batch in train.batches(batch_size, seed=0, epoch=0, drop_last=True):
            if device != "cpu":
                batch = batch.to(device)
            rows += batch.batch_size
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best["seconds"] = min(best["seconds"], time.perf_counter() - wall)
        best["cpu_seconds"] = min(best["cpu_seconds"], time.process_time() - cpu)
    return {
        "rows": rows,
        **best,
        "rows_per_s": rows / best["seconds"],
        "check_cpu_seconds": _value_check_cpu_seconds(dst, batch_size, rounds),
    }


def _value_check_cpu_seconds(dst: str, batch_size: int, rounds: int) -> float:
    """CPU seconds of the reader's value checks alone over the same batches (best of rounds): the
    part of the reader's time that the checks cost, measured apart from load on the machine."""
    from shardrec_dlrm.data import open_dataset
    from shardrec_dlrm.data.layout import check_values, read_metadata
    from shardrec_dlrm.data.schema import Rows

    ds = open_dataset(dst)
    train = ds.split("train")
    meta = read_metadata(Path(dst))
    ranges = train.batch_ranges(batch_size, seed=0, epoch=0, drop_last=True)
    best = float("inf")
    for _ in range(rounds):
        cpu = time.process_time()
        for lo, hi in ranges:
            for seg, start in _segments(train, lo, hi):
                part = ds.part(seg)
                rows = Rows(part.labels[start[0] : start[1]], part.dense[start[0] : start[1]],
                            part.sparse[start[0] : start[1]])  # fmt: skip
                check_values(ds.path, meta.parts[seg], start[0], rows)
        best = min(best, time.process_time() - cpu)
    return best


def _segments(split: Any, lo: int, hi: int) -> list[tuple[int, tuple[int, int]]]:
    """(part, (start, stop)) of the split's rows [lo, hi)."""
    out, offset = [], 0
    for seg in split.segments:
        a, b = max(lo, offset), min(hi, offset + seg.rows)
        if a < b:
            out.append((seg.part, (seg.start + a - offset, seg.start + b - offset)))
        offset += seg.rows
    return out


def _run_self(args: list[str]) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **MALLOC_ENV},
    )
    if done.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{done.stderr}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--trainer-rate", type=float, default=17_250.0)
    parser.add_argument("--workdir", type=Path, default=None, help="Keep files here (reused).")
    parser.add_argument("--impl", choices=["shardrec-preprocess", "torchrec", "reader"])
    parser.add_argument("--src")
    parser.add_argument("--dst")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="Reader: also copy each batch there.")
    parser.add_argument("--rounds", type=int, default=3, help="Reader: best of this many epochs.")
    args = parser.parse_args()

    if args.impl == "shardrec-preprocess":
        print(json.dumps(_side_shardrec_preprocess(args.src, args.dst, args.workers or 1)))
        return
    if args.impl == "torchrec":
        print(json.dumps(_side_torchrec(args.src, args.dst)))
        return
    if args.impl == "reader":
        print(json.dumps(_side_reader(args.dst, args.batch_size, args.device, args.rounds)))
        return

    from shardrec_dlrm.data.preprocess import default_workers

    work = args.workdir or Path(tempfile.mkdtemp(prefix="criteo-bench-"))
    raw = work / f"raw_{args.rows}"
    if not (raw / "train.txt").exists():
        subprocess.run(
            [sys.executable, "-c", f"from shardrec_dlrm.data.synth import synth; "
             f"synth({str(raw)!r}, rows={args.rows}, seed=0)"],
            check=True,
        )  # fmt: skip
    src = str(raw / "train.txt")
    size_mib = (raw / "train.txt").stat().st_size / 2**20
    threads = default_workers()
    cores = len(os.sched_getaffinity(0))
    print(f"input: {args.rows:,} rows, {size_mib:.0f} MiB ({src}); {cores} cores")
    print(f"allocator: MALLOC_MMAP_THRESHOLD_={MALLOC_ENV['MALLOC_MMAP_THRESHOLD_']} on every side")

    results: dict[str, dict[str, float]] = {}
    ours = (f"shardrec, {threads} threads", "shardrec, 1 thread")
    for name, workers in zip(ours, (threads, 1), strict=True):
        dst = work / f"pre_{args.rows}_{workers}"
        if dst.exists():
            subprocess.run(["rm", "-rf", str(dst)], check=True)
        results[name] = _run_self(
            [
                "--impl",
                "shardrec-preprocess",
                "--src",
                src,
                "--dst",
                str(dst),
                "--workers",
                str(workers),
            ]
        )
    if peer_available():
        out = run_peer(
            [__file__, "--impl", "torchrec", "--src", src, "--dst", str(work / "torchrec")]
        )
        results["TorchRec tsv_to_npys"] = json.loads(out.strip().splitlines()[-1])
    else:
        print("TorchRec: .venv-peer not found (make bench-peer): no peer figure in this run")

    print(f"{'preprocess':28} {'rows/s':>12} {'seconds':>9} {'peak RSS':>10}")
    for name, r in results.items():
        print(
            f"{name:28} {r['rows_per_s']:12,.0f} {r['seconds']:9.1f} {r['maxrss_main_mib']:8.0f}Mi"
        )
    peer = results.get("TorchRec tsv_to_npys")
    if peer:
        for name in ours:
            ratio = results[name]["rows_per_s"] / peer["rows_per_s"]
            print(f"ratio {name} / TorchRec rows/s: {ratio:.1f}x (target >= 5x)")

    reader = _run_self(["--impl", "reader", "--dst", str(work / f"pre_{args.rows}_{threads}"),
                        "--batch-size", str(args.batch_size), "--device", args.device,
                        "--rounds", str(args.rounds)])  # fmt: skip
    print(
        f"batch reader (to {args.device}): {reader['rows_per_s']:,.0f} rows/s "
        f"({reader['rows']:,} train rows, batch {args.batch_size}, best of {args.rounds}); "
        f"{reader['rows_per_s'] / args.trainer_rate:.1f}x the trainer's "
        f"{args.trainer_rate:,.0f} samples/s (target >= 10x)"
    )
    share = reader["check_cpu_seconds"] / reader["cpu_seconds"]
    print(
        f"value checks (labels, dense, ids of every batch): "
        f"{reader['check_cpu_seconds']:.3f} CPU s "
        f"of the reader's {reader['cpu_seconds']:.3f} ({share:.1%})"
    )


if __name__ == "__main__":
    main()
