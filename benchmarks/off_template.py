"""Faithfulness off the templates: the shipped models and circuits on prompts cut from real Python.

The task prompts are generated from templates (``circuitir/tasks``: a preamble
line, a variable, a short string or list). The models also meet quotes and
brackets in real code, and a circuit found on the templates is only as good as
the agreement it keeps off them. This script cuts prompt sets from real Python
the models never trained on, the standard library's *validation* files (the
corpus holds files out by a hash of their path, ``circuitir.data.corpus``; the
same split, so every file here was held out of pretraining), and puts the
sparse model, the dense model and the circuit compiled and run alone
(``circuit.compile()``, no model) side by side on them, beside the same figures
on the task's own held-out template prompts.

* **single_double_quote**: every string literal opened with one ``'`` or ``"``
  (a prefix such as ``r``, ``b``, ``f`` allowed; triple-quoted and empty
  strings left out), as Python's ``tokenize`` finds it, cut just before its
  closing quote: the answer is that quote, the alternative the other one (the
  task's convention: ``x = "hello`` wants ``"``);
* **bracket_counting**: every ``]`` that closes a *list display* (a ``[`` that
  is not a subscript: the token before it is not a name, number, string or
  closing bracket), cut just after it, where the next character says whether a
  list is still open: ``]`` when it closes an inner list and the next token
  closes the enclosing list display (nested, the task's ``x = [[1, 2]`` wanting
  ``]``), a newline when no bracket of any kind is open after it (flat, the
  task's ``x = [1, 2]`` wanting a newline); the alternative is the other one.
  Any other next character (``,``, ``)``, a space) is neither answer and is not
  cut.

A prompt keeps the last ``--context`` bytes before the cut (default the
model's block_size - 1 = 127: the window the model was trained on holds the
prompt and the answer byte; cut at a character boundary), and only cuts whose
deciding bracket or quote lies inside that window are kept (the opening quote;
the enclosing list's ``[`` when nested, the closed list's ``[`` when flat), as
in every template prompt. Files are drawn round-robin so no file (the
``encodings`` tables hold hundreds of one-character strings) dominates; at most
``--cap``/2 prompts per answer (so a set is balanced when both answers have
enough; bracket_counting's nested cuts are rarer, and all of them are taken).

Two held-out sources are cut: ``validation``, the corpus's validation files
(the split the brief of issue 11 names; 39 files of this interpreter's
standard library), and ``tests``, the standard library's test packages, which
the corpus leaves out altogether (1056 files): the validation files hold only
one nested-list closing, the test packages hundreds. The prompt sets are
deterministic (the files, ``--seed``, ``--cap``, ``--context``) and written as
task files (``--task-file`` / ``check --prompts`` JSONL, every line
``"split": "heldout"``, ``id`` = file:line:col of the cut) to
``--prompts-dir`` when given (about 400 KB for the four sets, so they are not
committed), and measured with ``check --prompts``'s own function
(``circuitir.tasks.user_prompts.prompt_agreement``): the circuit's and a
model's task loss and accuracy, and *agreement*, the fraction of prompts on
which the circuit and the model prefer the same answer; once with the sparse
model and once with the dense model. The template rows are the task's first
``--cap`` held-out prompts (``task.examples("heldout", cap, 0)``), written to a
temporary task file and measured by the same function. Per-answer rows
(quotes: ``'`` / ``"``; brackets: nested / flat) are the same measurement on
that answer's prompts.

Real-code prompts are longer than the templates (127 bytes against about 27),
and the bracket circuit is known to dilute with length
(benchmarks/context_dilution.py), so every source is cut a second time with
``--control-context`` bytes (default 32, about the templates' length): the
sets named ``<source> 32B``. The visibility rule then keeps only cuts whose
deciding bracket or quote is within those 32 bytes, so they are short strings
and short lists: a different population, not the same prompts shortened.

    python benchmarks/off_template.py [--cap 512] [--sources validation,tests] [--context BYTES]
                                      [--control-context 32] [--json OUT] [--plot PNG] [--prompts-dir DIR]

About 90 s on one loaded core (most of it tokenizing the 19 MB of test packages);
figures measured on the shipped models are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import io
import json
import keyword
import random
import sys
import tempfile
import time
import tokenize
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import circuitir as cir  # noqa: E402
from circuitir.data.corpus import EXCLUDED_PARTS, default_corpus_dir, is_validation, python_files  # noqa: E402
from circuitir.errors import UserError  # noqa: E402
from circuitir.render.plots import write_results  # noqa: E402
from circuitir.tasks.user_prompts import prompt_agreement  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUOTES, BRACKETS = "single_double_quote", "bracket_counting"
NESTED, FLAT = "]", "\n"  # bracket_counting's answers: a list still open / every list closed
OTHER = {"'": '"', '"': "'", NESTED: FLAT, FLAT: NESTED}
ANSWER_NAMES = {"'": "'", '"': '"', NESTED: "nested", FLAT: "flat"}
CLOSERS = {")": "(", "]": "[", "}": "{"}
NOT_BEFORE_A_LIST = {tokenize.NAME, tokenize.NUMBER, tokenize.STRING}  # `[` after these is a subscript
SKIPPED = {tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT}


# ---------------------------------------------------------------- cutting prompts from source

def window(text: str, end: int, context: int) -> str:
    """The last ``context`` UTF-8 bytes of ``text[:end]``, cut at a character boundary."""
    data = text[:end].encode()[-context:]
    while data and data[0] & 0xC0 == 0x80:  # a continuation byte: the character started before the window
        data = data[1:]
    return data.decode()


def _tokens(text: str) -> list[tuple[tokenize.TokenInfo, int, int]]:
    """Every token with its absolute start and end character offsets in ``text``."""
    starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.ENDMARKER:
            break
        (r0, c0), (r1, c1) = tok.start, tok.end
        out.append((tok, starts[r0 - 1] + c0, starts[r1 - 1] + c1))
    return out


def _row(text: str, name: str, cut: int, answer: str, visible_from: int, context: int) -> dict | None:
    """A task-file line for the prompt ``text[:cut]``, or None when ``visible_from`` (the offset of the
    bracket or quote that decides the answer) falls outside the kept window."""
    prompt = window(text, cut, context)
    if visible_from < cut - len(prompt):
        return None
    line = text.count("\n", 0, cut) + 1
    column = cut - (text.rfind("\n", 0, cut) + 1)
    return {"prompt": prompt, "answer": answer, "alternative": OTHER[answer], "split": "heldout",
            "id": f"{name}:{line}:{column}"}


def quote_cuts(text: str, name: str = "<source>", context: int = 127, tokens=None) -> list[dict]:
    """single_double_quote prompts: each one-quote string literal cut before its closing quote.

    Each row also says (``_before``, not written to task files) which quote character comes last in the
    prompt before the string's opening quote: ``same``, ``other`` or ``none`` (in a string, a comment or
    code alike: what a byte-level model sees)."""
    rows = []
    for tok, start, end in tokens if tokens is not None else _tokens(text):
        if tok.type != tokenize.STRING:
            continue
        prefix = len(tok.string) - len(tok.string.lstrip("rRbBuUfF"))
        quoted = tok.string[prefix:]
        if quoted[:3] in ("'''", '"""') or len(quoted) < 3:  # triple-quoted, or empty
            continue
        assert quoted[0] == quoted[-1] == text[end - 1] and quoted[0] in "'\"", tok
        opened = start + prefix
        row = _row(text, name, end - 1, quoted[0], opened, context)
        if row is not None:
            before = text[end - 1 - len(row["prompt"]):opened]
            last = max(before.rfind("'"), before.rfind('"'))
            row["_before"] = "none" if last < 0 else "same" if before[last] == quoted[0] else "other"
            rows.append(row)
    return rows


def bracket_cuts(text: str, name: str = "<source>", context: int = 127, tokens=None) -> list[dict]:
    """bracket_counting prompts: each `]` closing a list display, cut after it, when the next character
    is `]` closing the enclosing list display (answer `]`) or a newline with nothing open (answer newline)."""
    rows = []
    stack: list[tuple[str, bool, int]] = []  # (opening bracket, is a list display, offset)
    previous = None  # the last significant token
    for tok, start, end in tokens if tokens is not None else _tokens(text):
        if tok.type in SKIPPED:
            continue
        if tok.type == tokenize.OP and tok.string in "([{":
            subscript = previous is not None and (
                (previous.type in NOT_BEFORE_A_LIST and not keyword.iskeyword(previous.string))
                or (previous.type == tokenize.OP and previous.string in ")]}"))
            stack.append((tok.string, tok.string == "[" and not subscript, start))
        elif tok.type == tokenize.OP and tok.string in CLOSERS:
            if not stack or stack[-1][0] != CLOSERS[tok.string]:
                raise SyntaxError(f"{name}: unbalanced {tok.string!r} at {tok.start}")
            _, is_list, opened = stack.pop()
            after = text[end:end + 1]
            if is_list and after == NESTED and stack and stack[-1][1]:
                row = _row(text, name, end, NESTED, stack[-1][2], context)
            elif is_list and after == FLAT and not stack:
                row = _row(text, name, end, FLAT, opened, context)
            else:
                row = None
            if row is not None:
                rows.append(row)
        previous = tok
    return rows


CUTTERS = {QUOTES: quote_cuts, BRACKETS: bracket_cuts}
TEST_PARTS = {"test", "tests", "idle_test"}  # the corpus leaves these packages out (EXCLUDED_PARTS)


def source_files(source: str, root: Path | None = None) -> list[tuple[str, Path]]:
    """(relative path, path) of the held-out files of the standard library ``root`` (default: this
    interpreter's, the default corpus): ``validation``, the corpus's validation split (by path hash);
    ``tests``, its test packages, which the corpus leaves out altogether."""
    root = Path(root) if root is not None else default_corpus_dir()
    if source == "validation":
        files = [p for p in python_files(root) if is_validation(p.relative_to(root).as_posix())]
    elif source == "tests":
        files = sorted((p for p in root.rglob("*.py") if p.is_file()
                        and TEST_PARTS.intersection(p.relative_to(root).parts[:-1])
                        and not EXCLUDED_PARTS.difference(TEST_PARTS).intersection(p.relative_to(root).parts)),
                       key=lambda p: p.relative_to(root).as_posix())
    else:
        raise UserError(f"unknown source {source!r} (validation or tests)")
    return [(p.relative_to(root).as_posix(), p) for p in files]


def cut_files(files: list[tuple[str, Path]], cap: int, seed: int = 0, contexts=(127,)) -> dict:
    """Every task's prompt set from ``files`` for each context length (bytes kept before a cut): at most
    ``cap // 2`` prompts per answer, drawn round-robin over the files (each file's cuts in a seeded random
    order), a prompt equal to an earlier one dropped. Returns {context: {task: (rows, counts)}}; a file
    ``tokenize`` rejects is skipped and named in the counts. Each file is tokenized once."""
    per_file = {(context, task): [] for context in contexts for task in CUTTERS}
    skipped = []
    for name, path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")  # as the corpus reads it
        try:
            tokens = _tokens(text)
            cuts = {(context, task): cutter(text, name, context, tokens)
                    for context in contexts for task, cutter in CUTTERS.items()}
        except (SyntaxError, tokenize.TokenError):
            skipped.append(name)
            continue
        for (context, task), rows in cuts.items():
            random.Random(f"off-template:{task}:{name}:{seed}").shuffle(rows)
            per_file[context, task].append(rows)
    return {context: {task: _round_robin(per_file[context, task], cap, len(files), skipped) for task in CUTTERS}
            for context in contexts}


def _round_robin(per_file: list[list[dict]], cap: int, n_files: int, skipped: list[str]) -> tuple[list[dict], dict]:
    answers = sorted({r["answer"] for rows in per_file for r in rows})
    available = {answer: sum(r["answer"] == answer for rows in per_file for r in rows) for answer in answers}
    chosen, seen = [], set()
    for answer in answers:
        queues = [[r for r in rows if r["answer"] == answer] for rows in per_file]
        taken = 0
        while taken < cap // 2 and any(queues):
            for queue in queues:
                if queue and taken < cap // 2:
                    row = queue.pop(0)
                    if row["prompt"] not in seen:
                        seen.add(row["prompt"])
                        chosen.append(row)
                        taken += 1
    return chosen, {"available": available, "taken": {a: sum(r["answer"] == a for r in chosen) for a in answers},
                    "files": n_files, "skipped_files": skipped}


def template_rows(task: str, n: int) -> list[dict]:
    """The task's first ``n`` held-out template prompts, as task-file lines."""
    return [{"prompt": e.prompt, "answer": e.correct, "alternative": e.alternative, "split": "heldout"}
            for e in cir.get_task(task).examples("heldout", n, 0)]


def write_task_file(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({k: v for k, v in row.items() if not k.startswith("_")}) + "\n"
                            for row in rows))
    return path


# ---------------------------------------------------------------- measuring

SOURCES = {"template": "the task's held-out template prompts",
           "validation": "the corpus's validation files (held out of pretraining by path hash)",
           "tests": "the standard library's test packages (left out of the corpus altogether)"}
MEASURES = ("circuit_loss", "circuit_acc", "sparse_loss", "sparse_acc", "dense_loss", "dense_acc",
            "agree_sparse", "agree_dense")


def measure_file(circuit, sparse, dense, path: Path) -> dict:
    """``check --prompts``'s measurement of one task file, once against each model."""
    with_sparse = prompt_agreement(circuit, sparse, str(path))
    with_dense = prompt_agreement(circuit, dense, str(path))
    assert abs(with_sparse["circuit"]["loss"] - with_dense["circuit"]["loss"]) < 1e-5  # the same circuit run twice
    return {"n": with_sparse["n"],
            "circuit_loss": with_sparse["circuit"]["loss"], "circuit_acc": with_sparse["circuit"]["accuracy"],
            "sparse_loss": with_sparse["model"]["loss"], "sparse_acc": with_sparse["model"]["accuracy"],
            "dense_loss": with_dense["model"]["loss"], "dense_acc": with_dense["model"]["accuracy"],
            "agree_sparse": with_sparse["agreement"], "agree_dense": with_dense["agreement"]}


def pooled(parts: list[dict]) -> dict:
    """Every measure is a mean over prompts, so the whole set's is the n-weighted mean of its parts'."""
    n = sum(part["n"] for part in parts)
    return {"n": n, **{key: sum(part["n"] * part[key] for part in parts) / n for key in MEASURES}}


def measure_groups(circuit, sparse, dense, rows: list[dict], key, directory: Path, stem: str) -> dict:
    """The figures of each group of ``rows`` (``key(row)``; each group's prompts a task file of its own)."""
    out = {}
    for group in sorted({key(row) for row in rows}):
        path = write_task_file([row for row in rows if key(row) == group], directory / f"{stem}-{group}.jsonl")
        out[group] = measure_file(circuit, sparse, dense, path)
    return out


def measure_set(circuit, sparse, dense, rows: list[dict], directory: Path, stem: str) -> dict:
    """The set's figures per answer and pooled; for quote prompts cut from code, also by the quote character
    before the string (``_before``: same, other, none)."""
    by_answer = measure_groups(circuit, sparse, dense, rows, lambda row: ANSWER_NAMES[row["answer"]], directory,
                               f"{stem}-answer")
    lengths = [len(row["prompt"].encode()) for row in rows]
    out = {"all": pooled(list(by_answer.values())), "by_answer": by_answer, "mean_bytes": sum(lengths) / len(lengths)}
    if all("_before" in row for row in rows):
        out["by_before"] = measure_groups(circuit, sparse, dense, rows, lambda row: row["_before"], directory,
                                          f"{stem}-before")
    return out


def held_out_check(sparse, root: Path, validation: list[tuple[str, Path]]) -> dict:
    """The validation files are the ones the model's own corpus record held out: same root, and the same
    number of validation tokens (bytes of the files joined by the corpus's two-byte separator)."""
    record = (sparse.meta or {}).get("corpus") or {}
    size = sum(len(path.read_bytes().decode("utf-8", errors="replace").encode()) for _, path in validation)
    tokens = size + 2 * (len(validation) - 1)
    same = record.get("root") == str(root) and record.get("validation_tokens") == tokens
    return {"root": str(root), "files": len(validation), "validation_tokens": tokens,
            "model_corpus": {k: record.get(k) for k in ("root", "sha256", "files", "validation_tokens")},
            "matches_model_corpus": same}


def run(sparse, dense, circuits: dict, *, cap: int = 512, seed: int = 0, context: int | None = None,
        control_context: int | None = 32, sources=("validation", "tests"), root: Path | None = None,
        prompts_dir: Path | None = None) -> dict:
    """Cut the prompt sets, write them, and measure every set with every circuit. ``circuits`` maps a task
    (single_double_quote, bracket_counting) to its Circuit; ``sparse`` and ``dense`` are LoadedModels.

    Each source is cut twice: with ``context`` bytes before the cut (default block_size - 1), and with
    ``control_context`` (default 32, about the templates' length; None or 0: not), the length control: a
    set named ``"<source> <n>B"``."""
    started = time.perf_counter()
    root = Path(root) if root is not None else default_corpus_dir()
    context = context if context is not None else sparse.config.block_size - 1
    contexts = [context] + ([control_context] if control_context and control_context != context else [])
    out = {"cap": cap, "seed": seed, "context_bytes": context, "control_context_bytes": contexts[1:],
           "sources": {}, "tasks": {}}
    cut = {}
    for source in sources:
        files = source_files(source, root)
        by_context = cut_files(files, cap, seed, contexts)
        for n, sets in by_context.items():
            cut[source if n == context else f"{source} {n}B"] = sets
        skipped = by_context[context][QUOTES][1]["skipped_files"]  # the same files for every task and length
        out["sources"][source] = {"files": len(files), "skipped": len(skipped)}
    out["held_out"] = held_out_check(sparse, root, source_files("validation", root))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for task, circuit in circuits.items():
            sets = {"template": (template_rows(task, cap), None)}
            for name in [*sources, *(f"{source} {n}B" for n in contexts[1:] for source in sources)]:
                rows, counts = cut[name][task]
                sets[name] = (rows, counts)
                if prompts_dir is not None:
                    stem = name.replace(" ", "_")
                    write_task_file(rows, Path(prompts_dir) / f"off_template_{task}_{stem}.jsonl")
            out["tasks"][task] = {}
            for name, (rows, counts) in sets.items():
                if not rows:
                    continue
                result = measure_set(circuit, sparse, dense, rows, tmp, f"{task}-{name}")
                result["counts"] = counts
                result["example"] = rows[0]
                out["tasks"][task][name] = result
    out["seconds"] = time.perf_counter() - started
    return out


# ---------------------------------------------------------------- printing

def print_report(out: dict) -> None:
    held = out["held_out"]
    print(f"held-out source: {held['files']} validation files under {held['root']} "
          f"({held['validation_tokens']:,} validation tokens; the model's corpus record: "
          f"{held['model_corpus']['validation_tokens']}) -> "
          + ("the same split the models were trained without" if held["matches_model_corpus"] else
             "WARNING: not the split recorded in the model (another interpreter's standard library?)"))
    for source, info in out["sources"].items():
        print(f"  {source}: {SOURCES[source]}; {info['files']} files, {info['skipped']} rejected by tokenize")
    print(f"prompts: the last {out['context_bytes']} bytes before the cut; at most {out['cap'] // 2} per answer"
          + "".join(f"; '<source> {n}B': the length control, {n} bytes (about the templates' length)"
                    for n in out["control_context_bytes"]))
    header = (f"{'task':>19} {'prompts':>14} {'answer':>7} {'n':>4} {'bytes':>5} | {'sparse loss':>11} {'acc':>5} | "
              f"{'dense loss':>10} {'acc':>5} | {'circuit loss':>12} {'acc':>5} | {'agree sparse':>12} {'dense':>5}")
    print()
    print(header)
    for task, sets in out["tasks"].items():
        for name, result in sets.items():
            rows = [("all", result["all"])] + list(result["by_answer"].items())
            for answer, r in rows:
                few = "*" if r["n"] < 32 else " "
                size = f"{result['mean_bytes']:.0f}" if answer == "all" else ""
                print(f"{task if name == 'template' and answer == 'all' else '':>19} "
                      f"{name if answer == 'all' else '':>14} {answer!s:>7} {r['n']:>4}{few}{size:>5} | "
                      f"{r['sparse_loss']:>11.4f} {r['sparse_acc']:>5.3f} | "
                      f"{r['dense_loss']:>10.4f} {r['dense_acc']:>5.3f} | "
                      f"{r['circuit_loss']:>12.4f} {r['circuit_acc']:>5.3f} | {r['agree_sparse']:>12.3f} "
                      f"{r['agree_dense']:>5.3f}")
        print()
    print("agree: fraction of prompts on which the circuit and that model prefer the same answer; "
          "* fewer than 32 prompts; bytes: mean prompt length")
    for task, sets in out["tasks"].items():
        split = {name: result["by_before"] for name, result in sets.items() if "by_before" in result}
        if split:
            print(f"\n{task}, by the last quote character before the string's opening quote (same kind, the other "
                  "kind, none in the prompt):")
            print(f"{'prompts':>14} {'before':>7} {'n':>4} | {'sparse acc':>10} {'dense acc':>9} {'circuit acc':>11} | "
                  f"{'agree sparse':>12} {'dense':>5}")
            for name, groups in split.items():
                for group, r in groups.items():
                    print(f"{name:>14} {group:>7} {r['n']:>4} | {r['sparse_acc']:>10.3f} {r['dense_acc']:>9.3f} "
                          f"{r['circuit_acc']:>11.3f} | {r['agree_sparse']:>12.3f} {r['agree_dense']:>5.3f}")
    print()
    for task, sets in out["tasks"].items():
        for name, result in sets.items():
            if name != "template":
                available = ", ".join(f"{ANSWER_NAMES[a]} {n}" for a, n in result["counts"]["available"].items())
                print(f"  {task} {name}: cuts available {available}")


def plot(out: dict, path) -> None:
    """Per task and answer: accuracy of the sparse model, the dense model and the circuit, and the
    circuit's agreement with the sparse model, on every prompt set."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [(task, answer) for task, sets in out["tasks"].items() for answer in sets["template"]["by_answer"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), sharey=True)
    bars = (("sparse_acc", "sparse model", "tab:blue"), ("dense_acc", "dense model", "tab:orange"),
            ("circuit_acc", "circuit alone", "tab:green"), ("agree_sparse", "circuit agrees with sparse", "tab:grey"))
    for ax, (task, answer) in zip(np.atleast_1d(axes), panels):
        names = [name for name, result in out["tasks"][task].items() if answer in result["by_answer"]]
        x = np.arange(len(names))
        for i, (key, label, colour) in enumerate(bars):
            ax.bar(x + (i - 1.5) * 0.2, [out["tasks"][task][name]["by_answer"][answer][key] for name in names], 0.2,
                   color=colour, label=label)
        ax.set_xticks(x, [f"{name}\nn={out['tasks'][task][name]['by_answer'][answer]['n']}" for name in names],
                      fontsize=7)
        ax.axhline(0.5, color="grey", lw=0.6)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{task}: {answer if answer in ('nested', 'flat') else 'closing ' + answer}", fontsize=9)
    np.atleast_1d(axes)[0].set_ylabel("accuracy / agreement")
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Off the templates: held-out standard-library code cut to {out['context_bytes']} bytes "
                 f"(and {', '.join(str(n) for n in out['control_context_bytes'])}), beside the task's templates",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparse", default=str(ROOT / "models" / "sparse.pt"))
    parser.add_argument("--dense", default=str(ROOT / "models" / "dense.pt"))
    parser.add_argument("--quotes-circuit", default=str(ROOT / "examples" / "sparse-quotes.cir"))
    parser.add_argument("--brackets-circuit", default=str(ROOT / "examples" / "sparse-brackets.cir"))
    parser.add_argument("--cap", type=int, default=512, help="prompts per set at most (half per answer)")
    parser.add_argument("--context", type=int, help="bytes of context kept before a cut (default block_size - 1)")
    parser.add_argument("--control-context", type=int, default=32, help="the length control: each source cut "
                        "again with this many bytes, about the templates' length (0: not)")
    parser.add_argument("--sources", default="validation,tests",
                        help="held-out real code: validation (the corpus's validation files), tests (the "
                        "standard library's test packages, never in the corpus)")
    parser.add_argument("--root", help="the standard library to cut from (default: this interpreter's, the "
                        "models' corpus)")
    parser.add_argument("--prompts-dir", help="write the real-code prompt sets here as task files "
                        "(off_template_<task>_<source>.jsonl, for `circuitir check --prompts`)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot", default=str(ROOT / "benchmarks" / "off_template.png"),
                        help="write the figure here ('' for none)")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        sparse, dense = cir.load_model(args.sparse), cir.load_model(args.dense)
        sparse.model.eval()
        dense.model.eval()
        circuits = {QUOTES: cir.load(args.quotes_circuit), BRACKETS: cir.load(args.brackets_circuit)}
        out = run(sparse, dense, circuits, cap=args.cap, seed=args.seed, context=args.context,
                  control_context=args.control_context, sources=[s for s in args.sources.split(",") if s],
                  root=args.root, prompts_dir=args.prompts_dir or None)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out["inputs"] = {"sparse": args.sparse, "dense": args.dense, "quotes_circuit": args.quotes_circuit,
                     "brackets_circuit": args.brackets_circuit, "prompts_dir": args.prompts_dir}
    print_report(out)
    print(f"({out['seconds']:.0f} s)")
    write_results(out, plot, args.plot, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
