"""The training loop of ``dlrm train``: build, shard, train, validate, test, checkpoint.

One function, :func:`train`, runs on every rank; rank 0 alone writes TensorBoard events, draws the
progress bar and prints the summary. Everything collective (forward, metrics, checkpoints) is called
by all ranks in the same order.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from shardrec.distributed.train_pipeline import (
    TrainPipeline,
    TrainPipelineBase,
    TrainPipelineSparseDist,
)
from shardrec_dlrm.data import DataError
from shardrec_dlrm.data.synth import find_synth_info
from shardrec_dlrm.errors import UserError
from shardrec_dlrm.metrics.loggers import MetricLogger, NullLogger, TensorBoardLogger
from shardrec_dlrm.metrics.progress import Progress
from shardrec_dlrm.training.checkpointing import (
    prepare_checkpoint_dir,
    resume_step,
    save_checkpoint,
)
from shardrec_dlrm.training.config import TrainConfig
from shardrec_dlrm.training.evaluate import evaluate_batches
from shardrec_dlrm.training.managed_metrics import ManagedWatch
from shardrec_dlrm.training.parallel import ParallelState
from shardrec_dlrm.training.precision import bf16_warning
from shardrec_dlrm.training.run_data import Batch, RunData, open_run_data
from shardrec_dlrm.training.run_record import RunFacts, train_sample_digest
from shardrec_dlrm.training.schedule import LRSchedule
from shardrec_dlrm.training.sharding import ShardedRun, shard_model

__all__ = ["train"]


def train(config: TrainConfig) -> dict[str, float]:
    """Trains as configured and returns the final metrics (``val/auc``, ``test/auc``, ...)."""
    try:
        state = ParallelState.init(config.device)
    except ValueError as error:
        raise UserError(str(error)) from error
    try:
        return _Trainer(config, state).run()
    finally:
        state.close()


class _Trainer:
    def __init__(self, config: TrainConfig, state: ParallelState) -> None:
        self.config = config
        self.state = state
        self.logger: MetricLogger = NullLogger()
        torch.manual_seed(config.seed)
        self.data: RunData = open_run_data(config, state)
        # Checked before the checkpoint directory is claimed: a run that cannot take one step
        # leaves nothing behind.
        self.steps_per_epoch = self.data.train_steps(config.limit_train_batches)
        self.run_state: ShardedRun = shard_model(config, state)
        self.schedule = LRSchedule(
            base_lr=config.learning_rate,
            warmup_steps=config.lr_warmup_steps,
            decay_start=config.lr_decay_start,
            decay_steps=config.lr_decay_steps,
        )
        self.step = 0
        self.step_samples = 0
        #: Losses of the steps not yet read, on the device (read every --log-every steps).
        self.losses: list[torch.Tensor] = []
        self.managed = ManagedWatch()  # managed tables' counters, logged with the losses
        # Pipelined or not, a step trains the same weights: the pipeline only distributes the
        # next batch's ids earlier (so a resumed run may use either).
        loop = TrainPipelineSparseDist if config.pipeline else TrainPipelineBase
        self.pipeline: TrainPipeline[tuple[torch.Tensor, int]] = loop(
            self.run_state.model, self.run_state.dense_optimizer, state.device, forward=_step
        )

    def run(self) -> dict[str, float]:
        try:
            self._start()
            return self._train_and_test()
        finally:
            self.logger.close()

    def _start(self) -> None:
        """Claims or checks the checkpoint directory, loads the checkpoint to resume from, then
        opens the logger at the step training goes on from."""
        config, state = self.config, self.state
        if config.checkpoint_dir is not None:
            data = self.data
            state.decide_on_main(lambda: prepare_checkpoint_dir(config, run_facts(data, state)))
        if config.resume:
            self.step = resume_step(self.run_state, config, state)
            if self.step and state.is_main and not config.quiet:
                print(f"resuming from step {self.step} of {config.checkpoint_dir}", flush=True)
        if config.dense_precision == "bf16" and state.is_main:
            warning = bf16_warning(state.device.type)
            if warning is not None:
                print(warning, file=sys.stderr, flush=True)
        if state.is_main and config.logdir is not None:
            # Whatever an earlier run logged after the step this one starts from is hidden, so
            # that each step shows one point: this run's.
            self.logger = TensorBoardLogger(config.logdir, purge_from=self.step + 1)
        self.logger.log_text("config", config.to_json(), self.step)
        self.logger.log_text("sharding_plan", self.run_state.plan_text, self.step)

    def _train_and_test(self) -> dict[str, float]:
        config, state = self.config, self.state
        steps_per_epoch = self.steps_per_epoch
        total = steps_per_epoch * config.epochs
        progress = Progress(
            total=total,
            initial=self.step,
            enabled=state.is_main and not config.quiet,
            description="train",
        )
        results: dict[str, float] = {}
        validated_at = saved_at = -1
        try:
            while self.step < total:
                epoch, offset = divmod(self.step, steps_per_epoch)
                batches = self.data.train_batches(epoch, start=offset, stop=steps_per_epoch)
                while True:
                    try:
                        self._train_step(batches)
                    except StopIteration:
                        break
                    self.step += 1
                    progress.step(self.step_samples * state.world_size)
                    validate = _every(config.validation_freq, self.step)
                    save = _every(config.checkpoint_every, self.step)
                    if validate or save or self.step % config.log_every == 0:
                        self._read_losses(progress, epoch)
                    if validate:
                        results.update(self._validate(progress))
                        validated_at = self.step
                        progress.pause_rate()
                    if save:
                        self._checkpoint()
                        saved_at = self.step
                        progress.pause_rate()
            self._read_losses(progress, (self.step - 1) // steps_per_epoch)
        finally:
            progress.close()
        if validated_at != self.step:
            results.update(self._validate(progress))
        test = evaluate_batches(
            self.run_state.model,
            self.data.test_batches(),
            state.device,
            limit=config.limit_test_batches,
            samples=self.data.test.num_rows,
        )
        results.update({f"test/{name}": value for name, value in test.items()})
        self.logger.log({f"test/{name}": value for name, value in test.items()}, self.step)
        if config.checkpoint_dir is not None and saved_at != self.step:
            self._checkpoint()
        if state.is_main:
            print(format_summary(results, self.step, planted_optimum(config.data)), flush=True)
        return results

    def _checkpoint(self) -> None:
        # Logged points first: once step-N exists, every point up to step N is on disk, so a run
        # killed after it and resumed from it shows each step once, with no gap.
        self.logger.flush()
        save_checkpoint(self.run_state, self.config, self.state, self.step)

    def _train_step(self, batches: Iterator[Batch]) -> None:
        """One step on the next batch of ``batches`` (StopIteration when there is none); keeps its
        loss on the device and sets ``step_samples``."""
        self.run_state.set_lr(self.schedule.lr(self.step))
        loss, self.step_samples = self.pipeline.progress(batches)
        self.losses.append(loss)

    def _read_losses(self, progress: Progress, epoch: int) -> None:
        """Reads the losses of the steps since the last read, in one copy from the device (the
        loop's only host synchronisation besides validation and checkpoints), and logs them, each
        at its own step, with the samples/s of those steps."""
        if not self.losses:
            return
        values: list[float] = torch.stack(self.losses).tolist()
        self.losses.clear()
        first = self.step - len(values) + 1
        for step, value in enumerate(values, start=first):
            if not math.isfinite(value):
                raise UserError(
                    f"the training loss became {value} at step {step}: lower --learning-rate"
                )
            self.logger.log({"train/loss": value, "train/lr": self.schedule.lr(step - 1)}, step)
        rate = progress.samples_per_s()
        self.logger.log({"train/samples_per_s": rate}, self.step)
        managed, warnings = self.managed.read(self.run_state.model)
        if managed:
            self.logger.log(managed, self.step)
        for line in warnings if self.state.is_main else []:
            print(f"warning: {line}", file=sys.stderr, flush=True)  # also with --quiet
        progress.show(loss=values[-1], samples_per_s=rate, epoch=epoch)

    def _validate(self, progress: Progress) -> dict[str, float]:
        started = time.perf_counter()
        metrics = evaluate_batches(
            self.run_state.model,
            self.data.val_batches(),
            self.state.device,
            limit=self.config.limit_val_batches,
            samples=self.data.val.num_rows,
        )
        tagged = {f"val/{name}": value for name, value in metrics.items()}
        self.logger.log(tagged, self.step)
        progress.write(
            f"step {self.step}: "
            + " ".join(f"{name}={value:.5f}" for name, value in tagged.items())
            + f" ({time.perf_counter() - started:.1f}s)"
        )
        return tagged


def _every(steps: int | None, step: int) -> bool:
    return steps is not None and step % steps == 0


def _step(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, int]]:
    """One training forward: the loss, and what the loop reads of it (loss, samples)."""
    loss, _ = model(batch.dense_features, batch.sparse_features, batch.labels)
    return loss, (loss.detach(), batch.labels.numel())


def run_facts(data: RunData, state: ParallelState) -> RunFacts:
    return RunFacts(
        world_size=state.world_size,
        data_path=str(Path(data.dataset.path).resolve()),
        train_segments=tuple((s.part, s.start, s.stop) for s in data.train.segments),
        train_sample=train_sample_digest(data.train),
    )


def format_summary(
    results: Mapping[str, float], step: int, optimum: Mapping[str, float] | None = None
) -> str:
    """The final lines of a run: one line per split; last, on data from ``dlrm synth``, the test
    AUC beside the best AUC any model can reach on that data."""
    lines = [f"finished after {step} steps"]
    for split in ("val", "test"):
        names = [name for name in results if name.startswith(f"{split}/")]
        if names:
            lines.append(
                f"{split}: "
                + "  ".join(f"{name.split('/', 1)[1]}={results[name]:.5f}" for name in names)
            )
    if optimum is not None and "test" in optimum and "test/auc" in results:
        best, got = optimum["test"], results["test/auc"]
        lines.append(
            f"test AUC {got:.4f} vs planted optimum {best:.4f} (dlrm synth): gap {best - got:+.4f}"
        )
    return "\n".join(lines)


def planted_optimum(data: str) -> dict[str, float] | None:
    """The Bayes-optimal AUC per split that ``dlrm synth`` recorded beside the data, if any.

    The record is read as any dataset file is (a small regular file); one that cannot be trusted
    costs only this line of the summary, with a warning, never the run's results.
    """
    try:
        info = find_synth_info(data)
    except DataError as error:
        print(f"warning: no planted optimum: {error}", file=sys.stderr, flush=True)
        return None
    if info is None:
        return None
    return {"val": info.val.auc, "test": info.test.auc}
