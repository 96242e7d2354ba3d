"""``dlrm plan`` prints the planner's per-rank figures, with the pooling factors it is given."""

from __future__ import annotations

from click.testing import CliRunner

from shardrec_dlrm.cli import main

MLPERF_POOLING = "3,2,1,2,6,1,1,1,1,7,3,8,1,6,9,5,1,1,1,12,100,27,10,3,1,1"


def plan(*args: str) -> tuple[int, str]:
    base = ["plan", "--world-size", "16", "--local-world-size", "8", "--embedding-dim", "128"]
    result = CliRunner().invoke(main, [*base, "--num-embeddings", "4000000", *args])
    return result.exit_code, result.output


def test_plan_shows_per_rank_reads_bytes_sent_and_the_step() -> None:
    code, output = plan("--optimizer", "rowwise_adagrad", "--pooling-factors", MLPERF_POOLING)
    assert code == 0, output
    assert "estimated step:" in output
    header = next(line for line in output.splitlines() if line.startswith("rank "))
    for column in ("read (GB)", "sent intra (MB)", "sent inter (MB)", "step (ms)"):
        assert column in header
    assert "why:" in output


def test_pooling_factors_change_the_plan_and_a_wrong_count_is_named() -> None:
    _, one_hot = plan("--pooling-factors", "1")
    _, multi_hot = plan("--pooling-factors", MLPERF_POOLING)
    step = [
        line
        for output in (one_hot, multi_hot)
        for line in output.splitlines()
        if line.startswith("estimated step:")
    ]
    assert len(step) == 2
    assert step[0] != step[1]
    code, output = plan("--pooling-factors", "1,2,3")
    assert code != 0
    assert "one per table (26), got 3" in output
