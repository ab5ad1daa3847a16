"""The ``circuitir`` command. It only parses arguments and calls the library.

Bad input (a :class:`~circuitir.errors.UserError`) ends with one line on
stderr and exit code 2; Ctrl-C with exit code 130; a closed output pipe
(``| head``) with exit code 141 and no message. Commands that write files
write them atomically, so neither leaves anything half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from circuitir.errors import UserError

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


# ---------------------------------------------------------------- commands

def cmd_train(args) -> int:
    import torch

    from circuitir.models.train import PRESETS, Recipe, load_for_resume, train

    if args.resume:
        recipe = load_for_resume(args.resume)
    else:
        if args.preset not in PRESETS:
            raise UserError(f"unknown preset {args.preset!r} (known: {', '.join(PRESETS)})")
        recipe = Recipe(**PRESETS[args.preset].to_dict())
        for name in ("steps", "batch_size", "lr", "density", "seed", "task_mix", "corpus"):
            value = getattr(args, name)
            if value is not None:
                setattr(recipe, name, value)
        recipe.dense = args.dense
        if recipe.dense:
            recipe.density = recipe.embed_density = 1.0
        if not 0 < recipe.density <= 1:
            raise UserError(f"--density must be in (0, 1], got {recipe.density}")
    if args.threads:
        torch.set_num_threads(args.threads)
    log_file = open(args.log, "a") if args.log else None

    def log(record):
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    metrics = train(recipe, args.output, resume=args.resume, progress=not args.quiet, log=log)
    if args.json:
        print_json(metrics)
    else:
        print(f"wrote {args.output}: validation loss {metrics['val_loss']:.4f}")
        for name, row in metrics["tasks"].items():
            print(f"  {name:28s} loss {row['loss']:.4f}  accuracy {row['accuracy']:.3f}")
    return 0


def cmd_eval(args) -> int:
    from circuitir.models.checkpoint import load_model
    from circuitir.tasks import TASKS, get_task
    from circuitir.tasks.evaluate import evaluate_model

    loaded = load_model(args.model)
    names = list(TASKS) if args.task == "all" else [get_task(args.task).name]
    if loaded.tokenizer is None:
        raise UserError(f"{args.model} has a {loaded.config.vocab_size}-token vocabulary and no tokenizer; "
                        "circuitir reads only byte-level models without one")
    rows = [evaluate_model(loaded.model, TASKS[name], loaded.tokenizer, args.split, args.n, args.seed)
            for name in names]
    if args.json:
        print_json(rows[0] if len(rows) == 1 else rows)
    else:
        print(f"{'task':28s} {'loss':>8s} {'accuracy':>9s} {'n':>6s}")
        for row in rows:
            print(f"{row['task']:28s} {row['loss']:8.4f} {row['accuracy']:9.3f} {row['n']:6d}")
    return 0


def cmd_tasks(args) -> int:
    from circuitir.tasks import TASKS

    rows = []
    for task in TASKS.values():
        example = task.examples("heldout", 1, seed=0)[0]
        rows.append({"task": task.name, "aliases": list(task.aliases), "description": task.description,
                     "prompt": example.prompt, "correct": example.correct, "alternative": example.alternative})
    if args.json:
        print_json(rows)
        return 0
    for row in rows:
        alias = f" (alias: {', '.join(row['aliases'])})" if row["aliases"] else ""
        print(f"{row['task']}{alias}: {row['description']}")
        print(f"    prompt ...{row['prompt'][-40:]!r}  correct {row['correct']!r}  alternative {row['alternative']!r}")
    return 0


def cmd_fmt(args) -> int:
    from circuitir.grammar import CirSyntaxError, format_text
    from circuitir.models.checkpoint import atomic_write_text

    try:
        text = open(args.file, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {args.file}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        formatted = format_text(text, args.file)
    except CirSyntaxError as exc:
        # The located report (file:line:col, the line, a caret, what was expected) as compilers print it.
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    if args.check:
        if formatted != text:
            print(f"{args.file}: not in canonical form (run `circuitir fmt -i {args.file}`)", file=sys.stderr)
            return 1
    elif args.in_place:
        if formatted != text:
            mode = os.stat(args.file).st_mode & 0o7777
            atomic_write_text(args.file, formatted)
            os.chmod(args.file, mode)  # the temporary file was created 0600
    else:
        sys.stdout.write(formatted)
    return 0


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="circuitir",
        description="Compile, run and verify the circuits inside weight-sparse transformers.",
        epilog="Bad input exits with code 2 and one line saying what is wrong.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a weight-sparse (or --dense) model on Python source",
                       description="Weight-sparse pretraining (PAPER.md recipe). Writes a checkpoint that "
                                   "records config, tokenizer, corpus hash, recipe, seed and metrics.")
    p.add_argument("-o", "--output", required=True, help="checkpoint to write (.pt)")
    p.add_argument("--preset", default="small", help="recipe preset: tiny (seconds) or small (the shipped "
                                                     "models, about an hour) [default: small]")
    p.add_argument("--dense", action="store_true", help="train densely: the baseline for sparse-vs-dense")
    p.add_argument("--steps", type=int, help="optimiser steps")
    p.add_argument("--batch-size", type=int, help="sequences per step")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--density", type=float, help="target fraction of nonzero weights in hidden matrices")
    p.add_argument("--task-mix", type=float, help="fraction of sequences drawn from train-split task text")
    p.add_argument("--corpus", help="directory of .py files [default: this Python's standard library]")
    p.add_argument("--seed", type=int, help="random seed (same seed, same weights)")
    p.add_argument("--resume", help="continue an interrupted run from its checkpoint")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--log", help="append one JSON line per evaluation to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print final metrics as JSON")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("eval", help="task loss and accuracy of a model",
                       description="Binary cross-entropy between the correct and alternative next token at "
                                   "the last position (the paper's task loss), and accuracy, on held-out prompts.")
    p.add_argument("model", help="checkpoint (.pt) or OpenAI release directory")
    p.add_argument("--task", required=True, help="task name or alias, or 'all' (see `circuitir tasks`)")
    p.add_argument("--split", default="heldout", choices=["heldout", "train"])
    p.add_argument("-n", type=int, default=512, help="number of prompts [default: 512]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print {task, loss, accuracy, n}")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("tasks", help="list the tasks with one example each")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_tasks)

    p = sub.add_parser("fmt", help="print a .cir file in canonical form",
                       description="Parse a circuit and print it in canonical form (comments kept). A file that "
                                   "does not parse gets a file:line:col report and exit code 2.")
    p.add_argument("file", help=".cir file")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="print nothing; exit 1 if the file is not canonical")
    mode.add_argument("-i", "--in-place", action="store_true", help="rewrite the file (atomically) if it changes")
    p.set_defaults(run=cmd_fmt)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    command = "circuitir"
    try:
        try:
            args = parser.parse_args(argv)
            command = f"circuitir {args.command}"
            return args.run(args)
        finally:
            # A reader that went away (`circuitir tasks | head`) shows up here, not at interpreter exit.
            sys.stdout.flush()
    except UserError as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Stop quietly, as a tool killed by SIGPIPE would; point stdout at /dev/null so the
        # interpreter's own final flush does not raise again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a real file (captured, replaced)
            pass
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
