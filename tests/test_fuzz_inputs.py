"""Inputs other than .cir text: checkpoints, command-line numbers, prompts, output paths, the means cache,
signals. Each bad one ends in one line, exit code 2, no traceback, nothing half-written (issue 12)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from circuitir.cli import main
from circuitir.models.checkpoint import FORMAT, FORMAT_VERSION, load_model, save_checkpoint
from circuitir.models.gpt import SparseGPT
from circuitir.models.tokenizer import ByteTokenizer

from conftest import default_sigint, randomize_, tiny_config, wait_for_cpu_seconds

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BRACKET = EXAMPLES / "bracket_toy.cir"
REPO = Path(__file__).resolve().parent.parent


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(result, command: str, message: str) -> None:
    code, out, err = result
    assert (code, out) == (2, ""), err
    assert err == f"circuitir {command}: error: {message}\n"


def payload(model: SparseGPT, **changes) -> dict:
    raw = {"format": FORMAT, "version": FORMAT_VERSION, "config": model.config.to_dict(),
           "tokenizer": {"kind": "bytes"}, "state_dict": model.state_dict()}
    raw.update(changes)
    return raw


@pytest.fixture
def model():
    return randomize_(SparseGPT(tiny_config()), seed=0, scale=0.1).eval()


# ---------------------------------------------------------------- checkpoints

class WritesAFile:
    """Unpickling this opens (creates) a file: a stand-in for any code a pickle can run."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("argv", [["eval", "{p}", "--task", "quotes"], ["trace", "{p}"],
                                  ["check", str(BRACKET), "{p}"],
                                  ["extract", "{p}", "--task", "quotes", "-o", "{out}"],
                                  ["diff", str(BRACKET), str(BRACKET), "--model", "{p}", "--task", "quotes"]],
                         ids=lambda a: a[0])
def test_a_pickle_that_would_run_code_is_refused_in_circuitirs_words(capsys, tmp_path, model, argv):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(payload(model, metrics=WritesAFile(str(marker))), path)
    argv = [a.format(p=path, out=tmp_path / "out.cir") for a in argv]
    code, out, err = cli(capsys, *argv)
    if argv[0] == "check":  # the circuit's header is checked first: it records no model hash
        assert code == 2 and "Traceback" not in err
    else:
        one_line_error((code, out, err), argv[0],
                       f"cannot read checkpoint {path}: it holds Python objects, not only tensors and plain values, "
                       "and loading it could run code, which circuitir never does (re-download the model from a "
                       "source you trust, or re-train it)")
    assert not marker.exists()
    assert "weights_only" not in err
    assert not (tmp_path / "out.cir").exists()


def test_the_pickle_refusal_holds_for_the_library_too(tmp_path, model):
    from circuitir.errors import UserError

    marker = tmp_path / "pwned"
    torch.save(payload(model, recipe=WritesAFile(str(marker))), tmp_path / "evil.pt")
    with pytest.raises(UserError, match="cannot read checkpoint .*could run code, which circuitir never does"):
        load_model(tmp_path / "evil.pt")
    assert not marker.exists()


def saved(tmp_path, raw, name="m.pt") -> Path:
    path = tmp_path / name
    torch.save(raw, path)
    return path


def test_nan_weights_are_refused(capsys, tmp_path, model):
    state = model.state_dict()
    state["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    path = saved(tmp_path, payload(model, state_dict=state))
    one_line_error(cli(capsys, "eval", path, "--task", "quotes"), "eval",
                   f"checkpoint {path}: transformer.h.0.mlp.c_fc.weight holds NaN or infinite values (a diverged "
                   "or damaged model); circuitir reads finite weights only")


def test_weights_of_a_wrong_dtype_are_refused(capsys, tmp_path, model):
    state = model.state_dict()
    state["transformer.wte.weight"] = state["transformer.wte.weight"].long()
    path = saved(tmp_path, payload(model, state_dict=state))
    one_line_error(cli(capsys, "trace", path), "trace",
                   f"checkpoint {path}: transformer.wte.weight holds torch.int64 values, not floating-point weights")


def test_weights_in_half_precision_load(tmp_path, model):
    state = {k: v.half() for k, v in model.state_dict().items()}
    loaded = load_model(saved(tmp_path, payload(model, state_dict=state)))
    assert loaded.model.transformer.wte.weight.dtype == torch.float32


def test_a_tokenizer_spec_of_the_wrong_type(capsys, tmp_path, model):
    path = saved(tmp_path, payload(model, tokenizer="bytes"))
    one_line_error(cli(capsys, "trace", path), "trace",
                   f"checkpoint {path}: its tokenizer spec is a str, not a table such as {{'kind': 'bytes'}}")


@pytest.mark.parametrize("field, value, message", [
    ("afrac", "x", "afrac must be null or a number, got 'x'"),
    ("afrac_loctypes", 3, "afrac_loctypes must be a string, got 3"),
    ("n_layer", True, "n_layer must be a positive integer, got True"),
    ("rms_norm", "yes", "rms_norm must be true or false, got 'yes'"),
    ("afrac", float("nan"), "afrac must be in (0, 1], got nan"),
])
def test_config_fields_of_the_wrong_type(capsys, tmp_path, model, field, value, message):
    config = {**model.config.to_dict(), field: value}
    path = saved(tmp_path, payload(model, config=config))
    one_line_error(cli(capsys, "trace", path), "trace", f"invalid model config: {message}")


def test_a_huge_config_is_refused_before_anything_is_allocated(capsys, tmp_path, model):
    config = {**model.config.to_dict(), "d_model": 1 << 20}
    path = saved(tmp_path, payload(model, config=config))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    code, out, err = cli(capsys, "trace", path)
    assert code == 2 and "does not fit its config (transformer.wte.weight is (256, 8), the config gives " \
                          "(256, 1048576))" in err and err.count("\n") == 1
    assert time.perf_counter() - start < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 512 * 1024  # KB: under 512 MB more


def test_missing_weights_are_refused_before_the_model_is_built(capsys, tmp_path, model):
    state = model.state_dict()
    del state["transformer.h.1.attn.c_attn.weight"]
    path = saved(tmp_path, payload(model, state_dict=state))
    one_line_error(cli(capsys, "trace", path), "trace",
                   f"checkpoint {path} does not fit its config (missing ['transformer.h.1.attn.c_attn.weight']); "
                   "check that the config file belongs to these weights")


def test_random_bytes_are_not_called_a_pickle_of_objects(capsys, tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(bytes(range(256)) * 16)
    code, out, err = cli(capsys, "trace", path)
    assert code == 2 and err.startswith(f"circuitir trace: error: cannot read checkpoint {path}: ")
    assert "could run code" not in err and "weights_only" not in err and err.count("\n") == 1


def test_a_truncated_checkpoint(capsys, tmp_path, model):
    good = tmp_path / "good.pt"
    save_checkpoint(good, model, ByteTokenizer())
    data = good.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 10):
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(data[:cut])
        code, out, err = cli(capsys, "trace", path)
        assert code == 2 and err.startswith(f"circuitir trace: error: cannot read checkpoint {path}: ")
        assert err.count("\n") == 1 and "Traceback" not in err


def test_an_openai_config_that_is_not_utf8(capsys, tmp_path, model):
    release = tmp_path / "release"
    release.mkdir()
    torch.save(model.state_dict(), release / "final_model.pt")
    (release / "beeg_config.json").write_bytes(b'{"n_layer": 2, "name": "\xff\xfe"}')
    one_line_error(cli(capsys, "trace", release), "trace",
                   f"{release / 'beeg_config.json'}: not UTF-8 text (byte 24); a config is a JSON file")


def test_resuming_a_checkpoint_without_a_recipe(capsys, tmp_path, model):
    path = tmp_path / "plain.pt"
    save_checkpoint(path, model, ByteTokenizer())
    one_line_error(cli(capsys, "train", "--resume", path, "-o", tmp_path / "out.pt"), "train",
                   f"{path} records no training recipe, so it cannot be resumed (only a checkpoint that "
                   "`circuitir train` wrote can)")


# ---------------------------------------------------------------- numbers on the command line

@pytest.mark.parametrize("argv, message", [
    (["eval", "m.pt", "--task", "quotes", "-n", "0"], "-n must be a whole number from 1 to 10,000,000, got 0"),
    (["eval", "m.pt", "--task", "quotes", "-n", "-5"], "-n must be a whole number from 1 to 10,000,000, got -5"),
    (["eval", "m.pt", "--task", "quotes", "-n", "1000000000000"],
     "-n must be a whole number from 1 to 10,000,000, got 1000000000000"),
    (["eval", "m.pt", "--task", "quotes", "--seed", "-1"], "--seed must be a whole number from 0 to 4,294,967,295, got -1"),
    (["train", "-o", "x.pt", "--steps", "-1"], "--steps must be a whole number from 1 to 10,000,000, got -1"),
    (["train", "-o", "x.pt", "--steps", "0"], "--steps must be a whole number from 1 to 10,000,000, got 0"),
    (["train", "-o", "x.pt", "--batch-size", "0"], "--batch-size must be a whole number from 1 to 10,000,000, got 0"),
    (["train", "-o", "x.pt", "--lr", "nan"], "--lr must be a finite number in (0, 10], got nan"),
    (["train", "-o", "x.pt", "--lr", "-0.1"], "--lr must be a finite number in (0, 10], got -0.1"),
    (["train", "-o", "x.pt", "--lr", "inf"], "--lr must be a finite number in (0, 10], got inf"),
    (["train", "-o", "x.pt", "--density", "nan"], "--density must be a finite number in (0, 1], got nan"),
    (["train", "-o", "x.pt", "--task-mix", "1.5"], "--task-mix must be a finite number in [0, 1], got 1.5"),
    (["train", "-o", "x.pt", "--eval-every", "0"], "--eval-every must be a whole number from 1 to 10,000,000, got 0"),
    (["train", "-o", "x.pt", "--keep-every", "-2"], "--keep-every must be a whole number from 0 to 10,000,000, got -2"),
    (["train", "-o", "x.pt", "--threads", "0"], "--threads must be a whole number from 1 to 4,096, got 0"),
    (["extract", "m.pt", "--task", "quotes", "-o", "x.cir", "--target-loss", "inf"],
     "--target-loss must be a finite number in (0, 100], got inf"),
    (["extract", "m.pt", "--task", "quotes", "-o", "x.cir", "--target-loss", "0"],
     "--target-loss must be a finite number in (0, 100], got 0.0"),
    (["check", "c.cir", "m.pt", "--necessity-loss", "nan"], "--necessity-loss must be a finite number in [0, 100], got nan"),
    (["check", "c.cir", "m.pt", "-n", "0"], "-n must be a whole number from 1 to 10,000,000, got 0"),
    (["diff", "a.cir", "b.cir", "--tolerance", "-1"], "--tolerance must be a finite number in [0, 1e+30], got -1.0"),
])
def test_numbers_out_of_range_are_refused_before_any_work(capsys, tmp_path, argv, message):
    os.chdir(tmp_path)
    one_line_error(cli(capsys, *argv), argv[0], message)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- prompts and output paths

def test_a_prompt_that_is_not_utf8(capsys):
    # Bytes that are not UTF-8 reach sys.argv as lone surrogates.
    one_line_error(cli(capsys, "run", BRACKET, "ok", "\udcff\udcfe"), "run", "prompt 2 is not valid UTF-8 text")


def test_a_prompt_that_is_not_utf8_in_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "circuitir.cli", "run", str(BRACKET), b"\xff\xfe"],
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 2 and proc.stdout == b""
    assert proc.stderr == b"circuitir run: error: prompt 1 is not valid UTF-8 text\n"


@pytest.mark.parametrize("kind", ["a directory", "under a file"])
@pytest.mark.parametrize("command", ["render", "extract", "train", "train --log"])
def test_unwritable_outputs_are_refused_before_any_work(capsys, tmp_path, kind, command):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    target = tmp_path if kind == "a directory" else blocker / "out"
    argv = {"render": ["render", BRACKET, "-o", target],
            "extract": ["extract", tmp_path / "no-such-model.pt", "--task", "quotes", "-o", target],
            "train": ["train", "--corpus", tmp_path / "nowhere", "-o", target],
            "train --log": ["train", "--corpus", tmp_path / "nowhere", "-o", tmp_path / "m.pt", "--log", target]}[command]
    what = {"render": "the drawing", "extract": "the circuit", "train": "the checkpoint", "train --log": "the log"}[command]
    reason = "it is a directory" if kind == "a directory" else f"{blocker} is not a directory"
    # The model or corpus does not exist either: the output is checked first, before any long work.
    one_line_error(cli(capsys, *argv), argv[0], f"cannot write {what} {target}: {reason}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, out, err = cli(capsys, "render", BRACKET, "-o", locked / "c.dot")
        assert code == 2 and err.startswith(f"circuitir render: error: cannot write the drawing {locked / 'c.dot'}: ")
        copy = locked / "c.cir"
        locked.chmod(0o700)
        copy.write_text(BRACKET.read_text().replace("  0.attn.act_in[0] gain=1.0", "0.attn.act_in[0]  gain=1"))
        locked.chmod(0o500)
        code, out, err = cli(capsys, "fmt", "-i", copy)
        assert code == 2 and err.startswith(f"circuitir fmt: error: cannot write the file {copy}: ")
    finally:
        locked.chmod(0o700)


def test_fmt_in_place_on_a_path_that_became_a_directory(capsys, tmp_path):
    from circuitir.cli import write_in_place
    from circuitir.errors import UserError

    with pytest.raises(UserError, match=f"cannot write the file {tmp_path}: it is a directory"):
        write_in_place(str(tmp_path), "x")


# ---------------------------------------------------------------- the means cache

@pytest.fixture
def loaded_tiny(tiny_corpus):
    from circuitir.models.checkpoint import LoadedModel

    model = randomize_(SparseGPT(tiny_config()), seed=3, scale=0.3).eval()
    return LoadedModel(model, ByteTokenizer(), "cd" * 32, "tiny.pt", {"corpus": {"root": str(tiny_corpus)}})


@pytest.mark.parametrize("damage", ["wrong shapes", "missing site", "not a dict", "nan", "truncated"])
def test_a_damaged_means_cache_is_recomputed(monkeypatch, tmp_path, loaded_tiny, damage):
    from circuitir.passes.ablate import pretrain_means

    monkeypatch.setenv("CIRCUITIR_CACHE", str(tmp_path))
    first, _ = pretrain_means(loaded_tiny, 256, seed=0)
    (entry,) = (tmp_path / "means").iterdir()
    bad = {k: v.clone() for k, v in first.items()}
    if damage == "wrong shapes":
        bad["0.mlp.post_act"] = torch.zeros(3)
    elif damage == "missing site":
        del bad["final_resid"]
    elif damage == "nan":
        bad["0.attn.q"][0] = float("nan")
    if damage == "not a dict":
        torch.save([1, 2, 3], entry)
    elif damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:100])
    else:
        torch.save(bad, entry)
    again, info = pretrain_means(loaded_tiny, 256, seed=0)
    assert info["cached"] is False
    assert again.keys() == first.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert pretrain_means(loaded_tiny, 256, seed=0)[1]["cached"] is True


# ---------------------------------------------------------------- signals

def test_sigterm_during_training_leaves_no_partial_file(tmp_path, tiny_corpus):
    out, log = tmp_path / "m.pt", tmp_path / "log.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "circuitir.cli", "train", "--preset", "tiny", "--corpus",
                             str(tiny_corpus), "--steps", "100000", "-o", str(out), "--quiet", "--eval-every", "1",
                             "--log", str(log)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)},
                            preexec_fn=default_sigint)
    deadline = time.time() + 120
    # wait for the first logged step: training under way
    while not (log.exists() and log.stat().st_size) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out_text, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err.decode()
    assert err.decode() == "circuitir train: terminated\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []
    assert log.stat().st_size, "the signal came before training started"
    if out.exists():  # a periodic checkpoint, written whole before the signal
        assert load_model(out).meta["recipe"]["steps"] == 100000


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_extract_interrupted_writes_nothing(tmp_path, bracket_model, sig, code, word):
    """`extract` writes its file only when it finishes: a signal mid-search leaves no file and no .part."""
    model, _ = bracket_model
    out = tmp_path / "c.cir"
    pipeline = "trace, mean-ablate{tokens=4096}, prune{target=0.5,steps=1000000,prompts=64,select=48}, lower, dce"
    proc = subprocess.Popen([sys.executable, "-m", "circuitir.cli", "extract", str(model), "--task", "bracket_brace",
                             "-o", str(out), "--pipeline", pipeline, "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)},
                            preexec_fn=default_sigint)
    wait_for_cpu_seconds(proc, 6)  # imports done (about 2 s of CPU), the mask being learned
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err.decode()
    assert err.decode() == f"circuitir extract: {word}\n"
    assert list(tmp_path.iterdir()) == []


def test_the_sigterm_handler_is_restored(capsys):
    before = signal.getsignal(signal.SIGTERM)
    code, out, _ = cli(capsys, "tasks", "--json")
    assert code == 0 and json.loads(out)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_huge_token_count_for_the_means_is_refused(monkeypatch, tmp_path, loaded_tiny):
    # Was: RuntimeError: Storage size calculation overflowed (mean-ablate{tokens=99999999999999999999}).
    from circuitir.errors import UserError
    from circuitir.passes.ablate import pretrain_means

    monkeypatch.setenv("CIRCUITIR_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=r"^mean-ablate\{tokens\} must be from 1 to 1,073,741,824 \(2\^30\), "
                                        r"got 99999999999999999999$"):
        pretrain_means(loaded_tiny, 99999999999999999999, seed=0)
    assert not (tmp_path / "means").exists()


# ---------------------------------------------------------------- pipeline text

@pytest.mark.parametrize("pipeline, message", [
    ("trace, mean-ablate, prune{lr=nan}, lower", "pipeline: prune{lr=nan}: expected a finite number"),
    ("trace, mean-ablate, prune{target=inf}, lower", "pipeline: prune{target=inf}: expected a finite number"),
    ("trace, mean-ablate, prune{prompts=99999999999999999999}, lower",
     "pipeline: prune{prompts=99999999999999999999...}: a whole number of at most 9 digits"),
    ("trace, mean-ablate, prune{prompts=1000000}, lower", "pipeline: prune{prompts} must be from 2 to 100,000, "
                                                          "got 1000000"),
    ("trace, mean-ablate, prune{select=1}, lower", "pipeline: prune{select} must be from 2 to 100,000, got 1"),
    ("trace, mean-ablate, prune{steps=-1}, lower", "pipeline: prune{steps} must be from 0 to 1,000,000, got -1"),
    ("trace, mean-ablate, prune{masks=100000}, lower", "pipeline: prune{masks} must be from 1 to 4096, got 100000"),
    ("trace, mean-ablate, prune{lr=0}, lower", "pipeline: prune{lr} must be in (0, 10], got 0.0"),
    ("trace, mean-ablate, prune{sparsity=-1}, lower", "pipeline: prune{sparsity} must be in [0, 1000], got -1.0"),
    ("trace, mean-ablate, prune{adapt=2}, lower", "pipeline: prune{adapt} must be in [0, 1], got 2.0"),
    ("trace, mean-ablate, prune{aim=0}, lower", "pipeline: prune{aim} must be in (0, 1], got 0.0"),
    ("trace, mean-ablate, prune{warmup=1.5}, lower", "pipeline: prune{warmup} must be in [0, 1], got 1.5"),
    ("trace, mean-ablate{tokens=0}, prune, lower",
     "pipeline: mean-ablate{tokens} must be from 1 to 1,073,741,824 (2^30), got 0"),
])
def test_pipeline_options_out_of_range_are_refused_before_any_work(capsys, tmp_path, pipeline, message):
    os.chdir(tmp_path)
    one_line_error(cli(capsys, "extract", "m.pt", "--task", "quotes", "-o", "x.cir", "--pipeline", pipeline),
                   "extract", message)
    assert list(tmp_path.iterdir()) == []
