"""How a case function and its arguments travel to the workers.

A case function is sent by module and qualified name, like pickle sends any function. Test files
are often not importable by name in a fresh process (pytest imports them from their path), so the
parent also sends the file of every module that the pickled task refers to, and a worker loads a
module from its file when importing it by name fails, under the same name (relative imports of the
files beside it keep working: missing parent packages are made over their folders).
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import pickle
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["PRELOAD_ENV", "dumps_task", "ensure_modules"]

PRELOAD_ENV = "SHARDREC_TESTING_PRELOAD"
"""Files (``os.pathsep``-separated) a worker runs before it imports torch."""


class _RecordingPickler(pickle.Pickler):
    """A pickler that notes the module of every class and function it stores by reference."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.modules: set[str] = set()

    def reducer_override(self, obj: Any) -> Any:
        module = (
            getattr(obj, "__module__", None) if isinstance(obj, type) or callable(obj) else None
        )
        if module is None:
            module = type(obj).__module__
        if isinstance(module, str):
            self.modules.add(module)
        return NotImplemented


def _files_of(modules: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in sorted(modules):
        module = sys.modules.get(name)
        file = getattr(module, "__file__", None)
        if isinstance(file, str) and file.endswith(".py"):
            out[name] = file
    return out


def dumps_task(task: Any) -> tuple[dict[str, str], bytes]:
    """The task pickled, and the files of the modules it refers to (module name -> path)."""
    buffer = io.BytesIO()
    pickler = _RecordingPickler(buffer)
    pickler.dump(task)
    return _files_of(pickler.modules), buffer.getvalue()


def _package_over(name: str, folder: Path) -> None:
    if name in sys.modules:
        return
    parent, _, _ = name.rpartition(".")
    if parent:
        _package_over(parent, folder.parent)
    package = ModuleType(name)
    package.__path__ = [str(folder)]
    sys.modules[name] = package


def _load_file(name: str, path: str) -> ModuleType:
    parent, _, _ = name.rpartition(".")
    if parent:
        _package_over(parent, Path(path).parent)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load module {name!r} from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def ensure_modules(files: dict[str, str]) -> None:
    """Make every module of ``files`` importable by its name in this process."""
    for name, path in files.items():
        if name in sys.modules:
            continue
        try:
            found = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            found = None
        if found is not None and found.origin is not None and Path(found.origin) == Path(path):
            importlib.import_module(name)
        else:
            _load_file(name, path)
