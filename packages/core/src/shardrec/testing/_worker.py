"""One worker of a :class:`~shardrec.testing.WorkerPool`: joins the gloo group, then runs the
cases it is sent until told to stop.

Started by the pool as ``python -m shardrec.testing._worker RANK SIZE PORT PARENT_PORT KEY_HEX``
with ``SHARDREC_TESTING_PRELOAD`` naming files to run first (an import hook a test suite needs).
"""

from __future__ import annotations

import os
import pickle
import runpy
import sys
import traceback
from datetime import timedelta
from multiprocessing.connection import Client
from typing import Any

from shardrec.testing._transport import PRELOAD_ENV, ensure_modules

_LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"


def _run_case(fn: Any, env: Any, local_world_size: int | None, kwargs: dict[str, Any]) -> Any:
    import torch

    old = os.environ.pop(_LOCAL_WORLD_SIZE, None)
    if local_world_size is not None:
        os.environ[_LOCAL_WORLD_SIZE] = str(local_world_size)
    try:
        torch.manual_seed(0)
        return fn(env, **kwargs)
    finally:
        os.environ.pop(_LOCAL_WORLD_SIZE, None)
        if old is not None:
            os.environ[_LOCAL_WORLD_SIZE] = old


def main() -> None:
    rank, size, port, parent_port = (int(x) for x in sys.argv[1:5])
    conn = Client(("127.0.0.1", parent_port), authkey=bytes.fromhex(sys.argv[5]))
    for path in filter(None, os.environ.get(PRELOAD_ENV, "").split(os.pathsep)):
        runpy.run_path(path, run_name="__shardrec_preload__")
    import torch
    import torch.distributed as dist

    from shardrec.distributed import ShardingEnv

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=60),
    )
    # One group per world size, made once: a case on w ranks uses ranks 0..w-1.
    groups = {w: dist.new_group(list(range(w))) for w in range(1, size + 1)}
    conn.send_bytes(pickle.dumps(("ready", rank)))
    while True:
        message = conn.recv_bytes()
        if not message:
            break
        files, world, local_world_size, payload = pickle.loads(message)
        try:
            ensure_modules(files)
            fn, kwargs = pickle.loads(payload)
            env = ShardingEnv.from_process_group(groups[world])
            result = _run_case(fn, env, local_world_size, kwargs)
            # Plain pickle: torch's multiprocessing pickler would send tensors by shared memory.
            conn.send_bytes(pickle.dumps((rank, True, result)))
        except BaseException:
            conn.send_bytes(pickle.dumps((rank, False, traceback.format_exc())))
    dist.destroy_process_group()
    conn.close()


if __name__ == "__main__":
    main()
