"""Running the trainer in this process, or in N local processes through torch's elastic launcher
(the machinery behind torchrun), as ``dlrm train --nproc N``."""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass

import click

from shardrec_dlrm.training.config import TrainConfig


@dataclass(frozen=True, slots=True)
class _Failure:
    """What a worker returns instead of raising for a user's mistake: its one-line message."""

    message: str


def run_training(config: TrainConfig, *, nproc: int = 1) -> dict[str, float]:
    """Trains in this process (alone, or as one rank under torchrun), or launches ``nproc`` ranks.

    Returns rank 0's final metrics. A user's mistake (bad data, a missing checkpoint) becomes a
    :class:`click.ClickException` here, in the launching process.
    """
    outcome = _worker(config) if nproc == 1 else _launch(config, nproc)
    if isinstance(outcome, _Failure):
        raise click.ClickException(outcome.message)
    return outcome


def _worker(config: TrainConfig) -> dict[str, float] | _Failure:
    from shardrec_dlrm.errors import UserError
    from shardrec_dlrm.training.loop import train

    try:
        return train(config)
    except UserError as error:
        return _Failure(str(error))


def _launch(config: TrainConfig, nproc: int) -> dict[str, float] | _Failure:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    launch_config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"dlrm-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{_free_port()}",
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    try:
        results = elastic_launch(launch_config, _worker)(config)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        raise click.ClickException(
            f"rank {rank} failed (exit code {failure.exitcode}): {failure.message}"
        ) from error
    failures = [result for result in results.values() if isinstance(result, _Failure)]
    if failures:
        return failures[0]
    first: dict[str, float] | _Failure = results[0]
    return first


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
