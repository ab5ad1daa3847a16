"""The CLI's foundation commands (train, eval, tasks) and every way their input can be wrong.

Bad input must end with exit code 2 and exactly one line on stderr, never a
traceback, and must leave no half-written file behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from circuitir.cli import main
from circuitir.models.checkpoint import load_model, save_checkpoint
from circuitir.models.gpt import SparseGPT
from circuitir.models.tokenizer import ByteTokenizer
from circuitir.tasks import TASKS

from conftest import randomize_, tiny_config


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def leftover_parts(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".part")]


def assert_user_error(result, tmp_path: Path, *fragments: str) -> None:
    code, out, err = result
    assert code == 2, (code, err)
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("circuitir ") and ": error: " in err
    assert "Traceback" not in err and out == ""
    for fragment in fragments:
        assert fragment in err, err
    assert leftover_parts(tmp_path) == []


@pytest.fixture
def checkpoint(tmp_path):
    """A real circuitir checkpoint of a tiny random byte-level model."""
    def make(name: str = "model.pt", **config) -> Path:
        model = randomize_(SparseGPT(tiny_config(block_size=128, **config)), seed=0, scale=0.1)
        path = tmp_path / name
        save_checkpoint(path, model, ByteTokenizer(), step=0)
        return path
    return make


def openai_release(directory: Path, raw_config: dict, config_overrides: dict | None = None) -> Path:
    model = SparseGPT(tiny_config(**(config_overrides or {})))
    directory.mkdir()
    torch.save(model.state_dict(), directory / "final_model.pt")
    (directory / "beeg_config.json").write_text(json.dumps(raw_config))
    return directory


# ---------------------------------------------------------------- bad input

def test_missing_checkpoint(capsys, tmp_path):
    result = run_cli(capsys, "eval", tmp_path / "nope.pt", "--task", "quotes")
    assert_user_error(result, tmp_path, "no such checkpoint", "nope.pt")


def test_missing_release_weights(capsys, tmp_path):
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "beeg_config.json").write_text(json.dumps(tiny_config().to_dict()))
    result = run_cli(capsys, "eval", tmp_path / "release", "--task", "quotes")
    assert_user_error(result, tmp_path, "final_model.pt")


def test_corrupt_checkpoint_random_bytes(capsys, tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(os.urandom(4096))
    assert_user_error(run_cli(capsys, "eval", path, "--task", "quotes"), tmp_path, "cannot read checkpoint")


def test_corrupt_checkpoint_truncated(capsys, tmp_path, checkpoint):
    path = checkpoint()
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    assert_user_error(run_cli(capsys, "eval", path, "--task", "quotes"), tmp_path, "cannot read checkpoint")


def test_checkpoint_with_arbitrary_objects_is_not_unpickled(capsys, tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pt"
    torch.save({"format": "circuitir-checkpoint", "state_dict": Payload()}, path)
    assert_user_error(run_cli(capsys, "eval", path, "--task", "quotes"), tmp_path, "cannot read checkpoint")
    assert not marker.exists()


def test_checkpoint_without_config_or_weights(capsys, tmp_path, checkpoint):
    path = tmp_path / "hollow.pt"
    torch.save({"format": "circuitir-checkpoint", "version": 1}, path)
    assert_user_error(run_cli(capsys, "eval", path, "--task", "quotes"), tmp_path, "invalid model config")
    raw = torch.load(checkpoint(), weights_only=True)
    raw["state_dict"] = "weights"
    torch.save(raw, path)
    assert_user_error(run_cli(capsys, "eval", path, "--task", "quotes"), tmp_path, "no state dict")


def test_config_with_unknown_architecture_option(capsys, tmp_path):
    raw = {**tiny_config().to_dict(), "rotary": True, "dropout": 0.1, "flash": False}
    release = openai_release(tmp_path / "release", raw)
    assert_user_error(run_cli(capsys, "eval", release, "--task", "quotes"), tmp_path, "'rotary'")


def test_config_that_is_not_json(capsys, tmp_path):
    release = openai_release(tmp_path / "release", {})
    (release / "beeg_config.json").write_text('{"n_layer": 2,\n  "d_model": }')
    assert_user_error(run_cli(capsys, "eval", release, "--task", "quotes"), tmp_path,
                      "beeg_config.json:2:", "not valid JSON")


def test_config_that_does_not_fit_the_weights(capsys, tmp_path):
    release = openai_release(tmp_path / "release", tiny_config(d_model=12).to_dict())
    assert_user_error(run_cli(capsys, "eval", release, "--task", "quotes"), tmp_path, "does not fit its config")


def test_release_with_a_bpe_vocabulary_needs_its_tokenizer(capsys, tmp_path):
    release = openai_release(tmp_path / "release", tiny_config(vocab_size=2048).to_dict(),
                             dict(vocab_size=2048))
    assert_user_error(run_cli(capsys, "eval", release, "--task", "quotes"), tmp_path, "no tokenizer")


def test_unknown_task(capsys, tmp_path, checkpoint):
    result = run_cli(capsys, "eval", checkpoint(), "--task", "not_a_task")
    assert_user_error(result, tmp_path, "unknown task 'not_a_task'", "single_double_quote")


def test_prompt_longer_than_the_context(capsys, tmp_path):
    model = SparseGPT(tiny_config(block_size=8))
    path = tmp_path / "short.pt"
    save_checkpoint(path, model, ByteTokenizer())
    assert_user_error(run_cli(capsys, "eval", path, "--task", "brackets"), tmp_path,
                      "longer than the model's context of 8")


def test_train_on_a_corpus_without_python_files(capsys, tmp_path):
    corpus = tmp_path / "empty"
    corpus.mkdir()
    (corpus / "notes.txt").write_text("not python\n")
    out = tmp_path / "out.pt"
    result = run_cli(capsys, "train", "--preset", "tiny", "--corpus", corpus, "-o", out, "--quiet")
    assert_user_error(result, tmp_path, "no .py files")
    assert not out.exists()


def test_train_on_a_corpus_that_does_not_exist(capsys, tmp_path):
    out = tmp_path / "out.pt"
    result = run_cli(capsys, "train", "--preset", "tiny", "--corpus", tmp_path / "nowhere", "-o", out)
    assert_user_error(result, tmp_path, "not a directory")
    assert not out.exists()


@pytest.mark.parametrize("argv,fragment", [(["--preset", "huge"], "unknown preset 'huge'"),
                                           (["--preset", "tiny", "--density", "2"], "--density")])
def test_train_with_bad_options(capsys, tmp_path, argv, fragment):
    out = tmp_path / "out.pt"
    assert_user_error(run_cli(capsys, "train", *argv, "-o", out), tmp_path, fragment)
    assert not out.exists()


def test_user_errors_are_one_line_in_a_real_process(tmp_path):
    """No warning or traceback sneaks onto stderr outside pytest's capture either."""
    path = tmp_path / "random.pt"
    path.write_bytes(os.urandom(1024))
    proc = subprocess.run([sys.executable, "-m", "circuitir.cli", "eval", str(path), "--task", "quotes"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("circuitir eval: error: cannot read")


def test_closed_output_pipe_exits_quietly(tmp_path):
    """`circuitir tasks | head`: the reader leaves before we write; no traceback, no noise."""
    proc = subprocess.Popen([sys.executable, "-m", "circuitir.cli", "tasks"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # long before the child has imported anything and printed
    _, err = proc.communicate(timeout=120)
    assert err.decode() == ""
    assert proc.returncode == 141


# ---------------------------------------------------------------- good input

def test_tasks_lists_every_task(capsys):
    code, out, err = run_cli(capsys, "tasks", "--json")
    assert code == 0 and err == ""
    rows = json.loads(out)
    assert [row["task"] for row in rows] == list(TASKS)
    assert all(row["correct"] != row["alternative"] for row in rows)


def test_eval_prints_the_library_numbers(capsys, tmp_path, checkpoint):
    from circuitir.tasks.evaluate import evaluate_model

    path = checkpoint()
    code, out, err = run_cli(capsys, "eval", path, "--task", "brackets", "-n", "24", "--json")
    assert code == 0 and err == ""
    row = json.loads(out)
    loaded = load_model(path)
    expected = evaluate_model(loaded.model, TASKS["bracket_counting"], loaded.tokenizer, "heldout", 24)
    assert row == expected

    code, out, _ = run_cli(capsys, "eval", path, "--task", "all", "-n", "8")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["task", "loss", "accuracy", "n"]
    assert [line.split()[0] for line in lines[1:]] == list(TASKS)


def test_train_writes_a_loadable_checkpoint(capsys, tmp_path, tiny_corpus):
    out = tmp_path / "models" / "tiny.pt"
    code, stdout, err = run_cli(capsys, "train", "--preset", "tiny", "--corpus", tiny_corpus, "--steps", "2",
                                "--seed", "3", "--quiet", "--json", "-o", out)
    assert code == 0, err
    metrics = json.loads(stdout)
    loaded = load_model(out)
    assert loaded.meta["step"] == 2 and loaded.meta["seed"] == 3
    assert loaded.meta["metrics"]["val_loss"] == pytest.approx(metrics["val_loss"])
    assert set(metrics["tasks"]) == set(TASKS)
    assert leftover_parts(tmp_path) == []


def test_threads_sets_torch_threads_for_every_model_command(capsys, tmp_path, checkpoint):
    """--threads is an option of every command that runs a model, and takes effect before the command runs."""
    from circuitir.cli import build_parser
    path = checkpoint()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        code, out, err = run_cli(capsys, "eval", path, "--task", "quotes", "-n", "4", "--threads", "1", "--json")
        assert code == 0, err
        assert torch.get_num_threads() == 1 and json.loads(out)["n"] == 4
    finally:
        torch.set_num_threads(before)
    parser = build_parser()
    for argv in (["train", "-o", "m.pt"], ["extract", "m.pt", "--task", "quotes", "-o", "c.cir"], ["check", "c.cir", "m.pt"],
                 ["explain", "c.cir", "--model", "m.pt"], ["bridge", "train", "--dense", "d.pt", "-o", "b.pt"],
                 ["bridge", "eval", "b.pt", "--dense", "d.pt"], ["steer", "b.pt", "--dense", "d.pt", "--task", "quotes",
                                                                  "--node", "final_resid[0]"]):
        assert parser.parse_args(argv + ["--threads", "3"]).threads == 3, argv


def test_ctrl_c_inside_a_string_eval_still_exits_130_under_dash_m(tmp_path):
    """A Ctrl-C that lands in a string ``exec`` (as torch's and the standard library's generated code run)
    made ``python -m circuitir.cli`` die by SIGINT (-2) instead of exiting 130: CPython keeps a note of it
    that only a later string eval clears. Found when CI's Ctrl-C test of ``bridge train`` failed once."""
    package = tmp_path / "ctrlc"
    package.mkdir()
    (package / "__main__.py").write_text(
        "import sys\n"
        "from circuitir import cli\n"
        "def interrupted(args):\n"
        "    exec('raise KeyboardInterrupt', {})\n"
        "cli.cmd_tasks = interrupted\n"
        "sys.exit(cli.main(['tasks']))\n")
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "ctrlc"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{repo}"})
    assert (proc.returncode, proc.stderr) == (130, "circuitir tasks: interrupted\n")
