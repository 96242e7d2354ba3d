"""Variable batch per feature (VBE) benchmark: the step and the bytes sent, with and without VBE.

    MALLOC_MMAP_THRESHOLD_=33554432 .venv/bin/python tools/bench/vbe.py [--rounds 3]
        [--no-dmp | --dmp-only]

Workload: each rank's batch is USERS users with ITEMS items each (B = USERS x ITEMS samples).
Eight user features (1 to 8 ids each, the same on all of a user's samples) and four item features
(one id), one table per feature (ROWS rows, dimension DIM). Two modules: ``user`` (the user
features only: deduplicated, every key has USERS samples) and ``mixed`` (user and item features:
the item keys keep B samples).

Part 1, one process, CPU time of its one thread: an EmbeddingBagCollection's forward + backward
(gradients on the tables, no optimizer: TorchRec's unsharded module has no fused one) on the full
batch and on the VBE batch,
shardrec and TorchRec 1.8.0 in alternating rounds, both building their VBE KJT from the same
tensors; and shardrec's ``deduplicate_features`` alone (what building the VBE batch from a full
one costs). Runs in ``.venv-peer`` when this interpreter lacks TorchRec (``make bench-peer``).

Part 2, DistributedModelParallel on 2 gloo processes: a training step (forward, backward, fused
SGD; TorchRec's through ``apply_optimizer_in_backward``, without which its VBE backward fails on
CPU) table-wise and row-wise, full batch against VBE: the busiest rank's CPU time per step (the
machine is shared; wall time is printed too), and the bytes each rank sends to its peer per step,
counted by wrapping ``torch.distributed``'s collectives (ids, lengths, pooled rows and their
gradients, check flags; all-reduce and reduce-scatter counted at their ring volume). TorchRec does
not offer row-wise on CPU: it is asked through a sharder that lists it, and shows ``n/a`` if it
fails.

The whole script re-runs itself in ``.venv-peer`` when this interpreter lacks TorchRec.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import compare, free_port, peer_available, run_peer

USERS, ITEMS, ROWS, DIM = 256, 16, 20_000, 64
USER_KEYS = [f"user_{i}" for i in range(8)]
ITEM_KEYS = [f"item_{i}" for i in range(4)]
MODULES = {"user": USER_KEYS, "mixed": USER_KEYS + ITEM_KEYS}


def raw_batch(seed: int, keys: list[str]) -> dict[str, Any]:
    """The tensors of one rank's batch, full and VBE (user keys once per user)."""
    g = torch.Generator().manual_seed(seed)
    batch = USERS * ITEMS
    full_ids, full_lengths, vbe_ids, vbe_lengths, strides = [], [], [], [], []
    for key in keys:
        if key.startswith("user"):
            n = torch.randint(1, 9, (USERS,), generator=g)
            ids = torch.randint(ROWS, (int(n.sum()),), generator=g)
            per_user = torch.split(ids, n.tolist())
            full_ids += [per_user[u] for u in range(USERS) for _ in range(ITEMS)]
            full_lengths.append(n.repeat_interleave(ITEMS))
            vbe_ids.append(ids)
            vbe_lengths.append(n)
            strides.append(USERS)
        else:
            ids = torch.randint(ROWS, (batch,), generator=g)
            full_ids.append(ids)
            full_lengths.append(torch.ones(batch, dtype=torch.int64))
            vbe_ids.append(ids)
            vbe_lengths.append(torch.ones(batch, dtype=torch.int64))
            strides.append(batch)
    user_rows = torch.arange(USERS).repeat_interleave(ITEMS)
    inverse = torch.stack([user_rows if s == USERS else torch.arange(batch) for s in strides])
    return {
        "keys": keys,
        "full": (torch.cat(full_ids), torch.cat(full_lengths).int()),
        "vbe": (torch.cat(vbe_ids), torch.cat(vbe_lengths).int()),
        "strides": [[s] for s in strides],
        "inverse": inverse,
    }


def make_kjts(kjt_cls: Any, raw: dict[str, Any]) -> tuple[Any, Any]:
    keys = raw["keys"]
    full = kjt_cls(keys=keys, values=raw["full"][0], lengths=raw["full"][1])
    vbe = kjt_cls(
        keys=keys,
        values=raw["vbe"][0],
        lengths=raw["vbe"][1],
        stride_per_key_per_rank=raw["strides"],
        inverse_indices=(keys, raw["inverse"]),
    )
    return full, vbe


def _ebc(impl: str, keys: list[str]) -> tuple[torch.nn.Module, Any]:
    if impl == "torchrec":
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    else:
        from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    torch.manual_seed(0)
    configs = [
        EmbeddingBagConfig(name=f"t_{k}", embedding_dim=DIM, num_embeddings=ROWS, feature_names=[k])
        for k in keys
    ]
    return EmbeddingBagCollection(tables=configs), KeyedJaggedTensor


def part1(args: argparse.Namespace) -> None:
    impls = ["shardrec"] + (["torchrec"] if importlib.util.find_spec("torchrec") else [])
    print(
        f"part 1: one process, {USERS} users x {ITEMS} items, {torch.get_num_threads()} thread(s)"
    )
    print(f"{'module':8} {'batch':6} " + " ".join(f"{i + ' ms':>13}" for i in impls))
    for module, keys in MODULES.items():
        raw = raw_batch(1, keys)
        factories: dict[str, Callable[[], Callable[[], object]]] = {}
        for impl in impls:
            ebc, kjt_cls = _ebc(impl, keys)
            for form, kjt in zip(("full", "vbe"), make_kjts(kjt_cls, raw), strict=True):

                def factory(ebc: Any = ebc, kjt: Any = kjt) -> Callable[[], object]:
                    def step() -> None:
                        ebc.zero_grad(set_to_none=True)
                        ebc(kjt).values().sum().backward()

                    return step

                factories[f"{impl}/{form}"] = factory
        # CPU time of this thread: one thread, and the machine is shared.
        best = compare(
            factories, warmup=3, iters=args.iters, rounds=args.rounds, clock=time.thread_time
        )
        for form in ("full", "vbe"):
            cells = " ".join(f"{best[f'{i}/{form}'] * 1e3:13.2f}" for i in impls)
            print(f"{module:8} {form:6} {cells}")
        if "torchrec" in impls:
            ratio = best["torchrec/vbe"] / best["shardrec/vbe"]
            print(f"{module:8} vbe: TorchRec / shardrec = {ratio:.2f} (above 1: shardrec faster)")
        from shardrec import KeyedJaggedTensor
        from shardrec.sparse import deduplicate_features

        full, _ = make_kjts(KeyedJaggedTensor, raw)
        dedup = compare(
            {"dedup": lambda full=full: lambda: deduplicate_features(full, USER_KEYS)},
            warmup=2,
            iters=max(3, args.iters // 4),
            rounds=args.rounds,
            clock=time.thread_time,
        )["dedup"]
        print(f"{module:8} deduplicate_features of the full batch: {dedup * 1e3:.2f} ms")


# -- part 2: DistributedModelParallel ------------------------------------------------------------

_SENT = [0]


def _count_bytes() -> None:
    """Wrap the collectives, adding up the bytes this rank sends to its peers."""

    def size(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    original_a2a = dist.all_to_all_single

    def all_to_all_single(output: Any, input: Any, output_split_sizes: Any = None,
                          input_split_sizes: Any = None, *a: Any, **k: Any) -> Any:  # fmt: skip
        total = size(input)
        if input_split_sizes:
            total -= total // max(1, input.shape[0]) * input_split_sizes[dist.get_rank()]
        else:
            total -= total // dist.get_world_size()
        _SENT[0] += total
        return original_a2a(output, input, output_split_sizes, input_split_sizes, *a, **k)

    dist.all_to_all_single = all_to_all_single  # type: ignore[assignment]
    # Ring volume per rank: all-reduce 2(W-1)/W of the tensor, reduce-scatter (W-1)/W of its
    # input, all-gather (W-1) times its input (W = 2 here).
    share = {"all_reduce": 1.0, "reduce_scatter_tensor": 0.5, "reduce_scatter_single": 0.5,
             "all_gather_into_tensor": 1.0, "all_gather_single": 1.0}  # fmt: skip
    for name, factor in share.items():
        if not hasattr(dist, name):
            continue
        original = getattr(dist, name)

        def wrapped(*a: Any, _original: Any = original, _f: float = factor, **k: Any) -> Any:
            tensors = [t for t in (*a, *k.values()) if isinstance(t, torch.Tensor)]
            _SENT[0] += int(size(tensors[-1] if len(tensors) > 1 else tensors[0]) * _f)
            return _original(*a, **k)

        setattr(dist, name, wrapped)
    # The list forms (TorchRec's variable-batch reduce-scatter uses one): every piece but ours.
    for name, pieces_at in (("reduce_scatter", 1), ("all_to_all", 1), ("all_gather", 1)):
        original = getattr(dist, name)

        def listed(*a: Any, _original: Any = original, _at: int = pieces_at, **k: Any) -> Any:
            pieces = a[_at] if len(a) > _at else next(iter(k.values()))
            if isinstance(pieces, torch.Tensor):  # all_gather(list, tensor): ours to each peer
                _SENT[0] += size(pieces) * (dist.get_world_size() - 1)
            else:
                mine = dist.get_rank()
                _SENT[0] += sum(size(t) for r, t in enumerate(pieces) if r != mine)
            return _original(*a, **k)

        setattr(dist, name, listed)


def _tables(keys: list[str]) -> list[Any]:
    return [(f"t_{k}", k) for k in keys]


def _shardrec_model(sharding: str, keys: list[str]) -> tuple[torch.nn.Module, Any]:
    from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from shardrec.distributed import DistributedModelParallel, ShardingPlan
    from shardrec.distributed.sharding_plan import row_wise, table_wise

    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name=n, embedding_dim=DIM, num_embeddings=ROWS, feature_names=[k])
            for n, k in _tables(keys)
        ],
        device="meta",
        fused_params={"optimizer": "sgd", "learning_rate": 0.01},
    )
    plan = {
        n: table_wise(i % 2, ROWS, DIM) if sharding == "tw" else row_wise(ROWS, DIM, 2)
        for i, (n, _) in enumerate(_tables(keys))
    }
    return DistributedModelParallel(ebc, plan=ShardingPlan({"": plan})), KeyedJaggedTensor


def _torchrec_model(sharding: str, keys: list[str]) -> tuple[torch.nn.Module, Any]:
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan
    from torchrec.distributed.sharding_plan import row_wise as tr_row_wise
    from torchrec.distributed.sharding_plan import table_wise as tr_table_wise
    from torchrec.distributed.types import ShardingPlan
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    class _AnySharder(EmbeddingBagCollectionSharder):  # type: ignore[misc]
        def sharding_types(self, compute_device_type: str) -> list[str]:
            return ["table_wise", "row_wise"]

    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name=n, embedding_dim=DIM, num_embeddings=ROWS, feature_names=[k])
            for n, k in _tables(keys)
        ],
        device=torch.device("meta"),
    )
    apply_optimizer_in_backward(torch.optim.SGD, ebc.parameters(), {"lr": 0.01})
    sharder = _AnySharder()
    per_table = {
        n: tr_table_wise(rank=i % 2) if sharding == "tw" else tr_row_wise()
        for i, (n, _) in enumerate(_tables(keys))
    }
    plan = construct_module_sharding_plan(
        ebc, per_table, sharder=sharder, local_size=2, world_size=2, device_type="cpu"
    )
    dmp = DistributedModelParallel(
        ebc, device=torch.device("cpu"), plan=ShardingPlan({"": plan}), sharders=[sharder]
    )
    return dmp, KeyedJaggedTensor


def _worker(
    rank: int, impl: str, sharding: str, module: str, port: int, args: Any, out: str
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    _count_bytes()
    keys = MODULES[module]
    raws = [raw_batch(100 * rank + i, keys) for i in range(2)]
    result: dict[str, Any] = {}
    for form in ("full", "vbe"):
        try:
            build = _torchrec_model if impl == "torchrec" else _shardrec_model
            dmp, kjt_cls = build(sharding, keys)
            batches = [make_kjts(kjt_cls, raw)[form == "vbe"] for raw in raws]

            def step(kjt: Any, dmp: Any = dmp) -> None:
                dmp(kjt).values().sum().backward()

            for i in range(2):
                step(batches[i % 2])
            _SENT[0] = 0
            step(batches[0])
            sent = _SENT[0]
            windows, cpu = [], []
            for _ in range(args.rounds):
                dist.barrier()
                start, start_cpu = time.perf_counter(), time.process_time()
                for i in range(args.dmp_steps):
                    step(batches[i % 2])
                spent = torch.tensor([time.process_time() - start_cpu], dtype=torch.float64)
                dist.barrier()
                windows.append((time.perf_counter() - start) / args.dmp_steps)
                dist.all_reduce(spent, op=dist.ReduceOp.MAX)
                cpu.append(float(spent) / args.dmp_steps)
            result[form] = {
                "cpu_ms": min(cpu) * 1e3,
                "wall_ms": min(windows) * 1e3,
                "sent_bytes": sent,
            }
        except Exception as exc:  # one side failing must not hide the other's figures
            result[form] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def part2(args: argparse.Namespace) -> None:
    impls = ["shardrec"] + (["torchrec"] if importlib.util.find_spec("torchrec") else [])
    print(f"\npart 2: DistributedModelParallel, 2 gloo processes, 1 thread each, batch "
          f"{USERS * ITEMS} per rank; busiest rank's CPU ms and wall ms per step, MiB each rank"
          " sends per step")  # fmt: skip
    print(f"{'impl':9} {'sharding':9} {'module':7} {'cpu full':>9} {'cpu vbe':>9} "
          f"{'wall full':>9} {'wall vbe':>9} {'MiB full':>9} {'MiB vbe':>9}")  # fmt: skip
    for sharding in ("tw", "rw"):
        for module in MODULES:
            for impl in impls:
                with tempfile.TemporaryDirectory() as tmp:
                    out = str(Path(tmp) / "r.json")
                    spawn_args = (impl, sharding, module, free_port(), args, out)
                    mp.spawn(_worker, args=spawn_args, nprocs=2)
                    r = json.loads(Path(out).read_text())
                cells = []
                for key, scale, fmt in (
                    ("cpu_ms", 1, "9.1f"),
                    ("wall_ms", 1, "9.1f"),
                    ("sent_bytes", 2**-20, "9.2f"),
                ):
                    for form in ("full", "vbe"):
                        value = r[form].get(key)
                        cells.append("      n/a" if value is None else f"{value * scale:{fmt}}")
                print(f"{impl:9} {sharding:9} {module:7} " + " ".join(cells))
                for form in ("full", "vbe"):
                    if "error" in r[form]:
                        print(f"    {impl} {form}: {r[form]['error']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dmp-steps", type=int, default=5)
    parser.add_argument("--no-peer", action="store_true", help="shardrec only")
    parser.add_argument("--no-dmp", action="store_true", help="part 1 only")
    parser.add_argument("--dmp-only", action="store_true", help="part 2 only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.no_peer and importlib.util.find_spec("torchrec") is None:
        if peer_available():
            print(run_peer([__file__, *sys.argv[1:]], timeout=3600), end="")
            return
        print("(no TorchRec here and no .venv-peer: shardrec only)")
    if not args.dmp_only:
        part1(args)
    if not args.no_dmp:
        part2(args)
    print(f"load average: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
