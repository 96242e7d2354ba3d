"""Peak host memory of ``dlrm evaluate``, and of writing a checkpoint with Adagrad state.

    .venv/bin/python tools/bench/checkpoint_memory.py --num-embeddings 64000 --rounds 3

1. ``dlrm synth`` writes a small data set and ``dlrm train --optimizer adagrad`` trains two steps
   into a checkpoint directory (26 tables of ``--num-embeddings`` x ``--embedding-dim`` fp32, and
   an Adagrad ``sum`` of the same size).
2. ``dlrm evaluate`` on that checkpoint, in a child process: its peak RSS (``ru_maxrss``,
   read by a parent that runs nothing else).
3. A child process builds the model as ``dlrm train`` does, then saves it ``--rounds`` times
   (``shardrec.distributed.checkpoint.save``, as ``dlrm train`` does at its end). For each save:
   the growth of peak RSS over the RSS before it (the peak is reset through
   ``/proc/self/clear_refs``), wall seconds, and the process's CPU seconds (the machine is shared:
   CPU time is disturbed least by other sessions' load).

Run it against another tree's code with ``PYTHONPATH=<tree>/packages/core/src:<tree>/packages/
dlrm/src:<tree>/packages/sharders/src`` (the children inherit it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DLRM = [sys.executable, "-c", "from shardrec_dlrm.cli import main; main()"]

_SAVE_CHILD = r"""
import json, re, sys, time
from pathlib import Path
from shardrec.distributed.checkpoint import save
from shardrec_dlrm.model.config import ModelConfig
from shardrec_dlrm.training.config import TrainConfig
from shardrec_dlrm.training.parallel import ParallelState
from shardrec_dlrm.training.sharding import shard_model

def kib(field):
    return int(re.search(field + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1))

args = json.loads(sys.argv[1])
model = ModelConfig(num_embeddings=args["rows"], embedding_dim=args["dim"])
config = TrainConfig(data=".", model=model, optimizer="adagrad", device="cpu")
state = ParallelState.init("cpu")
run = shard_model(config, state)
out = []
for step in range(args["rounds"]):
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := RSS now
    before = kib("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    save(args["root"], run.model, step=step, optimizer=run.dense_optimizer)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    out.append({"rss_mib": before / 1024, "peak_growth_mib": (kib("VmHWM") - before) / 1024,
                "wall_s": wall, "cpu_s": cpu})
state.close()
print("RESULT " + json.dumps(out))
"""


def _timed(cmd: list[str], cwd: Path) -> tuple[str, float]:
    """Runs ``cmd`` under a small Python parent that has no other child; returns its stdout and
    its peak RSS in MiB (the parent's ``RUSAGE_CHILDREN``: that one child's)."""
    wrapper = [
        sys.executable,
        "-c",
        "import resource, subprocess, sys; "
        "rc = subprocess.call(sys.argv[1:]); "
        "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
        "sys.exit(rc)",
        *cmd,
    ]
    done = subprocess.run(wrapper, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed:\n{done.stderr[-3000:]}")
    line = next(x for x in done.stderr.splitlines() if x.startswith("MAXRSS"))
    return done.stdout, int(line.split()[1]) / 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-embeddings", type=int, default=64000)
    parser.add_argument("--embedding-dim", type=int, default=64)
    parser.add_argument("--rows", type=int, default=20000, help="synthetic data rows")
    parser.add_argument("--rounds", type=int, default=3, help="saves to time")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ckpt_mem_"))
    work.mkdir(parents=True, exist_ok=True)
    table_mib = 26 * args.num_embeddings * args.embedding_dim * 4 / 2**20
    print(f"tables: {table_mib:.0f} MiB of weights (+ the same again of Adagrad state)")
    data = work / "data"
    if not (data / "train.txt").exists():
        _timed([*DLRM, "synth", str(data), "--rows", str(args.rows)], work)
    sizes = [
        "--num-embeddings",
        str(args.num_embeddings),
        "--embedding-dim",
        str(args.embedding_dim),
    ]
    ckpt = work / "ckpt"
    train = [*DLRM, "train", "--data", str(data), *sizes, "--optimizer", "adagrad"]
    train += ["--limit-train-batches", "2", "--limit-val-batches", "1", "--limit-test-batches", "1"]
    train += ["--checkpoint-dir", str(ckpt), "--overwrite", "--device", "cpu"]
    _, train_mib = _timed(train, work)
    print(f"dlrm train (2 steps, one save): peak RSS {train_mib:.0f} MiB")
    evaluate = [*DLRM, "evaluate", "--checkpoint", str(ckpt), "--data", str(data)]
    evaluate += ["--limit-batches", "2", "--device", "cpu"]
    out, eval_mib = _timed(evaluate, work)
    print(f"dlrm evaluate: peak RSS {eval_mib:.0f} MiB ({out.strip()})")
    spec: dict[str, Any] = {
        "rows": args.num_embeddings,
        "dim": args.embedding_dim,
        "rounds": args.rounds,
        "root": str(work / "saves"),
    }
    done = subprocess.run(
        [sys.executable, "-c", _SAVE_CHILD, json.dumps(spec)],
        cwd=work,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"save child failed:\n{done.stderr[-3000:]}")
    result = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))[7:])
    for i, r in enumerate(result):
        print(
            f"save {i}: peak RSS +{r['peak_growth_mib']:.0f} MiB over the {r['rss_mib']:.0f} "
            "MiB before it, "
            f"{r['wall_s']:.2f} s wall, {r['cpu_s']:.2f} s CPU"
        )


if __name__ == "__main__":
    main()
