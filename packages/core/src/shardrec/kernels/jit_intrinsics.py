"""Machine instructions numba does not offer, for shardrec's compiled CPU kernels.

Each is a Python function that compiled code calls as the instruction (LLVM's intrinsic of the
same meaning) once :func:`register_intrinsics` has run; called from Python it does what the
docstring says, for reading and tests only. Used by :mod:`shardrec.kernels.cpu_update_jit` and
:mod:`shardrec.modules.mc_id_map_host`; numba is imported only when they register.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["fma32", "prefetch_read", "prefetch_write", "register_intrinsics"]


def fma32(a: float, b: float, c: float) -> float:
    """``a * b + c`` rounded once to float32 (compiled: the machine's fused multiply-add; here the
    exact float64 product plus ``c``, rounded twice, for reading only)."""
    return float(np.float32(np.float64(a) * np.float64(b) + np.float64(c)))


def prefetch_write(a: npt.NDArray[Any], i: int) -> None:
    """Compiled: start loading the cache line of ``a[i]`` for writing. Here: nothing."""


def prefetch_read(a: npt.NDArray[Any], i: int) -> None:
    """Compiled: start loading the cache line of ``a[i]`` for reading. Here: nothing."""


@functools.cache
def register_intrinsics() -> None:
    """Make the functions above compile to their instructions (once per process; needs numba)."""
    from numba.core import cgutils, types
    from numba.extending import intrinsic, overload

    # llvmlite (numba's LLVM binding) has no type information: its names are Any here.
    ir: Any = importlib.import_module("llvmlite.ir")
    f32, i32 = ir.FloatType(), ir.IntType(32)
    i8p = ir.IntType(8).as_pointer()

    def fused(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            fnty = ir.FunctionType(f32, [f32] * 3)
            return builder.call(builder.module.declare_intrinsic("llvm.fma", [f32], fnty), args)

        return types.float32(types.float32, types.float32, types.float32), codegen

    def prefetch(write: int) -> Any:
        def typed(typingctx: Any, arr: Any, index: Any) -> Any:
            def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
                aryty, idxty = signature.args
                ary = context.make_array(aryty)(context, builder, args[0])
                idx = context.cast(builder, args[1], idxty, types.intp)
                ptr = cgutils.get_item_pointer(  # type: ignore[no-untyped-call]
                    context, builder, aryty, ary, [idx], wraparound=False
                )
                fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
                fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p], fnty)
                # (address, 0 read / 1 write, locality 3: keep in every level, 1: data cache)
                builder.call(fn, [builder.bitcast(ptr, i8p), i32(write), i32(3), i32(1)])
                return context.get_dummy_value()

            return types.void(arr, index), codegen

        return intrinsic(typed)

    fma: Any = intrinsic(fused)
    write, read = prefetch(1), prefetch(0)
    overload(fma32)(lambda a, b, c: lambda a, b, c: fma(a, b, c))
    overload(prefetch_write)(lambda a, i: lambda a, i: write(a, i))
    overload(prefetch_read)(lambda a, i: lambda a, i: read(a, i))
