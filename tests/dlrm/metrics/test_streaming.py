"""Streaming metrics: a per-class histogram of probabilities instead of every score."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from shardrec_dlrm.metrics import (
    METRIC_NAMES,
    BinaryMetrics,
    StreamingBinaryMetrics,
    binary_auc,
    histogram_auc,
)


def _sample(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.25).astype(np.float32)
    logits = (rng.normal(0, 1.5, n) + 1.2 * labels - 1.0).astype(np.float32)
    return torch.from_numpy(logits), torch.from_numpy(labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_is_within_its_bound_of_the_exact_sort_based_auc(seed: int) -> None:
    logits, labels = _sample(seed, 50_000)
    streaming = StreamingBinaryMetrics()
    for lo in range(0, 50_000, 4096):  # batch by batch, as an evaluation pass feeds it
        streaming.update(logits[lo : lo + 4096], labels[lo : lo + 4096])
    got = streaming.compute()
    exact = binary_auc(logits, labels)
    assert abs(got["auc"] - exact) <= got["auc_error_bound"]
    assert got["auc_error_bound"] < 1e-4  # 2**20 bins: few pairs share one
    whole = BinaryMetrics()
    whole.update(logits, labels)
    want = whole.compute()
    for name in METRIC_NAMES:
        if name != "auc":
            assert got[name] == pytest.approx(want[name], rel=1e-9, abs=1e-12), name


def test_auc_is_exact_for_scores_quantised_to_the_bins() -> None:
    bins = 64
    rng = np.random.default_rng(3)
    k = rng.integers(0, bins, 5000)
    labels = torch.from_numpy((rng.random(5000) < k / bins).astype(np.float32))
    p = (k + 0.5) / bins  # one score per bin, many ties
    logits = torch.from_numpy(np.log(p / (1 - p)))
    streaming = StreamingBinaryMetrics(bins=bins)
    streaming.update(logits, labels)
    got = streaming.compute()
    assert got["auc"] == pytest.approx(binary_auc(logits, labels), abs=1e-12)
    assert got["auc_error_bound"] > 0  # the bound is not tight here: ties are exact


def test_histogram_auc_by_hand() -> None:
    # bins low..high; positives [0, 1, 2], negatives [2, 1, 0]:
    # wins = 1 * (2 + 0.5) + 2 * (3 + 0) = 8.5 of 3 * 3 pairs
    auc, bound = histogram_auc(torch.tensor([0, 1, 2]), torch.tensor([2, 1, 0]))
    assert auc == pytest.approx(8.5 / 9)
    assert bound == pytest.approx(0.5 * 1 / 9)
    assert np.isnan(histogram_auc(torch.tensor([0, 0]), torch.tensor([1, 2]))[0])


def test_memory_does_not_grow_and_bad_input_is_refused() -> None:
    m = StreamingBinaryMetrics(bins=1024)
    for seed in range(5):
        m.update(*_sample(seed, 10_000))
    assert m._counts.numel() == 2 * 1024 + 3
    with pytest.raises(ValueError, match="3 logits for 2 labels"):
        m.update(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="bins must be >= 1"):
        StreamingBinaryMetrics(bins=0)
    assert np.isnan(StreamingBinaryMetrics(bins=8).compute()["auc"])


_TWO_RANKS = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch, torch.distributed as dist, torch.multiprocessing as mp
    from shardrec_dlrm.metrics import StreamingBinaryMetrics

    def work(rank, store_path, out_path):
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
        rng = np.random.default_rng(7)
        logits = rng.normal(0, 1, 3001).astype(np.float32)
        labels = (rng.random(3001) < 0.3).astype(np.float32)
        part = slice(0, 1200) if rank == 0 else slice(1200, None)  # uneven shares
        metrics = StreamingBinaryMetrics(bins=4096)
        metrics.update(torch.from_numpy(logits[part]), torch.from_numpy(labels[part]))
        got = metrics.compute()
        whole = StreamingBinaryMetrics(bins=4096)
        whole.update(torch.from_numpy(logits), torch.from_numpy(labels))
        dist.destroy_process_group()
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({"ranks": got, "whole": whole.compute()}, f)

    if __name__ == "__main__":
        mp.spawn(work, args=(sys.argv[1], sys.argv[2]), nprocs=2)
    """
)


@pytest.mark.multiprocess
def test_histograms_merged_across_two_ranks_equal_one_rank_of_all_samples(tmp_path: Path) -> None:
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    out = tmp_path / "out.json"
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "store"), str(out)], check=True, timeout=300
    )
    result = json.loads(out.read_text())
    assert result["ranks"]["auc"] == result["whole"]["auc"]  # integer counts: bit-equal
    for name, value in result["whole"].items():
        assert result["ranks"][name] == pytest.approx(value, rel=1e-9), name


def test_training_keeps_histograms_above_the_exact_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    import shardrec_dlrm.metrics.binary
    from shardrec_dlrm.cli import main

    sample = Path(__file__).resolve().parents[2] / "data" / "criteo_sample" / "criteo_sample.txt"
    tiny = ["--embedding-dim", "4", "--num-embeddings", "64", "--dense-arch-layer-sizes", "8,4",
            "--over-arch-layer-sizes", "8,1", "--val-fraction", "0.2", "--test-fraction", "0.2",
            "--device", "cpu", "--batch-size", "16", "--quiet"]  # fmt: skip
    exact = CliRunner().invoke(main, ["train", "--data", str(sample), *tiny])
    assert exact.exit_code == 0, exact.output
    assert "auc_error_bound" not in exact.output
    monkeypatch.setattr(shardrec_dlrm.metrics.binary, "EXACT_AUC_MAX_SAMPLES", 10)
    streamed = CliRunner().invoke(main, ["train", "--data", str(sample), *tiny])
    assert streamed.exit_code == 0, streamed.output
    for split in ("val", "test"):
        line = next(x for x in streamed.output.splitlines() if x.startswith(f"{split}:"))
        got = dict(kv.split("=") for kv in line.split(": ", 1)[1].split())
        want_line = next(x for x in exact.output.splitlines() if x.startswith(f"{split}:"))
        want = dict(kv.split("=") for kv in want_line.split(": ", 1)[1].split())
        # same run, same scores: the histogram AUC is within its bound of the exact one
        assert abs(float(got["auc"]) - float(want["auc"])) <= float(got["auc_error_bound"]) + 1e-5
        assert got["log_loss"] == want["log_loss"]
