"""Bad input to `loopus finetune` / `loopus eval`: one line `error: ...`, exit code 2, no traceback."""

from __future__ import annotations

from tests.train.conftest import tiny_args


def _one_line_error(result, *fragments):
    code, stdout, stderr = result
    assert code == 2, (stdout, stderr)
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_missing_data(cli, looped_tiny, tmp_path):
    _one_line_error(
        cli(*tiny_args(looped_tiny, tmp_path / "nope.txt", tmp_path / "out")),
        "--data",
        "nope.txt",
        "does not exist",
    )
    assert not (tmp_path / "out").exists()


def test_empty_data(cli, looped_tiny, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    _one_line_error(cli(*tiny_args(looped_tiny, tmp_path / "empty.txt", tmp_path / "out")), "holds no text")


def test_data_shorter_than_one_block(cli, looped_tiny, tmp_path):
    (tmp_path / "short.txt").write_text("The quick brown fox.")
    _one_line_error(
        cli(*tiny_args(looped_tiny, tmp_path / "short.txt", tmp_path / "out", block_size=256)),
        "gives 0 block(s) of 256 tokens",
        "--block-size",
    )


def test_checkpoint_that_is_not_a_looped_model(cli, tiny_llama_dir, train_text, tmp_path):
    _one_line_error(
        cli(*tiny_args(tiny_llama_dir, train_text, tmp_path / "out")), "is not a looped checkpoint"
    )
    _one_line_error(cli("eval", tiny_llama_dir, "--data", train_text), "is not a looped checkpoint")


def test_more_supervised_steps_than_loop_steps(cli, looped_tiny, train_text, tmp_path):
    _one_line_error(
        cli(*tiny_args(looped_tiny, train_text, tmp_path / "out", loop_steps=3, supervised=4)),
        "--supervised 4 is greater than --loop-steps 3",
    )


def test_resume_with_nothing_to_resume(cli, looped_tiny, train_text, tmp_path):
    _one_line_error(
        cli(*tiny_args(looped_tiny, train_text, tmp_path / "out", resume=True)),
        "--resume",
        "no training run to resume",
    )


def test_output_directory_holding_another_run(cli, looped_tiny, train_text, tmp_path):
    out = tmp_path / "out"
    code, _, stderr = cli(*tiny_args(looped_tiny, train_text, out, steps=1, save_every=1))
    assert code == 0, stderr
    _one_line_error(
        cli(*tiny_args(looped_tiny, train_text, out, steps=1, lr=5e-4)), "holds another run", "lr"
    )
    _one_line_error(
        cli(*tiny_args(looped_tiny, train_text, out, steps=1, lr=5e-4, resume=True)),
        "holds another run",
        "lr",
    )
    _one_line_error(cli(*tiny_args(looped_tiny, train_text, out, steps=1)), "pass --resume to continue it")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    _one_line_error(cli(*tiny_args(looped_tiny, train_text, tmp_path / "other")), "holds no loopus run")


def test_dataset_name_without_the_datasets_library_or_hub(cli, looped_tiny, tmp_path):
    line = _one_line_error(cli(*tiny_args(looped_tiny, "some-org/some-dataset", tmp_path / "out")),
                           "--data some-org/some-dataset")
    assert "datasets" in line and ("not installed" in line or "cannot load it as a dataset" in line)
