"""Tasks the user brings: a JSON-lines file of contrastive prompts (``--task-file T.jsonl``).

One JSON object per line::

    {"prompt": "x = 'hello", "answer": "'", "alternative": "\\"", "split": "heldout"}

``prompt``, ``answer`` and ``alternative`` are non-empty strings (as for the
built-in tasks, only the first token of each answer counts); ``split``
(``train`` or ``heldout``) is optional: a line without one goes where the
built-in tasks would put its prompt (a hash of its text, one in four held
out), so a prompt's split never depends on the file around it. ``completion``
and ``id`` may be given and are ignored; blank lines are skipped. Anything else
is an error naming the line.

A :class:`FileTask` behaves like the registry's :class:`~circuitir.tasks.Task`
(``name``, ``description``, ``aliases``, ``examples(split, n, seed)``), so
eval, extract, check and diff take it unchanged. Its name carries the file's
SHA-256 (``file:quotes@1f2e3d4c5b6a7988``), so the circuit header that records
the task name records which file it was, and :func:`register_task_file` makes
:func:`circuitir.tasks.get_task` resolve that name only when the same file is
given again: a circuit extracted on one file cannot be checked on another.
:func:`as_recorded` is that comparison for ``check``: the full SHA-256 the
circuit's header records, not the name's 16 hex digits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from circuitir.errors import UserError
from circuitir.tasks import SPLITS, Example, Task, split_of

FILE_TASK_PREFIX = "file:"
REQUIRED_KEYS = ("prompt", "answer", "alternative")
OPTIONAL_KEYS = ("split", "completion", "id")
HASH_CHARS = 16  # of the SHA-256 in the task name: 64 bits, enough that two files never share one


def _no_generator(rng):
    raise UserError("a task file's prompts are fixed; it has no generator of new pairs")


@dataclass(frozen=True)
class FileTask(Task):
    """A :class:`~circuitir.tasks.Task` whose examples are the lines of a file (so ``isinstance`` holds)."""
    make_pair: object = _no_generator
    path: str = ""
    sha256: str = ""
    lines: tuple[tuple[int, Example, str], ...] = field(default=(), repr=False)  # (line number, example, split)

    def examples(self, split: str = "heldout", n: int = 256, seed: int = 0) -> list[Example]:
        """Up to ``n`` examples of ``split`` in an order fixed by ``seed`` (all of them when the file has
        fewer than ``n``)."""
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r} (use one of: {', '.join(SPLITS)})")
        pool = [example for _, example, where in self.lines if where == split]
        if not pool:
            raise UserError(f"task file {self.path} has no {split} prompts; mark some lines "
                            f"\"split\": \"{split}\" (lines without a split are assigned by a hash of the prompt)")
        random.Random(f"{self.name}:{seed}").shuffle(pool)
        return pool[:n]

    def contrast_pairs(self, split: str, n: int) -> list[tuple[Example, Example]]:
        """(example, partner) pairs for ``steer``, which a generated task makes with its generator: each
        ``split`` line in file order, with the line of the file (any split) whose answers are its own
        swapped and whose prompt has as many characters, the one that differs from it in the fewest
        characters (a generated partner differs only where the answer is decided). Lines without one are
        left out."""
        by_shape: dict[tuple, list[Example]] = {}  # (answer, alternative, prompt length) -> lines, file order
        for _, example, _ in self.lines:
            by_shape.setdefault((example.correct, example.alternative, len(example.prompt)), []).append(example)
        out = []
        for _, example, where in self.lines:
            if len(out) >= n:
                break
            partners = by_shape.get((example.alternative, example.correct, len(example.prompt)))
            if where == split and partners:
                out.append((example, min(partners, key=lambda p: sum(a != b for a, b in zip(p.prompt,
                                                                                             example.prompt)))))
        return out

    def spec(self) -> dict:
        """The task's identity, for a circuit header: the file's name and full SHA-256."""
        return {"name": self.name, "file": Path(self.path).name, "sha256": self.sha256}

    def answer_collisions(self, tokenizer) -> list[int]:
        """Line numbers whose answer and alternative start with the same token under ``tokenizer``."""
        out = []
        for number, example, _ in self.lines:
            good, bad = tokenizer.encode(example.correct), tokenizer.encode(example.alternative)
            if good[:1] == bad[:1]:
                out.append(number)
        return out

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse the file if any line's two answers collide under this tokenizer, naming the lines."""
        lines = self.answer_collisions(tokenizer)
        if lines:
            shown = ", ".join(str(n) for n in lines[:8]) + (f" and {len(lines) - 8} more" if len(lines) > 8 else "")
            first = next(e for n, e, _ in self.lines if n == lines[0])
            raise UserError(f"task file {self.path}: on line{'s' if len(lines) > 1 else ''} {shown} the answer and "
                            "the alternative start with the same token under this model's tokenizer (line "
                            f"{lines[0]}: {first.correct!r} vs {first.alternative!r} both start with "
                            f"{tokenizer.token_str(tokenizer.encode(first.correct)[0])!r}), so the task cannot "
                            "be measured there; change or remove those lines")


def _parse_line(path: str, number: int, text: str) -> tuple[Example, str]:
    where = f"task file {path}:{number}"
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object with {', '.join(REQUIRED_KEYS)}")
    unknown = sorted(set(row) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} (a line holds {', '.join(REQUIRED_KEYS)} and "
                        f"optionally {', '.join(OPTIONAL_KEYS)})")
    for key in REQUIRED_KEYS:
        if key not in row:
            raise UserError(f"{where}: missing {key!r}")
        if not isinstance(row[key], str) or not row[key]:
            raise UserError(f"{where}: {key!r} must be a non-empty string, got {row[key]!r}")
    if row["answer"] == row["alternative"]:
        raise UserError(f"{where}: the answer and the alternative are the same text {row['answer']!r}")
    split = row.get("split")
    if split is None:
        split = split_of(row["prompt"])
    elif split not in SPLITS:
        raise UserError(f"{where}: split must be one of {', '.join(SPLITS)}, got {split!r}")
    completion = row.get("completion", "")
    example = Example(row["prompt"], row["answer"], row["alternative"], completion if isinstance(completion, str) else "")
    return example, split


def load_task_file(path: str | Path) -> FileTask:
    """Read and check a task file; every malformed line is reported with its number."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read task file {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"task file {path}: not UTF-8 text (byte {exc.start})") from None
    lines, seen = [], {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        example, split = _parse_line(str(path), number, line)
        if example.prompt in seen:
            raise UserError(f"task file {path}:{number}: the same prompt as line {seen[example.prompt]}")
        seen[example.prompt] = number
        lines.append((number, example, split))
    if not lines:
        raise UserError(f"task file {path} has no prompts (one JSON object per line: "
                        f"{', '.join(REQUIRED_KEYS)}, optional split)")
    sha256 = hashlib.sha256(data).hexdigest()
    counts = {s: sum(1 for _, _, where in lines if where == s) for s in SPLITS}
    name = f"{FILE_TASK_PREFIX}{path.stem}@{sha256[:HASH_CHARS]}"
    description = (f"prompts from {path.name} ({counts['train']} train, {counts['heldout']} held out; "
                   f"sha256 {sha256[:12]}...)")
    return FileTask(name=name, description=description, path=str(path), sha256=sha256, lines=tuple(lines))


def register_task_file(path: str | Path) -> FileTask:
    """Load a task file and make :func:`circuitir.tasks.get_task` resolve its name."""
    from circuitir.tasks import FILE_TASKS
    task = load_task_file(path)
    FILE_TASKS[task.name] = task
    return task


def as_recorded(task: FileTask, provenance, circuit_path: str = "the circuit") -> FileTask:
    """``task`` (given with ``--task-file``) as the circuit with this :class:`~circuitir.ir.provenance.Provenance`
    was extracted on it, or one line saying it is another file. The same file means the same bytes: the full
    SHA-256 the header's task group records (a header without one is compared by name, which carries the
    first 16 hex digits). The same bytes under another file name become the recorded task, name included,
    so its prompts come in the order extraction saw them (the order is seeded by the name)."""
    from circuitir.tasks import FILE_TASKS
    recorded_sha = provenance.task_spec.get("sha256")
    recorded_sha = recorded_sha if isinstance(recorded_sha, str) and recorded_sha else None
    same = task.sha256 == recorded_sha if recorded_sha else task.name == provenance.task
    if not same:
        theirs = f" (sha256 {recorded_sha[:12]}..., {task.path} has {task.sha256[:12]}...)" if recorded_sha else ""
        raise UserError(f"{circuit_path} was extracted for task {provenance.task!r}{theirs}, and {task.path} is "
                        f"{task.name!r} (another file, or the file changed); check it on its own task file")
    if task.name != provenance.task:
        task = dataclasses.replace(task, name=provenance.task)
        FILE_TASKS[task.name] = task
    return task
