"""Whether ``--dense-precision bf16`` can be fast on this machine."""

from __future__ import annotations

from pathlib import Path

#: CPU flags (Linux ``/proc/cpuinfo``) of units that multiply bf16 matrices natively.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_bf16_units(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """True when the CPU lists AMX-BF16 or AVX512-BF16; None when it cannot be told (no cpuinfo)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            flags.update(value.split())
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def bf16_warning(device_type: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The line to print before a bf16 run that will be slow, or None."""
    if device_type != "cpu" or cpu_has_bf16_units(cpuinfo) is not False:
        return None
    return (
        "warning: --dense-precision bf16 on a CPU without AMX-BF16 or AVX512-BF16 (none of "
        f"{', '.join(BF16_CPU_FLAGS)} in {cpuinfo}): bf16 matrix products are emulated and slower"
        " than fp32"
    )
