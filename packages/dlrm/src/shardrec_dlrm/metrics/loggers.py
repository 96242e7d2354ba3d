"""Where training metrics go: a two-method interface, TensorBoard, and nothing (ranks other than
0)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


class MetricLogger(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_text(self, tag: str, text: str, step: int = 0) -> None: ...

    def flush(self) -> None:
        """Puts everything logged so far on disk."""

    def close(self) -> None: ...


class NullLogger:
    """Drops everything: what ranks other than 0, and runs without ``--logdir``, use."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Scalars (``train/loss``, ``val/auc``...) and text (config, plan) as TensorBoard event
    files.

    ``purge_from``: the first step this logger will write (1 for a new run; ``N + 1`` for a run
    resumed from the checkpoint of step ``N``). Points that earlier runs logged into ``logdir`` at
    that step or later (an interrupted run's, past the checkpoint being resumed) are dropped by
    TensorBoard and every reader of event files that honours restarts, so each step keeps one
    point, this run's, in order. The older event files stay on disk.
    """

    def __init__(self, logdir: str | Path, *, purge_from: int | None = None) -> None:
        # Imported here: tensorboard is slow to import and most commands never log.
        from torch.utils.tensorboard import SummaryWriter

        self._writer: SummaryWriter = SummaryWriter(log_dir=str(logdir), purge_step=purge_from)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        # Markdown: indent by four spaces so that tables and plans keep their alignment.
        lines = "\n".join("    " + line for line in text.splitlines())
        self._writer.add_text(tag, lines, global_step=step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()
