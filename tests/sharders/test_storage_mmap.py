"""The example ``mmap`` storage backend (tests/plugins/shardrec_mmap_storage) under sharding.

The plugin is pip-installed into a temporary folder and found through its entry point, as a user's
would be; the ranks are subprocesses running this file with that folder on ``PYTHONPATH``.

At 2 gloo processes, a model whose tables live in memory-mapped files and the same model with the
default storage are sharded table-wise and row-wise under the same plan and trained on the same
batches: the outputs agree at every step, and after the steps the weights and the fused optimizer
state (saved through shardrec's checkpoints and read back unsharded) agree too. The row-wise
checkpoint of the mmap model then loads at 3 processes (table-wise, into new files) and at 1
(unsharded), and gives the outputs the saved model gave.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from shardrec.kernels import StorageChoice

pytestmark = pytest.mark.multiprocess

PLUGIN = Path(__file__).resolve().parent.parent / "plugins" / "shardrec_mmap_storage"
TABLES = [("t0", 7, 4, ["f0"]), ("t1", 10, 8, ["f1", "f2"])]
KEYS = ["f0", "f1", "f2"]
GLOBAL_BATCH = 6  # divides by 1, 2 and 3
LR = 0.1
OPTIMIZER = "exact_adagrad"  # a table-shaped state: every row's state is checked
STEPS = 3
TOL: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-6}


class Model(nn.Module):
    def __init__(self, seed: int, storage: StorageChoice | None) -> None:
        super().__init__()
        torch.manual_seed(seed)
        configs = [
            EmbeddingBagConfig(
                name=n, num_embeddings=r, embedding_dim=d, feature_names=f, storage=storage
            )
            for n, r, d, f in TABLES
        ]
        self.ebc = EmbeddingBagCollection(
            configs, fused_params={"optimizer": OPTIMIZER, "learning_rate": LR}
        )
        self.top = nn.Linear(sum(d * len(f) for _, _, d, f in TABLES), 1)

    def forward(self, kjt: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.ebc(kjt).values()
        return rows, torch.tanh(self.top(rows)).sum()


def mmap(directory: Path) -> StorageChoice:
    directory.mkdir(parents=True, exist_ok=True)
    return StorageChoice("mmap", {"directory": str(directory)})


def batch(seed: int, rank: int | None, world: int) -> KeyedJaggedTensor:
    """Rank ``rank``'s samples of a global batch (all of them for None)."""
    g = torch.Generator().manual_seed(seed)
    rows = {f: r for _, r, _, fs in TABLES for f in fs}
    lengths = torch.randint(0, 4, (len(KEYS), GLOBAL_BATCH), generator=g)
    per = GLOBAL_BATCH // world
    lo, hi = (0, GLOBAL_BATCH) if rank is None else (rank * per, (rank + 1) * per)
    values = []
    for k, f in enumerate(KEYS):
        ids = [torch.randint(0, rows[f], (int(n),), generator=g) for n in lengths[k]]
        values.extend(ids[lo:hi])
    return KeyedJaggedTensor(
        keys=KEYS, values=torch.cat(values), lengths=lengths[:, lo:hi].reshape(-1)
    )


def unsharded_state(root: Path, storage: StorageChoice | None) -> dict[str, torch.Tensor]:
    """Weights and fused optimizer state of a checkpoint, loaded into an unsharded model."""
    from shardrec.distributed.checkpoint import load

    model = Model(seed=5, storage=storage)
    load(root, model)
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for table, states in model.ebc.lookup.optimizer_states().items():
        for name, t in states.items():
            out[f"{table}.{name}"] = t.clone()
    return out


# ---- the ranks (this file run as a script) ----------------------------------------------------


def _plan(kind: str, world: int) -> Any:
    from shardrec.distributed import ShardingPlan
    from shardrec.distributed.sharding_plan import row_wise, table_wise

    if kind == "tw":
        return ShardingPlan(
            {"ebc": {n: table_wise(i % world, r, d) for i, (n, r, d, _) in enumerate(TABLES)}}
        )
    return ShardingPlan({"ebc": {n: row_wise(r, d, world) for n, r, d, _ in TABLES}})


def rank_train(rank: int, world: int, work: Path) -> dict[str, Any]:
    """Both storages, table-wise and row-wise: equal outputs per step; both checkpointed."""
    from shardrec.distributed import DistributedModelParallel, ShardingEnv
    from shardrec.distributed.checkpoint import save

    env = ShardingEnv.from_process_group()
    result: dict[str, Any] = {}
    for kind in ("tw", "rw"):
        models = {}
        for label, storage in (("default", None), ("mmap", mmap(work / f"tables-{kind}"))):
            model = Model(seed=0, storage=storage)
            dmp = DistributedModelParallel(model, env=env, plan=_plan(kind, world))
            opt = torch.optim.Adagrad([p for p in dmp.parameters() if p.requires_grad], lr=LR)
            models[label] = (dmp, opt)
        for step in range(STEPS):
            outs = {}
            for label, (dmp, opt) in models.items():
                rows, loss = dmp(batch(step, rank, world))
                loss.backward()
                opt.step()
                opt.zero_grad()
                outs[label] = rows.detach()
            torch.testing.assert_close(outs["mmap"], outs["default"], **TOL)
        for label, (dmp, opt) in models.items():
            save(work / f"ck-{kind}-{label}", dmp, step=STEPS, optimizer=opt, pg=env.pg)
        with torch.no_grad():
            result[f"after-{kind}"] = models["mmap"][0](batch(99, rank, world))[0]
        # The shards' rows are the files: what the module holds is what the files hold.
        shards = models["mmap"][0].module.ebc.local_table_shards()
        files = sorted(p.name for p in (work / f"tables-{kind}").iterdir())
        result[f"files-{kind}"] = files
        for table, held in shards.items():
            for shard in held.weight:
                weight = shard.tensor
                # Table-wise shards are named <table>__c<column>; row-wise ones keep the table's
                # name (the unsharded module's own files have the whole table's rows).
                local = f"{table}__c0" if kind == "tw" else table
                name = [
                    f
                    for f in files
                    if f.startswith(f"{local}.rank{rank}.weight.{weight.shape[0]}x")
                ]
                assert len(name) == 1, (table, files)
                on_disk = (work / f"tables-{kind}" / name[0]).read_bytes()[4096:]
                from_file = torch.frombuffer(bytearray(on_disk), dtype=torch.float32)
                assert torch.equal(from_file.view_as(weight), weight), table
    return result


def rank_reload(rank: int, world: int, work: Path) -> dict[str, Any]:
    """The row-wise mmap checkpoint, loaded table-wise at this world size into new files."""
    from shardrec.distributed import DistributedModelParallel, ShardingEnv
    from shardrec.distributed.checkpoint import load

    env = ShardingEnv.from_process_group()
    model = Model(seed=1, storage=mmap(work / f"reload-{world}"))
    dmp = DistributedModelParallel(model, env=env, plan=_plan("tw", world))
    assert load(work / "ck-rw-mmap", dmp, pg=env.pg) == STEPS
    with torch.no_grad():
        return {"after": dmp(batch(99, rank, world))[0]}


def _rank_main(args: dict[str, Any]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world, work = int(args["rank"]), int(args["world"]), Path(args["work"])
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{args['port']}", rank=rank, world_size=world
    )
    case = {"train": rank_train, "reload": rank_reload}[args["case"]]
    result = case(rank, world, work)
    torch.save(result, work / f"{args['case']}-{world}-{rank}.pt")
    dist.destroy_process_group()


# ---- the tests --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mmap_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin, pip-installed (from a copy: the tree stays clean) into a folder."""
    tmp = tmp_path_factory.mktemp("mmap-plugin")
    source = tmp / "src"
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = tmp / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(source),
        ],
        check=True,
    )
    return site


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_ranks(site: Path, case: str, world: int, work: Path) -> list[dict[str, Any]]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                json.dumps(
                    {"case": case, "rank": r, "world": world, "work": str(work), "port": port}
                ),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    failures = []
    for r, proc in enumerate(procs):
        try:
            _, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        if proc.returncode != 0:
            failures.append(f"rank {r} exited {proc.returncode}:\n{err[-4000:]}")
    assert not failures, "\n".join(failures)
    return [torch.load(work / f"{case}-{world}-{r}.pt") for r in range(world)]


def test_mmap_tables_train_and_reshard_like_default_tables(mmap_site: Path, tmp_path: Path) -> None:
    trained = _run_ranks(mmap_site, "train", 2, tmp_path)
    for kind in ("tw", "rw"):
        # Every rank kept its shards' weight and optimizer state in files of its own.
        files = trained[0][f"files-{kind}"]
        assert any(".rank0.weight." in f for f in files), files
        assert any(".rank1.sum." in f for f in files), files
        mine = unsharded_state(tmp_path / f"ck-{kind}-mmap", None)
        default = unsharded_state(tmp_path / f"ck-{kind}-default", None)
        assert mine.keys() == default.keys()
        assert any(k.endswith(".sum") for k in mine)
        for key, value in default.items():
            torch.testing.assert_close(mine[key], value, msg=key, **TOL)
        # And the steps moved them: the test compares trained tables, not initial ones.
        initial = Model(seed=0, storage=None).state_dict()
        assert not torch.allclose(
            mine["ebc.embedding_bags.t1.weight"], initial["ebc.embedding_bags.t1.weight"]
        )
    saved = torch.cat([r["after-rw"] for r in trained])

    reloaded = _run_ranks(mmap_site, "reload", 3, tmp_path)
    torch.testing.assert_close(torch.cat([r["after"] for r in reloaded]), saved, **TOL)
    assert any(".rank2." in f.name for f in (tmp_path / "reload-3").iterdir())

    # At 1: an unsharded model with mmap tables, in this process (the plugin found by entry point).
    sys.path.insert(0, str(mmap_site))
    try:
        from shardrec.distributed.checkpoint import load

        model = Model(seed=3, storage=mmap(tmp_path / "reload-1"))
        assert model.ebc.lookup.group_backends == ("mmap", "mmap")
        assert load(tmp_path / "ck-rw-mmap", model) == STEPS
        with torch.no_grad():
            alone = model(batch(99, None, 1))[0]
        torch.testing.assert_close(alone, saved, **TOL)
    finally:
        sys.path.remove(str(mmap_site))


if __name__ == "__main__":
    _rank_main(json.loads(sys.argv[1]))
