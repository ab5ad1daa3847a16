"""The paper's binary next-token tasks on Python code.

Each task is a seeded generator of *contrastive pairs*: two prompts that
differ in one place, each with a correct next token and the alternative (the
other prompt's answer). Task loss is the paper's: binary cross-entropy over
{correct, alternative} at the last position, averaged over prompts.

Splits are disjoint by construction: a prompt belongs to the held-out split
when a hash of its text says so, whatever seed produced it, so no held-out
prompt can ever appear in training data generated from the train split.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable

from circuitir.errors import UserError

SPLITS = ("train", "heldout")
HELDOUT_EVERY = 4  # one prompt in four is held out


@dataclass(frozen=True)
class Example:
    prompt: str
    correct: str       # the continuation the task asks for (its first token is what counts)
    alternative: str   # the contrasting continuation
    completion: str    # text that naturally follows the correct answer (for corpus mixing)


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    make_pair: Callable[[random.Random], tuple[Example, Example]]
    aliases: tuple[str, ...] = ()

    def examples(self, split: str = "heldout", n: int = 256, seed: int = 0) -> list[Example]:
        """``n`` distinct examples of ``split``, deterministic in ``seed``; pairs stay together."""
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r} (use one of: {', '.join(SPLITS)})")
        rng = random.Random(f"{self.name}:{seed}")
        out, seen = [], set()
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 200 * n + 1000:
                raise UserError(f"task {self.name}: cannot generate {n} distinct {split} examples")
            for example in self.make_pair(rng):
                key = example.prompt
                if key in seen or split_of(key) != split:
                    continue
                seen.add(key)
                out.append(example)
        return out[:n]

    def check_tokenizer(self, tokenizer, n: int = 64) -> None:
        """Refuse, before any work, a task whose two answers start with the same token under ``tokenizer``
        (on the first ``n`` examples of each split: every answer pair a built-in task has)."""
        for split in SPLITS:
            for example in self.examples(split, n, seed=0):
                answer_tokens(self.name, example, tokenizer)


def first_token(tokenizer, text: str) -> int:
    tokens = tokenizer.encode(text)
    if not tokens:
        raise UserError(f"task: empty answer {text!r}")
    return tokens[0]


def answer_tokens(name: str, example: Example, tokenizer) -> tuple[int, int]:
    """The first tokens of the example's answer and alternative (what the task compares), or one line if
    they are the same token: then the task cannot be measured under this tokenizer."""
    good, bad = first_token(tokenizer, example.correct), first_token(tokenizer, example.alternative)
    if good == bad:
        raise UserError(f"task {name}: answers {example.correct!r} and {example.alternative!r} both start with "
                        f"the token {tokenizer.token_str(good)!r} under this model's tokenizer, so the task "
                        "cannot be measured on it")
    return good, bad


def split_of(prompt: str) -> str:
    digest = hashlib.sha256(prompt.encode()).digest()
    return "heldout" if digest[0] % HELDOUT_EVERY == 0 else "train"


# ---------------------------------------------------------------- vocabulary

NAMES = ["x", "y", "s", "val", "name", "data", "items", "result", "key", "out", "text", "buf",
         "acc", "line", "parts", "seen", "total", "row", "cur", "tmp", "word", "chars", "msg", "path"]
WORDS = ["hello", "world", "foo", "bar", "error", "value", "done", "ok", "name", "path", "data",
         "utf-8", "spam", "eggs", "true", "none", "test", "file", "line", "key", "abc", "x y"]
FUNCS = ["main", "run", "load", "parse", "check", "update", "build", "handle", "process", "read"]
CONDS = ["x", "not done", "n > 0", "key in seen", "flag", "i < n", "self.ready", "value is None", "ok"]


def preamble(rng: random.Random) -> str:
    """A short, varied line or two of ordinary code before the part that matters."""
    choice = rng.randrange(5)
    if choice == 0:
        return ""
    if choice == 1:
        return f"import {rng.choice(['os', 'sys', 're', 'json'])}\n"
    if choice == 2:
        return f"{rng.choice(NAMES)} = {rng.randrange(100)}\n"
    if choice == 3:
        return f"# {rng.choice(WORDS)} {rng.choice(WORDS)}\n"
    return f"def {rng.choice(FUNCS)}({rng.choice(NAMES)}):\n    pass\n"


def number_list(rng: random.Random, lo: int = 1, hi: int = 4) -> str:
    return ", ".join(str(rng.randrange(10)) for _ in range(rng.randint(lo, hi)))


def pair(a: tuple[str, str, str], b: tuple[str, str, str]) -> tuple[Example, Example]:
    """Two prompts whose answers are each other's alternative."""
    (pa, ca, ta), (pb, cb, tb) = a, b
    return Example(pa, ca, cb, ta), Example(pb, cb, ca, tb)


# ---------------------------------------------------------------- generators

def single_double_quote(rng):
    head = preamble(rng) + f"{rng.choice(NAMES)} = "
    body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
    return pair((f'{head}"{body}', '"', "\n"), (f"{head}'{body}", "'", "\n"))


def bracket_counting(rng):
    head = preamble(rng) + f"{rng.choice(NAMES)} = "
    inner = number_list(rng)
    return pair((f"{head}[[{inner}]", "]", "\n"), (f"{head}[{inner}]", "\n", ""))


def _set_or_string(rng, name):
    head = preamble(rng)
    var = rng.choice(["c", "w", "item"])
    loop = f"for {var} in {rng.choice(['data', 'items', 'words', 'text'])}:\n    "
    return pair((f"{head}{name} = set()\n{loop}{name}", ".", f"add({var})\n"),
                (f'{head}{name} = ""\n{loop}{name}', " ", f"+= {var}\n"))


def set_or_string(rng):
    return _set_or_string(rng, rng.choice(NAMES))


def set_or_string_fixedvarname(rng):
    return _set_or_string(rng, "x")


def while_return_true(rng):
    head = preamble(rng) + f"def {rng.choice(FUNCS)}():\n"
    return pair((f"{head}    while True", ":", "\n        pass\n"), (f"{head}    return True", "\n", ""))


def else_elif(rng):
    cond = rng.choice(CONDS)
    head = preamble(rng) + f"if {cond}:\n    {rng.choice(NAMES)} = {rng.randrange(10)}\n"
    return pair((f"{head}else", ":", "\n    pass\n"), (f"{head}elif", " ", f"{rng.choice(CONDS)}:\n    pass\n"))


def if_ternary(rng):
    cond = rng.choice(CONDS)
    name = rng.choice(NAMES)
    head = preamble(rng) + f"def {rng.choice(FUNCS)}({name}):\n"
    return pair((f"{head}    y = {name} if {cond}", " ", "else 0\n"),
                (f"{head}    if {cond}", ":", f"\n        return {name}\n"))


def bracket_brace(rng):
    head = preamble(rng) + f"{rng.choice(NAMES)} = "
    inner = number_list(rng)
    return pair((f"{head}({inner}", ")", "\n"), (f"{head}[{inner}", "]", "\n"))


TASKS: dict[str, Task] = {}
# Tasks read from the user's files (circuitir.tasks.task_file), by their name, which carries the file's hash.
FILE_TASKS: dict = {}


def register(task: Task) -> None:
    TASKS[task.name] = task


register(Task("single_double_quote", "close a string with the quote that opened it (\" vs ')",
              single_double_quote, aliases=("quotes",)))
register(Task("bracket_counting", "after a list closes: nested `[[..]` needs `]`, flat `[..]` a newline",
              bracket_counting, aliases=("brackets",)))
register(Task("set_or_string", "a variable set to set() gets `.add`, one set to \"\" gets ` +=`",
              set_or_string))
register(Task("set_or_string_fixedvarname", "set_or_string with the variable always named x",
              set_or_string_fixedvarname))
register(Task("while_return_true", "`while True` is followed by `:`, `return True` by a newline",
              while_return_true))
register(Task("else_elif", "`else` is followed by `:`, `elif` by a space and a condition",
              else_elif))
register(Task("if_ternary", "`y = a if c` continues with ` else`, a statement `if c` with `:`",
              if_ternary))
register(Task("bracket_brace", "close an open `(` with `)` and an open `[` with `]`",
              bracket_brace))


def check_task_tokens(tasks, tokenizer) -> None:
    """A task whose answers collide under the model's tokenizer says so before any work (a task file, which
    lines)."""
    for task in tasks:
        task.check_tokenizer(tokenizer)


def get_task(name: str) -> Task:
    if name.startswith("file:"):
        if name in FILE_TASKS:
            return FILE_TASKS[name]
        given = ", ".join(f"{t.path} ({t.name})" for t in FILE_TASKS.values())
        raise UserError(f"task {name!r} comes from a task file (the part after @ is the start of its SHA-256); "
                        + (f"the task file given, {given}, is another file" if given else
                           "give that file with --task-file"))
    for task in TASKS.values():
        if name == task.name or name in task.aliases:
            return task
    known = ", ".join(f"{t.name}" + (f" ({'/'.join(t.aliases)})" if t.aliases else "") for t in TASKS.values())
    raise UserError(f"unknown task {name!r}; known tasks: {known} (see `circuitir tasks`)")
