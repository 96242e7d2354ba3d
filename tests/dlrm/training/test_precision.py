"""``--dense-precision bf16`` warns on CPUs that would emulate bf16."""

from __future__ import annotations

from pathlib import Path

from shardrec_dlrm.training.precision import bf16_warning, cpu_has_bf16_units


def cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {flags}\n\nprocessor\t: 1\n")
    return path


def test_amx_or_avx512_bf16_count_as_bf16_units(tmp_path: Path) -> None:
    assert cpu_has_bf16_units(cpuinfo(tmp_path, "avx512f amx_bf16 amx_tile")) is True
    assert cpu_has_bf16_units(cpuinfo(tmp_path, "avx512f avx512_bf16")) is True
    assert cpu_has_bf16_units(cpuinfo(tmp_path, "avx512f avx512_fp16")) is False
    assert cpu_has_bf16_units(tmp_path / "missing") is None


def test_warning_only_on_a_cpu_known_to_lack_bf16_units(tmp_path: Path) -> None:
    without = cpuinfo(tmp_path, "avx512f")
    warning = bf16_warning("cpu", without)
    assert warning is not None
    assert "slower than fp32" in warning
    assert str(without) in warning
    assert bf16_warning("cuda", without) is None
    assert bf16_warning("cpu", cpuinfo(tmp_path, "amx_bf16")) is None
    assert bf16_warning("cpu", tmp_path / "missing") is None
