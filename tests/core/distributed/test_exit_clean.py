"""Processes that destroyed their process group exit 0, under torchrun on two processes: README's
quick start, a training script that keeps its model (DDP and a torch optimizer included) in
globals, one that frees its model right after (which must not hang), and ``dlrm train``.

With torch 2.13 on gloo, a group still alive when Python finalises can abort the process after its
work is done ("terminate called without an active exception", ``shardrec.distributed.group_ref``
says why); whether it does is a race, so an exit status alone would detect it only some of the
time. What makes it possible is not a race: a gloo group alive after ``destroy_process_group``,
seen as its worker threads (``pt_gloo_runloop``) still running. Each process reports how many it
has (after ``destroy_process_group`` for the quick start, and at exit for all, through a
``sitecustomize`` that runs its ``atexit`` hook last); before the fix every one of these runs
reported 2 per rank, so one run detects it. The runs are repeated a few times as well, for the
exit status.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ...docs.test_code_blocks import _script

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
DLRM = Path(sys.executable).parent / "dlrm"
SAMPLE = REPO / "tests" / "data" / "criteo_sample" / "criteo_sample.txt"
TIMEOUT_S = 180

_COUNT = """
import os as _os


def _gloo_workers() -> int:
    names = []
    for tid in _os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass  # the thread ended meanwhile
    return names.count("pt_gloo_runloop")
"""

#: Registered first, so it runs after every other atexit hook (shardrec's among them).
_SITECUSTOMIZE = (
    _COUNT
    + """
import atexit as _atexit
import sys as _sys

_atexit.register(
    lambda: print(f"gloo workers at exit: {_gloo_workers()}", file=_sys.stderr, flush=True)
)
"""
)

_AFTER_DESTROY = _COUNT + '\nprint(f"gloo workers after destroy: {_gloo_workers()}", flush=True)\n'

#: A sharded model whose dense layer DMP wraps in DDP.
_MODEL = """
import torch
import torch.distributed as dist
from torch import nn

import shardrec as torchrec

dist.init_process_group("gloo")


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ebc = torchrec.EmbeddingBagCollection(
            tables=[
                torchrec.EmbeddingBagConfig(
                    name=f"t{i}", embedding_dim=8, num_embeddings=32, feature_names=[f"f{i}"]
                )
                for i in range(2)
            ]
        )
        self.dense = nn.Linear(16, 1)

    def forward(self, kjt):
        return self.dense(self.ebc(kjt).values())


kjt = torchrec.KeyedJaggedTensor(
    keys=["f0", "f1"], values=torch.tensor([1, 2, 3, 4, 5]), lengths=torch.tensor([2, 1, 1, 1])
)
"""

#: A script that keeps everything in globals after destroy_process_group: the sharded model, the
#: optimizer (creating one imports torch.distributed.nn, which binds the default group of the
#: moment) and the loss.
TRAINING_SCRIPT = (
    _MODEL
    + """
model = torchrec.distributed.DistributedModelParallel(Model(), device=torch.device("cpu"))
optimizer = torch.optim.SGD(model.module.dense.parameters(), lr=0.1)
loss = model(kjt).sum()
loss.backward()
optimizer.step()
print("trained", flush=True)
dist.destroy_process_group()
"""
)

#: The model freed right after destroy_process_group (it ends with main), so that its DDP's reducer
#: is the group's last holder, just after collectives whose tensors a gloo worker still has to let
#: go of (which takes the GIL). torch destroys a reducer holding the GIL: had the reducer ended the
#: group, its teardown would wait for that worker forever (it hung in 2 runs of 4 before DMP kept
#: the group's Python object until the reducer is gone).
FREED_SCRIPT = (
    _MODEL
    + """

def main():
    model = torchrec.distributed.DistributedModelParallel(Model(), device=torch.device("cpu"))
    model(kjt).sum().backward()
    for _ in range(20):
        gathered = [torch.empty(1000) for _ in range(2)]
        dist.all_gather(gathered, torch.ones(1000))
    dist.destroy_process_group()


main()
print("returned", flush=True)
"""
)


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    site = cwd / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )


def _counts(text: str, when: str) -> list[int]:
    return [int(n) for n in re.findall(rf"gloo workers {when}: (\d+)", text)]


def _assert_clean(result: subprocess.CompletedProcess[str], what: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{what} exited {result.returncode}:\n{output}"
    at_exit = _counts(output, "at exit")
    # torchrun's own process reports too, and any Python process torch started.
    assert len(at_exit) >= 2, f"{what}: the ranks did not report at exit:\n{output}"
    assert set(at_exit) == {0}, f"{what}: gloo groups alive at exit {at_exit}:\n{output}"


#: The quick start finishes in a few seconds: three runs.
QUICK_START_RUNS = 3


def test_readme_quick_start_ends_its_group_and_exits_0(tmp_path: Path) -> None:
    script = tmp_path / "quickstart.py"
    script.write_text(_script(REPO / "README.md") + _AFTER_DESTROY)
    for run in range(QUICK_START_RUNS):
        result = _run([*TORCHRUN, str(script)], tmp_path)
        _assert_clean(result, f"README's quick start (run {run + 1})")
        assert _counts(result.stdout, "after destroy") == [0, 0], result.stdout


def test_a_script_keeping_its_model_after_destroy_exits_0(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(TRAINING_SCRIPT)
    for run in range(2):
        result = _run([*TORCHRUN, str(script)], tmp_path)
        _assert_clean(result, f"the training script (run {run + 1})")
        assert result.stdout.count("trained") == 2


#: Three steps of a tiny model on the sample.
DLRM_OPTIONS = (
    "--embedding-dim 4 --num-embeddings 64 --dense-arch-layer-sizes 8,4 --over-arch-layer-sizes 8,1"
    " --val-fraction 0.2 --test-fraction 0.2 --device cpu --batch-size 8 --limit-train-batches 3"
    " --quiet"
)


def test_a_model_freed_after_destroy_does_not_hang(tmp_path: Path) -> None:
    script = tmp_path / "freed.py"
    script.write_text(FREED_SCRIPT)
    for run in range(2):
        result = _run([*TORCHRUN, str(script)], tmp_path)
        _assert_clean(result, f"the script freeing its model (run {run + 1})")
        assert result.stdout.count("returned") == 2


def test_dlrm_train_under_torchrun_exits_0(tmp_path: Path) -> None:
    options = DLRM_OPTIONS.split()
    for run in range(2):
        argv = [*TORCHRUN, "--no-python", str(DLRM), "train", "--data", str(SAMPLE), *options]
        result = _run(argv, tmp_path)
        _assert_clean(result, f"dlrm train (run {run + 1})")
        assert "test: auc=" in result.stdout
