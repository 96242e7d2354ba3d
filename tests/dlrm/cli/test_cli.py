"""The ``dlrm`` command line through click's CliRunner: the landing page, options from the command
line, the environment and ``--config``, and one-line errors for a user's mistakes."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from shardrec_dlrm.cli import main

SAMPLE = Path(__file__).resolve().parents[3] / "tests" / "data" / "criteo_sample"


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=env)
    return result.exit_code, result.output


def assert_one_line_error(code: int, output: str, *fragments: str) -> None:
    assert code != 0
    assert "Traceback" not in output
    error_lines = [line for line in output.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1, output
    for fragment in fragments:
        assert fragment in error_lines[0], output


def test_landing_page_lists_commands_and_examples() -> None:
    code, output = invoke("--help")
    assert code == 0
    for command in ("train", "evaluate", "plan", "plugins", "preprocess", "synth"):
        assert command in output
    assert "dlrm train --data" in output
    assert "torchrun --nproc-per-node" in output


def test_train_help_names_every_option_of_the_issue() -> None:
    code, output = invoke("train", "--help")
    assert code == 0
    for option in (
        "--data", "--batch-size", "--epochs", "--limit-train-batches", "--validation-freq",
        "--seed", "--embedding-dim", "--num-embeddings", "--num-embeddings-per-feature",
        "--dense-arch-layer-sizes", "--over-arch-layer-sizes", "--interaction-type",
        "--dcn-num-layers", "--dcn-low-rank-dim", "--optimizer", "--learning-rate",
        "--lr-warmup-steps", "--lr-decay-start", "--lr-decay-steps", "--sharding", "--logdir",
        "--checkpoint-dir", "--checkpoint-every", "--resume", "--quiet", "--config", "--nproc",
    ):  # fmt: skip
        assert option in output, option


def test_dense_arch_must_end_with_the_embedding_dim(tmp_path: Path) -> None:
    code, output = invoke(
        "train", "--data", str(tmp_path), "--embedding-dim", "8", "--dense-arch-layer-sizes", "16,4"
    )
    assert_one_line_error(code, output, "embedding dimension 8")


def test_a_list_option_with_a_non_integer_names_it(tmp_path: Path) -> None:
    code, output = invoke("train", "--data", str(tmp_path), "--over-arch-layer-sizes", "8,x,1")
    assert_one_line_error(code, output, "--over-arch-layer-sizes", "'x'")


def test_per_feature_sizes_need_26_numbers(tmp_path: Path) -> None:
    code, output = invoke("train", "--data", str(tmp_path), "--num-embeddings-per-feature", "5,5")
    assert_one_line_error(code, output, "26")


def test_resume_without_a_checkpoint_dir_is_a_usage_error(tmp_path: Path) -> None:
    code, output = invoke("train", "--data", str(tmp_path), "--resume")
    assert_one_line_error(code, output, "checkpoint_dir")


def test_missing_data_path_is_one_line(tmp_path: Path) -> None:
    code, output = invoke("train", "--data", str(tmp_path / "nope"))
    assert_one_line_error(code, output, "nope")


def test_config_file_then_environment_then_command_line(tmp_path: Path) -> None:
    """Precedence, seen through the dense-arch check that quotes the embedding dim in force."""
    config = tmp_path / "run.toml"
    config.write_text('[train]\nembedding-dim = 8\ndense_arch_layer_sizes = "16,4"\n')
    args = ("train", "--config", str(config), "--data", str(tmp_path))
    assert_one_line_error(*invoke(*args), "embedding dimension 8")
    env = {"DLRM_TRAIN_EMBEDDING_DIM": "12"}
    assert_one_line_error(*invoke(*args, env=env), "embedding dimension 12")
    assert_one_line_error(
        *invoke(*args, "--embedding-dim", "20", env=env), "embedding dimension 20"
    )


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("batch_sise = 3\n", "unknown setting 'batch_sise'"),
        ("batch_size = \n", "run.toml"),
    ],
)
def test_bad_config_files_are_named(tmp_path: Path, content: str, fragment: str) -> None:
    config = tmp_path / "run.toml"
    config.write_text(content)
    code, output = invoke("train", "--config", str(config), "--data", str(tmp_path))
    assert_one_line_error(code, output, fragment)


def test_plan_of_the_mlperf_tables_on_64_ranks_needs_no_hardware() -> None:
    code, output = invoke(
        "plan", "--world-size", "64", "--embedding-dim", "128", "--num-embeddings", "40000000",
        "--optimizer", "rowwise_adagrad", "--hbm-gib", "80",
    )  # fmt: skip
    assert code == 0, output
    assert "64 ranks" in output
    for table in ("t_cat_0", "t_cat_25"):
        assert table in output
    assert "why" in output


def test_plan_puts_each_table_row_wise_on_one_host_when_asked() -> None:
    code, output = invoke(
        "plan", "--world-size", "4", "--local-world-size", "2", "--sharding", "table_row_wise",
        "--num-embeddings", "100000", "--embedding-dim", "16",
    )  # fmt: skip
    assert code == 0, output
    rows = [line.split() for line in output.splitlines() if line.startswith("model.")]
    assert len(rows) == 26
    for row in rows:
        assert row[1] == "table_row_wise", row
        assert row[3] in ("0,1", "2,3"), f"{row[0]} spans hosts: ranks {row[3]}"


def test_plan_that_cannot_fit_names_the_table() -> None:
    code, output = invoke(
        "plan", "--world-size", "1", "--num-embeddings", "40000000", "--embedding-dim", "128",
        "--hbm-gib", "1",
    )  # fmt: skip
    assert_one_line_error(code, output, "t_cat_")


def test_plugins_lists_the_builtin_sharders() -> None:
    code, output = invoke("plugins")
    assert code == 0, output
    assert "shardrec-sharders" in output
    for sharding in ("table_wise", "row_wise", "column_wise", "data_parallel"):
        assert sharding in output


def assert_usage_error(code: int, output: str, *fragments: str) -> None:
    """A click usage error: exit status 2, one ``Error:`` line naming what is wrong."""
    assert code == 2, output
    assert_one_line_error(code, output, *fragments)


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "0.0", "1e-x"])
def test_learning_rate_must_be_a_positive_number(value: str) -> None:
    code, output = invoke("train", "--data", str(SAMPLE), "--learning-rate", value)
    assert_usage_error(code, output, "--learning-rate", value)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--eps", "nan"),
        ("--eps", "-1e-8"),
        ("--val-fraction", "nan"),
        ("--test-fraction", "1"),
        ("--seed", "-1"),
        ("--batch-size", "0"),
        ("--epochs", "0"),
        ("--keep-checkpoints", "0"),
        ("--embedding-dim", "0"),
    ],
)
def test_train_options_out_of_range_are_usage_errors(option: str, value: str) -> None:
    code, output = invoke("train", "--data", str(SAMPLE), option, value)
    assert_usage_error(code, output, option)


def test_a_schedule_that_decays_before_warming_up_is_a_usage_error() -> None:
    code, output = invoke(
        "train", "--data", str(SAMPLE), "--lr-warmup-steps", "4", "--lr-decay-start", "2",
        "--lr-decay-steps", "3",
    )  # fmt: skip
    assert_usage_error(code, output, "decay_start (2)")


@pytest.mark.parametrize("option", ["--logdir", "--checkpoint-dir"])
def test_output_directories_that_cannot_be_directories_are_usage_errors(
    tmp_path: Path, option: str
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, output = invoke("train", "--data", str(SAMPLE), option, str(blocker))
    assert_usage_error(code, output, option, "not a directory")
    code, output = invoke("train", "--data", str(SAMPLE), option, str(blocker / "sub" / "dir"))
    assert_usage_error(code, output, option, f"lies under {blocker}")


def test_resume_and_overwrite_together_are_a_usage_error(tmp_path: Path) -> None:
    code, output = invoke(
        "train", "--data", str(SAMPLE), "--checkpoint-dir", str(tmp_path), "--resume", "--overwrite"
    )
    assert_usage_error(code, output, "choose one")
    code, output = invoke("train", "--data", str(SAMPLE), "--overwrite")
    assert_usage_error(code, output, "overwrite needs a checkpoint_dir")


def test_a_config_file_that_is_a_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "run.toml"
    os.mkfifo(fifo)
    code, output = invoke("train", "--config", str(fifo), "--data", str(SAMPLE))
    assert_usage_error(code, output, "not a regular file")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--checkpoint", "nope/"], "--checkpoint"),
        (["--data", "nope/"], "--data"),
        (["--batch-size", "0"], "--batch-size"),
        (["--val-fraction", "nan"], "--val-fraction"),
        (["--limit-batches", "-3"], "--limit-batches"),
        (["--split", "train"], "--split"),
    ],
)
def test_evaluate_mistakes_are_usage_errors(tmp_path: Path, args: list[str], fragment: str) -> None:
    defaults = {"--checkpoint": str(tmp_path), "--data": str(SAMPLE)}
    given = dict(zip(args[::2], args[1::2], strict=True))
    merged = [item for pair in {**defaults, **given}.items() for item in pair]
    code, output = invoke("evaluate", *merged)
    assert_usage_error(code, output, fragment)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--world-size", "0"),
        ("--embedding-dim", "-4"),
        ("--over-arch-layer-sizes", "4,2"),
        ("--hbm-gib", "nan"),
        ("--hbm-gib", "0"),
        ("--ddr-gib", "inf"),
    ],
)
def test_plan_mistakes_are_usage_errors(option: str, value: str) -> None:
    code, output = invoke("plan", "--world-size", "2", option, value)
    assert_usage_error(
        code, output, option if option != "--over-arch-layer-sizes" else "end with 1"
    )
