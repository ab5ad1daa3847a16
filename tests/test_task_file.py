"""--task-file: the user's own contrastive prompts, wherever --task is accepted (eval, extract, check, diff,
explain, report; steer and bridge eval in test_bridges.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import json

import pytest
import torch

from circuitir.errors import UserError
from circuitir.grammar import parse
from circuitir.models.checkpoint import load_model
from circuitir.models.tokenizer import ByteTokenizer
from circuitir.tasks import get_task, split_of
from circuitir.tasks.evaluate import evaluate_model
from circuitir.tasks.task_file import load_task_file, register_task_file

from conftest import cli

PIPELINE = "trace, mean-ablate{tokens=4096}, prune{target=%s,steps=60,prompts=64,select=48}, lower, fold-constants, dce"


def write_task_file(path, examples_by_split: dict) -> None:
    rows = [{"prompt": e.prompt, "answer": e.correct, "alternative": e.alternative, "split": split}
            for split, examples in examples_by_split.items() for e in examples]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def bracket_file(tmp_path_factory):
    """bracket_brace's own prompts as a task file: 96 train, 64 held out."""
    task = get_task("bracket_brace")
    path = tmp_path_factory.mktemp("taskfile") / "brackets.jsonl"
    write_task_file(path, {"train": task.examples("train", 96, 0), "heldout": task.examples("heldout", 64, 0)})
    return path


# ---------------------------------------------------------------- the file

def test_a_task_file_behaves_like_a_registry_task(tmp_path):
    path = tmp_path / "mine.jsonl"
    lines = [{"prompt": f"x = [{i}", "answer": "]", "alternative": ")"} for i in range(40)]
    lines.append({"prompt": "y = (1", "answer": ")", "alternative": "]", "split": "heldout"})
    path.write_text("\n".join(json.dumps(row) for row in lines) + "\n\n")
    task = load_task_file(path)
    assert task.name.startswith("file:mine@") and len(task.name) == len("file:mine@") + 16
    heldout = task.examples("heldout", 1000, seed=0)
    # Lines without a split go where the built-in tasks would put the prompt.
    assert {e.prompt for e in heldout} == {"y = (1"} | {r["prompt"] for r in lines[:40] if split_of(r["prompt"]) == "heldout"}
    train = task.examples("train", 5, seed=3)
    assert len(train) == 5 and train == task.examples("train", 5, seed=3) != task.examples("train", 5, seed=4)
    assert all(split_of(e.prompt) == "train" for e in train)
    assert task.spec()["sha256"].startswith(task.name.split("@")[1])


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "a", "answer": "b"', "not valid JSON"),
    ('["a", "b", "c"]', "expected a JSON object"),
    ('{"prompt": "a", "answer": "b"}', "missing 'alternative'"),
    ('{"prompt": "a", "answer": "", "alternative": "c"}', "'answer' must be a non-empty string"),
    ('{"prompt": "a", "answer": "b", "alternative": "c", "split": "test"}', "split must be one of"),
    ('{"prompt": "a", "answer": "b", "alternative": "c", "spilt": "train"}', "unknown key 'spilt'"),
    ('{"prompt": "a", "answer": "b", "alternative": "b"}', "the answer and the alternative are the same text"),
    ('{"prompt": "x = [1", "answer": "b", "alternative": "c"}', "the same prompt as line 1"),
])
def test_a_malformed_line_is_named(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "x = [1", "answer": "]", "alternative": ")"}\n\n' + line + "\n")
    code, out, err = cli("eval", "models/none.pt", "--task-file", path)
    assert code == 2 and out == ""
    assert f"bad.jsonl:3: {message}" in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_empty_and_double_task_options(tmp_path):
    assert "cannot read task file" in cli("eval", "m.pt", "--task-file", tmp_path / "none.jsonl")[2]
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "has no prompts" in cli("eval", "m.pt", "--task-file", tmp_path / "empty.jsonl")[2]
    code, _, err = cli("eval", "m.pt", "--task", "quotes", "--task-file", tmp_path / "empty.jsonl")
    assert code == 2 and "not both" in err
    code, _, err = cli("eval", "m.pt")
    assert code == 2 and "no task given" in err


def test_answers_colliding_under_the_tokenizer_are_reported_by_line(tmp_path):
    path = tmp_path / "collide.jsonl"
    rows = [{"prompt": "a = 1", "answer": "]", "alternative": ")"},
            {"prompt": "b = 1", "answer": "ab", "alternative": "ac"},
            {"prompt": "c = 1", "answer": ")", "alternative": "]"},
            {"prompt": "d = 1", "answer": "xy", "alternative": "xz"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task_file(path)
    assert task.answer_collisions(ByteTokenizer()) == [2, 4]
    with pytest.raises(UserError, match=r"on lines 2, 4 the answer and the alternative start with the same token"):
        task.check_tokenizer(ByteTokenizer())


def test_a_split_with_no_prompts_says_so(tmp_path):
    path = tmp_path / "train_only.jsonl"
    path.write_text(json.dumps({"prompt": "a", "answer": "b", "alternative": "c", "split": "train"}) + "\n")
    with pytest.raises(UserError, match="has no heldout prompts"):
        load_task_file(path).examples("heldout", 4)


def test_get_task_resolves_a_file_name_only_for_that_file(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "a", "answer": "b", "alternative": "c"}) + "\n")
    task = register_task_file(path)
    assert get_task(task.name) is task
    with pytest.raises(UserError, match="comes from a task file"):
        get_task("file:t@0000000000000000")


# ---------------------------------------------------------------- end to end

def test_eval_on_a_task_file_equals_eval_on_the_same_prompts(bracket_model, bracket_file):
    path, _ = bracket_model
    code, out, err = cli("eval", path, "--task-file", bracket_file, "-n", "64", "--json")
    assert code == 0, err
    row = json.loads(out)
    expected = evaluate_model(load_model(path).model, get_task("bracket_brace"), ByteTokenizer(), "heldout", 64, 0)
    assert row["n"] == 64 and row["task"].startswith("file:brackets@")
    assert row["loss"] == pytest.approx(expected["loss"], abs=1e-5)
    assert row["accuracy"] == pytest.approx(expected["accuracy"])


@pytest.fixture(scope="module")
def file_circuit(bracket_model, bracket_file, tmp_path_factory):
    path, metrics = bracket_model
    full = metrics["tasks"]["bracket_brace"]["loss"]
    target = 0.25 if full < 0.1 else round(full + 0.2, 2)
    out = tmp_path_factory.mktemp("file-extract") / "mine.cir"
    code, stdout, stderr = cli("extract", path, "--task-file", bracket_file, "-o", out,
                               "--pipeline", PIPELINE % target, "--json")
    assert code == 0, stderr
    return out, json.loads(stdout)


def test_extract_and_check_on_a_task_file(bracket_model, bracket_file, file_circuit):
    out, summary = file_circuit
    circuit = parse(out.read_text(), str(out))
    name = circuit.header["task"]["name"]
    assert name == load_task_file(bracket_file).name and name == summary["task"]
    # The header records the whole file hash, not only the name's prefix.
    assert circuit.header["task"]["sha256"] == hashlib.sha256(Path(bracket_file).read_bytes()).hexdigest()
    assert circuit.header["task"]["file"] == Path(bracket_file).name
    assert summary["loss"] <= summary["target_loss"]
    code, stdout, stderr = cli("check", out, bracket_model[0], "--task-file", bracket_file, "--no-control",
                               "-n", "64", "--json")
    assert code in (0, 1), stderr
    result = json.loads(stdout)
    assert result["sufficiency"]["n"] == 64 and result["sufficiency"]["passed"]


def test_check_refuses_another_task_file_or_none(bracket_model, bracket_file, file_circuit, tmp_path):
    out, _ = file_circuit
    changed = tmp_path / "brackets.jsonl"
    changed.write_text(bracket_file.read_text() + json.dumps({"prompt": "z = (5", "answer": ")",
                                                              "alternative": "]"}) + "\n")
    code, _, err = cli("check", out, bracket_model[0], "--task-file", changed, "--no-control")
    assert code == 2 and "another file, or the file changed" in err and err.count("\n") == 1
    from circuitir.tasks import FILE_TASKS
    FILE_TASKS.clear()  # a fresh process has none registered
    code, _, err = cli("check", out, bracket_model[0], "--no-control")
    assert code == 2 and "give that file with --task-file" in err


def test_check_compares_the_full_sha256_the_header_records(bracket_model, bracket_file, file_circuit, tmp_path):
    out, _ = file_circuit
    text = out.read_text()
    sha = hashlib.sha256(Path(bracket_file).read_bytes()).hexdigest()
    assert f'task.sha256 = "{sha}"' in text
    # The same bytes under another file name: the circuit's task, with the prompts extraction saw.
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_bytes(Path(bracket_file).read_bytes())
    runs = []
    for given in (bracket_file, renamed):
        code, stdout, stderr = cli("check", out, bracket_model[0], "--task-file", given, "--no-control", "-n", "32",
                                   "--json")
        assert code in (0, 1), stderr
        runs.append(json.loads(stdout)["sufficiency"])
    assert runs[1]["n"] == runs[0]["n"] == 32 and runs[1]["loss"] == runs[0]["loss"]
    # A header whose name (16 hex digits) fits the file but whose full sha256 does not: refused.
    other = sha[:-1] + ("0" if sha[-1] != "0" else "1")
    forged = tmp_path / "forged.cir"
    forged.write_text(text.replace(sha, other))
    code, out_text, err = cli("check", forged, bracket_model[0], "--task-file", bracket_file, "--no-control")
    assert code == 2 and out_text == "" and err.count("\n") == 1
    assert "another file, or the file changed" in err and f"sha256 {other[:12]}" in err


def test_behavioural_diff_on_a_task_file(bracket_model, bracket_file, file_circuit):
    out, _ = file_circuit
    code, stdout, stderr = cli("diff", out, out, "--model", bracket_model[0], "--task-file", bracket_file,
                               "-n", "32", "--json")
    assert code == 0, stderr
    behaviour = json.loads(stdout)["behavioural"]
    assert behaviour["n"] == 32 and behaviour["predictions_differ"] == 0


def test_explain_and_report_take_a_task_file(bracket_model, bracket_file, file_circuit, tmp_path):
    """The file holds bracket_brace's first 64 held-out prompts: explained on it, every node's class means
    are those on the built-in task's 64 (in another order)."""
    out, _ = file_circuit
    runs = {}
    for option in (("--task", "bracket_brace"), ("--task-file", bracket_file)):
        code, stdout, err = cli("explain", out, "--model", bracket_model[0], *option, "--prompts", 64,
                                "--windows", 8, "--json")
        assert code == 0, err
        runs[option[0]] = {row["node"]: row["class_means"] for row in json.loads(stdout)["nodes"]}
    assert runs["--task"].keys() == runs["--task-file"].keys()
    assert any(means for means in runs["--task"].values())
    for node, means in runs["--task"].items():
        assert runs["--task-file"][node] == pytest.approx(means, abs=2e-4), node
    from circuitir.tasks import FILE_TASKS
    FILE_TASKS.clear()  # a fresh process: the circuit's task is the file, which must be given
    html = tmp_path / "r.html"
    code, _, err = cli("report", out, "--model", bracket_model[0], "-o", html, "--no-check", "--windows", 8)
    assert code == 2 and "give that file with --task-file" in err and err.count("\n") == 1 and not html.exists()
    code, stdout, err = cli("report", out, "--model", bracket_model[0], "-o", html, "--task-file", bracket_file,
                            "-n", 32, "--windows", 8, "--prompts", 16, "--quiet")
    assert code == 0, err
    assert html.exists() and "sufficiency" in html.read_text()


# ---------------------------------------------------------------- many tasks at once

@pytest.mark.slow  # eight extractions in two spawned processes: about 25 s on 2 cores
def test_extract_all_tasks_in_two_jobs(bracket_model, tmp_path):
    path, metrics = bracket_model
    full = metrics["tasks"]["bracket_brace"]["loss"]
    pipeline = PIPELINE % (0.25 if full < 0.1 else round(full + 0.2, 2))
    code, out, err = cli("extract", path, "--task", "all", "-o", tmp_path / "all", "--jobs", "2",
                         "--pipeline", pipeline, "--device", "cpu", "--json")
    result = json.loads(out)
    from circuitir.tasks import TASKS
    rows = {row["task"]: row for row in result["tasks"]}
    assert list(rows) == list(TASKS) and result["jobs"] == 2
    # This 64-token model cannot take every task: those are reported, the rest are written.
    assert code == (1 if any("error" in row for row in rows.values()) else 0), err
    assert "error" not in rows["bracket_brace"]
    written = sorted(p.name for p in (tmp_path / "all").iterdir())
    assert written == sorted(f"{name}.cir" for name, row in rows.items() if "error" not in row)
    # Each file is the one a lone extraction with the same options writes.
    code, _, err = cli("extract", path, "--task", "bracket_brace", "-o", tmp_path / "alone.cir", "--pipeline", pipeline)
    assert code == 0, err
    assert (tmp_path / "all" / "bracket_brace.cir").read_text() == (tmp_path / "alone.cir").read_text()


def test_extract_all_loads_every_job_on_the_device(bracket_model, tmp_path, monkeypatch):
    """--device reaches each job's load (the jobs=1 path runs the job function in this process; --jobs N
    submits the same arguments to spawned ones). The extraction itself is stubbed: only where the model
    was loaded is measured here."""
    import circuitir.api
    import circuitir.runtime.extract
    from circuitir.tasks import TASKS

    real_load, seen = circuitir.api.load_model, []

    def spy(path, tokenizer=None, device=None):
        loaded = real_load(path, tokenizer=tokenizer, device=device)
        seen.append((device, next(loaded.model.parameters()).device.type))
        return loaded

    def stub(loaded, task, **options):
        raise UserError(f"stub: {task.name}")

    monkeypatch.setattr(circuitir.api, "load_model", spy)
    monkeypatch.setattr(circuitir.runtime.extract, "extract", stub)
    code, out, err = cli("extract", bracket_model[0], "--task", "all", "-o", tmp_path / "all", "--jobs", "1",
                         "--ablation", "zero", "--device", "cpu", "--json")
    assert code == 1, err
    rows = json.loads(out)["tasks"]
    assert [row["error"] for row in rows] == [f"stub: {name}" for name in TASKS]
    assert seen == [("cpu", "cpu")] * (1 + len(TASKS))  # the CLI's check, then one load per job


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_extract_all_on_cuda_without_a_gpu_is_one_line(bracket_model, tmp_path):
    code, out, err = cli("extract", bracket_model[0], "--task", "all", "-o", tmp_path / "all", "--jobs", "2",
                         "--device", "cuda")
    assert code == 2 and out == "" and "torch sees no CUDA GPU" in err and err.count("\n") == 1
    assert not (tmp_path / "all").exists()


def test_check_measures_the_prompts_the_user_brings(bracket_model, file_circuit, tmp_path):
    out, _ = file_circuit
    # Real-looking code, not the task generator's: brackets opened inside calls and assignments.
    lines = [("total = sum([1, 2", "]", ")"), ("print((3", ")", "]"), ("data = [x for x in range(4", ")", "]"),
             ("foo(bar[0", "]", ")"), ("y = (a + [b", "]", ")"), ("items = [(1, 2", ")", "]")]
    path = tmp_path / "real.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": a, "alternative": b}) + "\n" for p, a, b in lines))
    code, stdout, stderr = cli("check", out, bracket_model[0], "--no-control", "-n", "32", "--prompts", path, "--json")
    assert code in (0, 1), stderr
    mine = json.loads(stdout)["prompts"]
    assert mine["n"] == len(lines) and 0 <= mine["agreement"] <= 1
    # Independently: the model's own logits for the two answers, and the circuit's predictions from `run`.
    model = load_model(bracket_model[0]).model
    model_right = []
    for prompt, answer, alternative in lines:
        with torch.no_grad():
            logits = model(torch.tensor([list(prompt.encode())]))[0, -1]
        model_right.append(bool(logits[ord(answer)] > logits[ord(alternative)]))
    assert mine["model"]["accuracy"] == pytest.approx(sum(model_right) / len(lines))
    code, stdout, stderr = cli("run", out, *[p for p, _, _ in lines], "--json")
    assert code == 0, stderr
    circuit_right = [row["logits"][answer] > row["logits"][alternative]
                     for row, (_, answer, alternative) in zip(json.loads(stdout), lines)]
    assert mine["circuit"]["accuracy"] == pytest.approx(sum(circuit_right) / len(lines))
    agree = [a == b for a, b in zip(model_right, circuit_right)]
    assert mine["agreement"] == pytest.approx(sum(agree) / len(lines))
    code, stdout, _ = cli("check", out, bracket_model[0], "--no-control", "-n", "32", "--prompts", path)
    assert "your prompts" in stdout and f"{len(lines)} from" in stdout
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"prompt": "x = 'a", "answer": "'", "alternative": '"'}) + "\n")
    code, _, err = cli("check", out, bracket_model[0], "--no-control", "--prompts", wrong)
    assert code == 2 and "wrong.jsonl:1" in err and "not one of the circuit's outputs" in err
