"""The dense layers' matrix product on this machine: fp32 against bf16, 1 thread against all.

    .venv/bin/python tools/bench/gemm.py

Times ``torch.addmm(bias, x, w.t())`` of the DLRM over arch's widest layer (``2048x512 @ 512x512``),
median of ``--iters`` calls, for fp32 and bf16 at each thread count, and prints GFLOP/s and the
bf16 / fp32 ratio of each thread count. It is the baseline behind ``dlrm train --dense-precision``
(docs/dlrm.md): bf16 pays where the CPU multiplies bf16 natively (AMX, AVX512-BF16). Run it on a
busy machine and on a quiet one to see OpenMP threads stall each other.
"""

from __future__ import annotations

import argparse
import os

import torch
from common import measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    args = parser.parse_args()
    flops = 2 * args.rows * args.width * args.width
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, args.width, generator=gen)
    w = torch.randn(args.width, args.width, generator=gen)
    b = torch.randn(args.width, generator=gen)
    print(f"addmm {args.rows}x{args.width} @ {args.width}x{args.width}, median of {args.iters}")
    for threads in dict.fromkeys(args.threads):
        torch.set_num_threads(threads)
        rates = {}
        for dtype in (torch.float32, torch.bfloat16):
            args_of_dtype = (b.to(dtype), x.to(dtype), w.to(dtype).t())
            seconds = measure(lambda a=args_of_dtype: torch.addmm(*a), warmup=3, iters=args.iters)
            rates[dtype] = flops / seconds / 1e9
        fp32, bf16 = rates[torch.float32], rates[torch.bfloat16]
        print(
            f"{threads} thread(s): fp32 {fp32:7.1f} GFLOP/s  bf16 {bf16:7.1f} GFLOP/s"
            f"  bf16/fp32 {bf16 / fp32:.2f}x"
        )


if __name__ == "__main__":
    main()
