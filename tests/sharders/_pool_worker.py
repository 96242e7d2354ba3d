"""One worker of the test pool (see conftest.py): joins the gloo group, then runs cases it is sent.

Run as a script: ``python _pool_worker.py RANK WORLD PORT PARENT_PORT AUTHKEY_HEX``.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import sys
import traceback
from datetime import timedelta
from multiprocessing.connection import Client
from pathlib import Path
from types import ModuleType


def _load(path: str, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _load_case_file(path: str, packages: dict[str, str]) -> ModuleType:
    """Load a test file as a module of a package over its folder, so that its relative imports of
    the helpers beside it (``from ._reference import ...``) resolve as they do under pytest."""
    folder = str(Path(path).parent)
    if folder not in packages:
        package = ModuleType(f"_cases{len(packages)}")
        package.__path__ = [folder]
        sys.modules[package.__name__] = package
        packages[folder] = package.__name__
    return _load(path, f"{packages[folder]}.{Path(path).stem}")


def main() -> None:
    rank, world, port, parent_port = (int(x) for x in sys.argv[1:5])
    conn = Client(("127.0.0.1", parent_port), authkey=bytes.fromhex(sys.argv[5]))
    if os.environ.get("SHARDREC_HIDE_FBGEMM") == "1":
        _load(str(Path(__file__).resolve().parent.parent / "conftest.py"), "_root_conftest")
    import torch
    import torch.distributed as dist

    from shardrec.distributed import ShardingEnv

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    groups = {w: dist.new_group(list(range(w))) for w in range(1, world + 1)}
    modules: dict[str, ModuleType] = {}
    packages: dict[str, str] = {}
    conn.send_bytes(pickle.dumps(("ready", rank)))
    while True:
        task = pickle.loads(conn.recv_bytes())
        if task is None:
            break
        path, fn_name, size, kwargs = task
        try:
            if path not in modules:
                modules[path] = _load_case_file(path, packages)
            env = ShardingEnv.from_process_group(groups[size])
            torch.manual_seed(0)
            result = getattr(modules[path], fn_name)(env, **kwargs)
            # Plain pickle: torch's multiprocessing pickler sends tensors through shared memory.
            conn.send_bytes(pickle.dumps((rank, True, result)))
        except BaseException:
            conn.send_bytes(pickle.dumps((rank, False, traceback.format_exc())))
    dist.destroy_process_group()
    conn.close()


if __name__ == "__main__":
    main()
