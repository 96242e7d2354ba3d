"""The progress bar of rank 0: steps, samples/s and the running loss."""

from __future__ import annotations

import importlib
import time
from typing import Any


class Progress:
    """A tqdm bar on rank 0 (or nothing), plus the samples/s of the last stretch of steps."""

    def __init__(self, *, total: int | None, initial: int, enabled: bool, description: str) -> None:
        self._bar: Any = None
        if enabled:
            # Through importlib: tqdm ships no type information, and the bar is used as Any anyway.
            tqdm = importlib.import_module("tqdm").tqdm
            self._bar = tqdm(
                total=total, initial=initial, desc=description, unit="step", dynamic_ncols=True
            )
        self._last_time = time.perf_counter()
        self._samples = 0

    def step(self, samples: int) -> None:
        self._samples += samples
        if self._bar is not None:
            self._bar.update(1)

    def samples_per_s(self) -> float:
        """Samples/s since the previous call (the throughput logged with each training step)."""
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        rate = self._samples / elapsed
        self._last_time = now
        self._samples = 0
        return rate

    def pause_rate(self) -> None:
        """Starts the next samples/s stretch now, so time spent elsewhere does not count."""
        self._last_time = time.perf_counter()
        self._samples = 0

    def show(self, **values: float) -> None:
        if self._bar is not None:
            shown = {k: f"{v:,.0f}" if v >= 1000 else f"{v:.4g}" for k, v in values.items()}
            self._bar.set_postfix(shown, refresh=False)

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
