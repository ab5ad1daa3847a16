"""The ``circuitir`` command. It only parses arguments and calls the library.

Bad input (a :class:`~circuitir.errors.UserError`) ends with one line on
stderr and exit code 2; Ctrl-C with exit code 130; a closed output pipe
(``| head``) with exit code 141 and no message. Commands that write files
write them atomically, so neither leaves anything half-written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time

from circuitir.errors import UserError
from circuitir.tasks import check_task_tokens

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left


def show_progress(args) -> bool:
    """Progress bars on a terminal only: not with --quiet or --json, and not into a log file or
    pipe, where every refresh would add a line."""
    return not (getattr(args, "quiet", False) or getattr(args, "json", False)) and sys.stderr.isatty()


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


# ---------------------------------------------------------------- argument checks

MAX_COUNT = 10_000_000  # prompts, steps, sequences per step: beyond this a run would not end
# option attribute -> (flag, low, high); whole numbers
COUNTS = {"n": ("-n", 1, MAX_COUNT), "steps": ("--steps", 1, MAX_COUNT), "batch_size": ("--batch-size", 1, MAX_COUNT),
          "threads": ("--threads", 1, 4096), "seed": ("--seed", 0, 2 ** 32 - 1),
          "windows": ("--windows", 1, MAX_COUNT), "encoder_k": ("--encoder-k", 1, 1 << 20),
          "eval_every": ("--eval-every", 1, MAX_COUNT), "keep_every": ("--keep-every", 0, MAX_COUNT)}
# option attribute -> (flag, low, high, low excluded); finite numbers
NUMBERS = {"lr": ("--lr", 0.0, 10.0, True), "density": ("--density", 0.0, 1.0, True),
           "task_mix": ("--task-mix", 0.0, 1.0, False), "target_loss": ("--target-loss", 0.0, 100.0, True),
           "necessity_loss": ("--necessity-loss", 0.0, 100.0, False), "tolerance": ("--tolerance", 0.0, 1e30, False),
           "nmse_weight": ("--nmse-weight", 0.0, 1e6, False), "kl_weight": ("--kl-weight", 0.0, 1e6, False),
           "lm_weight": ("--lm-weight", 0.0, 1e6, False)}


def check_numbers(args) -> None:
    """Every number option in range (argparse has checked the spelling): one line, before any work."""
    for name, (flag, low, high) in COUNTS.items():
        value = getattr(args, name, None)
        if value is not None and not low <= value <= high:
            raise UserError(f"{flag} must be a whole number from {low} to {high:,}, got {value}")
    for name, (flag, low, high, low_open) in NUMBERS.items():
        value = getattr(args, name, None)
        if value is not None and (not math.isfinite(value) or not low <= value <= high or (low_open and value == low)):
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise UserError(f"{flag} must be a finite number in {interval}, got {value}")


def check_output_path(path: str, what: str = "output") -> None:
    """Refuse an output path that cannot be written, before any long work: a directory, or a place where
    no file can be created (tried: root passes every permission check). Missing folders are created when
    the file is written, so the nearest existing one is tried."""
    import tempfile

    if os.path.isdir(path):
        raise UserError(f"cannot write {what} {path}: it is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"cannot write {what} {path}: {parent} is not a directory")
    try:
        handle, probe = tempfile.mkstemp(prefix=".circuitir-probe.", dir=parent)
    except OSError as exc:
        raise UserError(f"cannot write {what} {path}: {exc.strerror} ({parent})") from None
    os.close(handle)
    os.unlink(probe)


def check_device(args) -> None:
    """--device names a device torch can use here (`cuda` without a GPU is one line), before any work."""
    if getattr(args, "device", None) is not None:
        from circuitir.models.device import resolve_device
        resolve_device(args.device)


def check_prompts(prompts: list[str]) -> None:
    """Prompts come from the command line; bytes that are not UTF-8 arrive as lone surrogates."""
    for i, prompt in enumerate(prompts, start=1):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"prompt {i} is not valid UTF-8 text") from None


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every ``finally`` (temporary files) runs."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _forget_keyboard_interrupt() -> None:
    """Let a caught Ctrl-C exit with 130 under ``python -m circuitir``, too.

    CPython notes a KeyboardInterrupt that ends a *string* ``exec``/``eval`` (``PyRun_String``; torch and
    the standard library run some at import and in generated code) as unhandled even when a caller
    catches it, and under ``-m`` the interpreter then kills itself with SIGINT at exit (status -2)
    instead of returning our code. Every string eval clears that note first, so one empty eval does."""
    exec("", {})


# ---------------------------------------------------------------- commands

def cmd_train(args) -> int:
    from circuitir.models.train import PRESETS, Recipe, load_for_resume, train

    if args.resume:
        recipe = load_for_resume(args.resume)
    else:
        if args.preset not in PRESETS:
            raise UserError(f"unknown preset {args.preset!r} (known: {', '.join(PRESETS)})")
        recipe = Recipe(**PRESETS[args.preset].to_dict())
        for name in ("steps", "batch_size", "lr", "density", "seed", "task_mix", "corpus", "eval_every"):
            value = getattr(args, name)
            if value is not None:
                setattr(recipe, name, value)
        recipe.dense = args.dense
        if recipe.dense:
            recipe.density = recipe.embed_density = 1.0
        if not 0 < recipe.density <= 1:
            raise UserError(f"--density must be in (0, 1], got {recipe.density}")
    check_output_path(args.output, "the checkpoint")
    if args.log:
        check_output_path(args.log, "the log")
    try:
        log_file = open(args.log, "a") if args.log else None
    except OSError as exc:
        raise UserError(f"cannot write the log {args.log}: {exc.strerror}") from None

    def log(record):
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    metrics = train(recipe, args.output, resume=args.resume, progress=show_progress(args), log=log,
                    device=args.device, dtype=args.dtype, keep_every=args.keep_every)
    if os.environ.get("RANK", "0") != "0":  # a torchrun worker: rank 0 reports
        return 0
    if args.json:
        print_json(metrics)
    else:
        print(f"wrote {args.output}: validation loss {metrics['val_loss']:.4f}")
        for name, row in metrics["tasks"].items():
            if "skipped" in row:
                print(f"  {name:28s} skipped: {row['skipped']}")
            else:
                print(f"  {name:28s} loss {row['loss']:.4f}  accuracy {row['accuracy']:.3f}")
    return 0


def cmd_eval(args) -> int:
    from circuitir.tasks.evaluate import evaluate_model

    tasks = resolve_tasks(args, allow_all=True)
    loaded = load(args.model, args)  # on --device
    check_task_tokens(tasks, loaded.tokenizer)
    rows = [evaluate_model(loaded.model, task, loaded.tokenizer, args.split, args.n, args.seed) for task in tasks]
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
            write_in_place(args.file, formatted)
    else:
        sys.stdout.write(formatted)
    return 0


def write_in_place(path: str, text: str) -> None:
    """``fmt -i``: rewrite the file atomically, keeping its permissions."""
    from circuitir.models.checkpoint import atomic_write_text

    check_output_path(path, "the file")
    mode = os.stat(path).st_mode & 0o7777
    atomic_write_text(path, text)
    os.chmod(path, mode)  # the temporary file was created 0600


def read_circuit(path: str):
    """Parse a .cir file; a syntax error keeps its file:line:col report."""
    from circuitir.api import load as load_circuit
    return load_circuit(path)


def read_circuit_with_comments(path: str):
    """Parse a .cir file keeping its comments, for commands that write it back."""
    from circuitir.api import read_text
    from circuitir.grammar import parse_with_comments

    return parse_with_comments(read_text(path), path)


def load(path: str, args=None):
    """A model, with the --tokenizer the command was given (if any)."""
    from circuitir.api import load_model
    return load_model(path, tokenizer=getattr(args, "tokenizer", None), device=getattr(args, "device", None))


def resolve_tasks(args, *, allow_all: bool = False, required: bool = True) -> list:
    """The task(s) a command was given: ``--task NAME`` (or ``all`` where allowed) or ``--task-file
    T.jsonl``, which is registered so that a circuit header naming it resolves (circuitir.tasks.task_file)."""
    from circuitir.tasks import TASKS, get_task

    name, task_file = getattr(args, "task", None), getattr(args, "task_file", None)
    if name and task_file:
        raise UserError("give --task or --task-file, not both")
    if task_file:
        from circuitir.tasks.task_file import register_task_file
        return [register_task_file(task_file)]
    if not name:
        if required:
            raise UserError("no task given: use --task NAME (see `circuitir tasks`) or --task-file T.jsonl")
        return []
    if name == "all" and allow_all:
        return list(TASKS.values())
    return [get_task(name)]


def task_name(args, *, required: bool = True) -> str | None:
    """The name of the --task or --task-file task (a task file is registered, so the library resolves it)."""
    tasks = resolve_tasks(args, required=required)
    return tasks[0].name if tasks else None


def load_with_task(args) -> tuple:
    """(the --model, the name of its optional --task / --task-file task, checked against its tokenizer)."""
    tasks = resolve_tasks(args, required=False)
    loaded = load(args.model, args)
    check_task_tokens(tasks, loaded.tokenizer)
    return loaded, tasks[0].name if tasks else None


def cmd_trace(args) -> int:
    from circuitir.ir.trace import summary

    info = summary(load(args.model, args).model)
    if args.json:
        print_json(info)
        return 0
    config = info["config"]
    print(f"SparseGPT: {info['layers']} layers, d_model {config['d_model']}, {config['n_head']} heads x "
          f"{config['d_head']}, d_mlp {config['d_mlp']}, vocab {config['vocab_size']}, "
          f"{info['fx_nodes']} fx nodes")
    print(f"\n{'site':22s} {'channels':>8s}  read by / written by")
    for site in info["sites"]:
        print(f"{site['site']:22s} {site['channels']:8d}  {', '.join(site['read_by']) or '-'} / "
              f"{', '.join(site['written_by']) or '-'}")
    print(f"\n{'matrix':40s} {'nonzero':>9s} {'total':>9s} {'density':>8s}")
    for row in info["matrices"]:
        print(f"{row['matrix']:40s} {row['nonzero']:9d} {row['total']:9d} {row['density']:8.4f}")
    return 0


def cmd_passes(args) -> int:
    import dataclasses

    from circuitir.passes import DEFAULT_PIPELINE, REGISTRY

    rows = [{"pass": p.name, "summary": p.summary, "needs": list(p.needs), "provides": list(p.provides),
             "options": {f.name.replace("_", "-"): {"type": str(f.type), "default": f.default}
                         for f in dataclasses.fields(p.options)}} for p in REGISTRY.values()]
    if args.json:
        print_json({"default_pipeline": DEFAULT_PIPELINE, "passes": rows})
        return 0
    print(f"default pipeline: {DEFAULT_PIPELINE}\n")
    for row in rows:
        print(f"{row['pass']}: {row['summary']}")
        for name, option in row["options"].items():
            print(f"    {name}: {option['type']} = {option['default']}")
    return 0


def cmd_run(args) -> int:
    from circuitir.runtime.run import run_prompts

    check_prompts(args.prompt)
    rows = run_prompts(read_circuit(args.circuit), args.prompt)
    if args.json:
        print_json(rows)
        return 0
    for row in rows:
        logits = "  ".join(f"{name!r}: {value:+.4f}" for name, value in row["logits"].items())
        print(f"{row['prompt']!r}\n    {logits}  ->  {row['prediction']!r}")
    return 0


def cmd_extract(args) -> int:
    from circuitir.grammar import emit
    from circuitir.models.checkpoint import atomic_write_text
    from circuitir.runtime.extract import build_pipeline, extract

    build_pipeline(args.pipeline, args.target_loss, args.ablation)  # bad pipeline text: before any work
    if args.targets is not None:
        return extract_targets(args)
    if args.plot:
        raise UserError("--plot draws a frontier: give --targets too")
    if args.task == "all":
        return extract_all(args)
    task = resolve_tasks(args)[0]
    check_output_path(args.output, "the circuit")
    loaded = load(args.model, args)
    check_task_tokens([task], loaded.tokenizer)
    circuit, summary = extract(loaded, task, pipeline=args.pipeline, target=args.target_loss,
                               ablation=args.ablation, seed=args.seed, progress=show_progress(args))
    atomic_write_text(args.output, emit(circuit))
    if args.json:
        print_json(summary)
    else:
        print(f"wrote {args.output}: {summary['nodes']} nodes, {summary['edges']} edges, held-out loss "
              f"{summary['loss']:.4f} (target {summary['target_loss']}) in {summary['seconds']:.0f} s")
    return 0


def parse_targets(text: str) -> list[float]:
    try:
        targets = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        targets = []
    if not targets or not all(math.isfinite(t) and 0 < t <= 100 for t in targets):
        raise UserError(f"--targets {text!r}: expected target losses in (0, 100] separated by commas, e.g. "
                        "0.05,0.1,0.15,0.2,0.3,0.4")
    return targets


def extract_targets(args) -> int:
    """--targets: the frontier of one task into -o DIR; exit 1 if a target could not be met."""
    from circuitir.grammar import emit
    from circuitir.models.checkpoint import atomic_write_text
    from circuitir.runtime.extract import extract_frontier

    targets = parse_targets(args.targets)
    if args.target_loss is not None:
        raise UserError("give --targets or --target-loss, not both")
    if args.task == "all":
        raise UserError("--targets takes one task (a frontier per task: run it once per task)")
    if args.plot:
        from circuitir.render.plots import check_plot_path
        check_plot_path(args.plot)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UserError(f"-o {args.output}: with --targets, -o is a directory (it exists as a file)")
    check_output_path(os.path.join(args.output, "probe.cir"), "the circuits")
    if args.plot:
        check_output_path(args.plot, "the plot")
    task = resolve_tasks(args)[0]
    loaded = load(args.model, args)
    check_task_tokens([task], loaded.tokenizer)
    rows = extract_frontier(loaded, task, targets, pipeline=args.pipeline, ablation=args.ablation, seed=args.seed,
                            progress=show_progress(args))
    table = []
    for row in rows:
        if "error" in row:
            table.append({"target": row["target"], "error": row["error"]})
            continue
        path = os.path.join(args.output, f"{task.name}-t{row['target']:g}.cir")
        atomic_write_text(path, emit(row["circuit"]))
        table.append({**row["summary"], "target": row["target"], "output": path})
    if args.plot:
        plot_frontier(table, task.name, args.plot)
    if args.json:
        print_json({"task": task.name, "targets": table})
    else:
        print(f"{'target':>7s} {'nodes':>6s} {'edges':>6s} {'held-out loss':>13s}  file")
        for row in table:
            if "error" in row:
                print(f"{row['target']:7g}  not met: {row['error']}")
            else:
                print(f"{row['target']:7g} {row['nodes']:6d} {row['edges']:6d} {row['loss']:13.4f}  {row['output']}")
        if args.plot:
            print(f"wrote {args.plot}")
    return 1 if any("error" in row for row in table) else 0


def plot_frontier(table: list[dict], task: str, path: str) -> None:
    from circuitir.render.plots import save_figure, subplots

    met = [row for row in table if "error" not in row]
    fig, ax = subplots(figsize=(5, 3.4), dpi=150)
    for key, marker in (("edges", "o"), ("nodes", "s")):
        ax.plot([r["target"] for r in met], [r[key] for r in met], marker=marker, label=key)
    ax.set_yscale("log")
    ax.set_xlabel("target task loss (nats)")
    ax.set_ylabel("circuit size")
    ax.set_title(f"{task}: circuit size against target loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def extract_all(args) -> int:
    """--task all: every task into -o DIR, --jobs at a time; exit 1 if any task could not be extracted."""
    from circuitir.sweep import extract_many
    from circuitir.tasks import TASKS

    loaded = load(args.model, args)  # bad input (the model, its tokenizer) fails here, once
    options = dict(pipeline=args.pipeline, target=args.target_loss, ablation=args.ablation, seed=args.seed)
    started = time.time()
    rows = extract_many(args.model, list(TASKS), args.output, jobs=args.jobs, tokenizer_dir=args.tokenizer,
                        device=args.device, loaded=loaded, threads=args.threads, **options)
    seconds = time.time() - started
    if args.json:
        print_json({"tasks": rows, "jobs": args.jobs, "seconds": seconds})
    else:
        for row in rows:
            if "error" in row:
                print(f"{row['task']:28s} not extracted: {row['error']}")
            else:
                print(f"{row['task']:28s} {row['nodes']:5d} nodes {row['edges']:6d} edges  loss {row['loss']:.4f}  "
                      f"-> {row['output']}")
        print(f"{len(rows)} tasks in {seconds:.0f} s with {args.jobs} job{'s' if args.jobs != 1 else ''}")
    return 1 if any("error" in row for row in rows) else 0


def cmd_check(args) -> int:
    from circuitir.runtime.check import check

    circuit = read_circuit(args.circuit)
    tasks = resolve_tasks(args, required=False)
    if tasks:
        from circuitir.tasks.task_file import as_recorded
        as_recorded(tasks[0], circuit.provenance, args.circuit)
    loaded = load(args.model, args)
    result = check(circuit, loaded, n=args.n, seed=args.seed, necessity_loss=args.necessity_loss,
                   control=not args.no_control, progress=show_progress(args), nonsense=args.nonsense)
    if args.prompts:  # reported beside the claims; it does not change whether they hold
        from circuitir.tasks.user_prompts import prompt_agreement
        target = circuit.claims.target_loss
        result["prompts"] = prompt_agreement(circuit, loaded, args.prompts, target)
    if args.json:
        print_json(result)
    else:
        print(format_check(result))
    return 0 if result["passed"] else 1


def format_check(result: dict) -> str:
    mark = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    s, n, m, f = (result[k] for k in ("sufficiency", "necessity", "minimality", "faithfulness"))
    lines = [f"{'claim':13s} {'result':6s} measured",
             f"{'sufficiency':13s} {mark(s['passed']):6s} circuit alone: loss {s['loss']:.4f} <= target "
             f"{s['target_loss']} ? (accuracy {s['accuracy']:.3f}, {s['n']} held-out prompts)",
             f"{'necessity':13s} {mark(n['passed']):6s} model without the circuit: loss {n['ablated_loss']:.4f} "
             f">= {n['threshold']:.4f} ? (full model {n['full_model_loss']:.4f}, chance {n['chance_loss']:.4f})",
             f"{'minimality':13s} {mark(m['passed']):6s} {m['necessary']}/{m['total']} nodes push the loss over "
             f"the target when removed ({m['measured_on']}; on held-out prompts {m['necessary_heldout']}/"
             f"{m['total']})",
             f"{'faithfulness':13s} {mark(f['passed']):6s} circuit vs ablated model: max |dlogit| "
             f"{f['max_abs_logit_diff']:.2e}"]
    for kind, row in f["ablations"].items():
        lines.append(f"{'':20s} {kind} ablation: loss {row['loss']:.4f}, agreement with model "
                     f"{row['agreement_with_model']:.3f}")
    if "control" in f:
        c = f["control"]
        detail = (f"found {c['nodes']} nodes (circuit: {c['circuit_nodes']})" if c["reached_target"]
                  else "cannot reach the target")
        lines.append(f"{'':20s} random re-initialised control: {detail}")
    if "controls" in result:
        lines += format_controls(result["controls"], s["target_loss"])
    unnecessary = [row for row in m["nodes"] if not row["necessary"]]
    for row in unnecessary[:10]:
        lines.append(f"{'':20s} not necessary: {row['node']} (loss without it {row['loss_without']:.4f})")
    if "prompts" in result:
        p = result["prompts"]
        lines.append(f"{'your prompts':13s} {'':6s} {p['n']} from {p['file']}: circuit loss {p['circuit']['loss']:.4f} "
                     f"(accuracy {p['circuit']['accuracy']:.3f}), model loss {p['model']['loss']:.4f} (accuracy "
                     f"{p['model']['accuracy']:.3f}), circuit and model agree on {p['agreement']:.3f}")
    lines.append("all claims hold" if result["passed"] else "some claims FAIL")
    return "\n".join(lines)


def format_controls(controls: dict, target: float) -> list[str]:
    curve, rand, partial = (controls[k] for k in ("faithfulness_curve", "random_circuits", "partial_ablation"))
    lines = [f"{'controls':13s} {'':6s} faithfulness curve over {len(curve['sizes']) - 1} nodes "
             f"(most important first): CPR {curve['cpr']:.3f}, CMD {curve['cmd']:.3f}",
             f"{'':20s} {rand['draws']} random circuits of {rand['size']} nodes: loss {rand['min_loss']:.4f} at best, "
             f"{rand['mean_loss']:.4f} on average; {rand['reach_target']} reach the target {target}",
             f"{'':20s} half the outside nodes ablated ({partial['draws']} draws): loss up to "
             f"{partial['max_loss']:.4f}, {partial['within_target']}/{partial['draws']} within the target"]
    if "nonsense_task" in controls:
        n = controls["nonsense_task"]
        lines.append(f"{'':20s} shuffled-label task: " + (f"found {n['nodes']} nodes" if n["reached_target"]
                                                         else "the extraction cannot reach the target"))
    return lines


def cmd_diff(args) -> int:
    from circuitir.runtime.diff import behavioural_diff, format_diff, structural_diff

    a, b = read_circuit(args.a), read_circuit(args.b)
    diff = structural_diff(a, b, tolerance=args.tolerance, header=not args.ignore_header)
    behaviour = None
    if args.model or args.task or args.task_file:
        tasks = resolve_tasks(args, required=False)
        if not (args.model and tasks):
            raise UserError("a behavioural diff needs both --model and --task (or --task-file)")
        loaded = load(args.model, args)
        check_task_tokens(tasks, loaded.tokenizer)
        behaviour = behavioural_diff(a, b, tasks[0], loaded.tokenizer, n=args.n)
    differ = not diff.equal or (behaviour is not None and behaviour["predictions_differ"] > 0)
    if args.json:
        print_json({"structural": diff.to_dict(), "behavioural": behaviour, "equal": not differ})
    else:
        print(format_diff(diff, args.a, args.b))
        if behaviour is not None:
            print(f"behaviour on {behaviour['n']} held-out {behaviour['task']} prompts: loss "
                  f"{behaviour['a']['loss']:.4f} -> {behaviour['b']['loss']:.4f}, accuracy "
                  f"{behaviour['a']['accuracy']:.3f} -> {behaviour['b']['accuracy']:.3f}, "
                  f"{behaviour['predictions_differ']} predictions differ")
            for row in behaviour["examples"]:
                print(f"  {row['prompt'][-40:]!r}: a {'right' if row['a_correct'] else 'wrong'}, "
                      f"b {'right' if row['b_correct'] else 'wrong'}")
    return 1 if differ else 0


def cmd_render(args) -> int:
    from circuitir.render.graphviz import render

    check_output_path(args.output, "the drawing")
    fmt = render(read_circuit(args.circuit), args.output, args.title, fmt=args.format, collapse=args.collapse)
    print(f"wrote {args.output} ({fmt}{', collapsed' if args.collapse else ''})")
    return 0


def cmd_explain(args) -> int:
    from circuitir.explain import annotate, explain, format_explanations
    from circuitir.grammar import emit
    from circuitir.models.checkpoint import atomic_write_text

    if args.in_place and args.output:
        raise UserError("give either -i (rewrite the circuit) or -o FILE, not both")
    circuit, comments = read_circuit_with_comments(args.circuit)
    loaded, task = load_with_task(args)
    explanations = explain(circuit, loaded, task=task, n_windows=args.windows, n_prompts=args.prompts,
                           top=args.top, seed=args.seed)
    written = annotate(circuit, explanations)
    target = args.circuit if args.in_place else args.output
    if target:
        atomic_write_text(target, emit(circuit, comments))
    if args.json:
        print_json({"circuit": args.circuit, "written_to": target, "labels_written": written,
                    "nodes": [{**e.to_dict(), "label": circuit.labels[n].text, "label_source":
                               circuit.labels[n].source} for n, e in explanations.items()]})
    else:
        print(format_explanations(explanations, circuit))
        if target:
            print(f"wrote {target}: {written} generated labels ({len(explanations) - written} hand-written kept)")
    return 0


def cmd_show(args) -> int:
    from circuitir.render.show import show

    sys.stdout.write(show(read_circuit(args.circuit), width=args.width))
    return 0


def cmd_report(args) -> int:
    from circuitir.explain import explain
    from circuitir.models.checkpoint import atomic_write_text
    from circuitir.render.report import build_report

    circuit = read_circuit(args.circuit)
    loaded, task = load_with_task(args)
    check_result = None
    if args.check_json:
        try:
            from circuitir.api import read_text

            check_result = json.loads(read_text(args.check_json))
            check_result["sufficiency"]["passed"]  # noqa: B018 -- the shape `circuitir check --json` writes
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"cannot read {args.check_json} as `circuitir check --json` output: {exc}") from None
    elif not args.no_check:
        from circuitir.runtime.check import check

        check_result = check(circuit, loaded, n=args.n, control=False, progress=show_progress(args))
    explanations = explain(circuit, loaded, task=task, n_windows=args.windows, n_prompts=args.prompts)
    atomic_write_text(args.output, build_report(circuit, explanations, check_result, source=args.circuit))
    print(f"wrote {args.output}")
    return 0


def cmd_import_viz(args) -> int:
    from circuitir.grammar import emit
    from circuitir.interop.openai_viz import import_viz, task_from_path
    from circuitir.models.checkpoint import atomic_write_text

    tasks = resolve_tasks(args, required=False)
    task = tasks[0] if tasks else task_from_path(args.viz)
    if task is None:
        raise UserError(f"cannot tell the task from the path {args.viz} (OpenAI's layout is "
                        "viz/<model>/<task>/<sweep>/<k>/viz_data.pt); give --task or --task-file")
    loaded = load(args.model, args)
    check_task_tokens([task], loaded.tokenizer)
    circuit, summary = import_viz(args.viz, loaded, task, tokens=args.mean_tokens, seed=args.seed,
                                  target=args.target_loss)
    atomic_write_text(args.output, emit(circuit))
    if args.json:
        print_json(summary)
    else:
        theirs = summary["openai"]
        reported = (f"; OpenAI reports loss {theirs['interv_loss']:.4f}" if "interv_loss" in theirs else "")
        if theirs.get("node_loss"):
            node, loss = max(theirs["node_loss"].items(), key=lambda item: item[1])
            reported += (f" and per-node ablation losses for {len(theirs['node_loss'])} nodes (header "
                         f"openai.node_loss; highest {node} {loss:.4f})")
        print(f"wrote {args.output}: {summary['nodes']} nodes ({summary['dropped_nodes']} of the "
              f"{summary['imported_nodes']} imported have no path to the logits), {summary['edges']} edges, "
              f"held-out loss {summary['loss']:.4f} on {summary['task']}{reported}")
    return 0


def cmd_export(args) -> int:
    from circuitir.models.checkpoint import atomic_write_text

    if not args.input.endswith(".cir"):  # a model: convert it
        if args.format != "safetensors" or not args.output:
            raise UserError("a model exports only as --format safetensors, with -o M.safetensors")
        if not args.output.endswith(".safetensors"):
            raise UserError(f"-o {args.output}: a safetensors model file must end in .safetensors")
        from circuitir.models.checkpoint import save_checkpoint
        loaded = load(args.input, args)
        meta = {k: v for k, v in loaded.meta.items() if k not in ("format", "version", "config", "tokenizer")}
        sha = save_checkpoint(args.output, loaded.model, loaded.tokenizer, **meta)
        print(f"wrote {args.output} (sha256 {sha[:12]}...)")
        return 0
    circuit = read_circuit(args.input)
    if args.format == "safetensors":
        from circuitir.interop.export import save_circuit_safetensors
        if not args.output:
            raise UserError("--format safetensors writes a binary file: give -o C.safetensors")
        save_circuit_safetensors(circuit, args.output)
        print(f"wrote {args.output}")
        return 0
    from circuitir.interop.export import graph_json, node_statistics
    from circuitir.runtime.run import circuit_tokenizer

    stats, tokenizer = None, None
    if args.model:
        tasks = resolve_tasks(args, required=False)
        loaded = load(args.model, args)
        tokenizer = loaded.tokenizer
        recorded = circuit.provenance.task
        from circuitir.tasks import get_task
        task = tasks[0] if tasks else get_task(recorded) if recorded else None
        if task is None:
            raise UserError("activation statistics need a task: the circuit's header names none; give --task")
        stats = node_statistics(circuit, loaded, task, n=args.n)
    else:
        try:
            tokenizer = circuit_tokenizer(circuit)
        except UserError:
            tokenizer = None  # token strings are a courtesy; ids are always written
    text = json.dumps(graph_json(circuit, tokenizer, stats), indent=1) + "\n"
    if args.output:
        atomic_write_text(args.output, text)
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_bridge_train(args) -> int:
    from circuitir.models.bridges import BridgeRecipe, log_to, train_bridges

    recipe = BridgeRecipe()
    for name in ("steps", "batch_size", "lr", "nmse_weight", "kl_weight", "lm_weight", "encoder_k", "seed", "fit"):
        value = getattr(args, name)
        if value is not None:
            setattr(recipe, name, value)
    if (args.fit or args.bridges_from) and args.resume:
        raise UserError("--resume continues the run its checkpoint records; leave out --fit and --bridges-from")
    if args.init_sparse and args.resume:
        raise UserError("--resume continues the run its checkpoint records (warm start included); leave out "
                        "--init-sparse")
    if args.init_sparse and args.sparse:
        raise UserError("--sparse fits bridges to a frozen sparse model and --init-sparse trains one on "
                        "jointly: give one of them")
    if args.sparse is None and args.init_sparse is None:
        from circuitir.models.train import PRESETS
        if args.preset not in PRESETS:
            raise UserError(f"unknown preset {args.preset!r} (known: {', '.join(PRESETS)})")
        recipe.sparse_recipe = PRESETS[args.preset].to_dict()
        recipe.sparse_recipe["steps"] = recipe.steps
    check_output_path(args.output, "the bridged checkpoint")
    if args.log:
        check_output_path(args.log, "the log")
    from circuitir.models.device import resolve_device
    device = resolve_device(args.device)
    result = train_bridges(args.dense, args.output, sparse_path=args.sparse, recipe=recipe, resume=args.resume,
                           progress=show_progress(args), log=log_to(args.log), device=device,
                           init_sparse=args.init_sparse, init_bridges=args.bridges_from)
    if args.json:
        print_json(result)
    else:
        print(f"wrote {args.output} ({result['steps']} steps)")
    return 0


def cmd_bridge_eval(args) -> int:
    from circuitir.runtime.steer import bridge_eval

    result = bridge_eval(args.bridged, args.dense, task_name(args, required=False), args.n, args.windows,
                         device=args.device)
    if args.json:
        print_json(result)
        return 0
    task = result["task"]
    print(f"pretraining loss on {result['windows']} validation windows; KL to the dense logits (nats/token)"
          + (f"; task loss on {task}" if task else ""))
    for name in ("dense", "sparse"):
        row = result[name]
        line = f"  {name:7s} LM loss {row['lm_loss']:.4f}"
        if "kl" in row:
            line += f"  KL {row['kl']:.4f}"
        if task:
            line += f"  task loss {row['task_loss']:.4f}"
        print(line)
    head = f"{'boundary':9s} {'NMSE enc':>9s} {'NMSE dec':>9s} {'KL d→s':>8s} {'KL s→d':>8s} {'LM d→s':>8s} {'LM s→d':>8s}"
    print(head + (f" {'task d→s':>9s} {'task s→d':>9s}" if task else ""))
    for row in result["boundaries"]:
        mark = {way: "*" if row[f"closer_{way}"] else " " for way in ("d2s", "s2d")}
        line = (f"{row['boundary']:9s} {row['nmse_enc']:9.4f} {row['nmse_dec']:9.4f} {row['kl_d2s']:8.4f} "
                f"{row['kl_s2d']:8.4f} {row['lm_loss_d2s']:7.4f}{mark['d2s']} {row['lm_loss_s2d']:7.4f}{mark['s2d']}")
        if task:
            line += f" {row['task_loss_d2s']:9.4f} {row['task_loss_s2d']:9.4f}"
        print(line)
    closer = sum(row[f"closer_{way}"] for row in result["boundaries"] for way in ("d2s", "s2d"))
    print(f"* hybrid's LM loss closer to the dense model's than the sparse model's is: {closer} of "
          f"{2 * len(result['boundaries'])} hybrids")
    return 0


def cmd_steer(args) -> int:
    from circuitir.runtime.steer import parse_strengths, plot_steering, steer, steering_label

    strengths = parse_strengths(args.strength)
    if args.plot:
        from circuitir.render.plots import check_plot_path
        check_plot_path(args.plot)
    result = steer(args.bridged, args.dense, task_name(args), args.node, strengths, args.circuit, args.n, args.seed,
                   device=args.device, boundary=args.boundary, into=args.into)
    if args.plot:
        plot_steering(result, args.plot)
    if args.json:
        print_json(result)
        return 0
    print(f"{result['task']}: steering {steering_label(result)}; {result['n']} held-out prompts; "
          "P = dense model's mean next-token probability")
    print(f"{'strength':>8s} {'P(actual)':>10s} {'P(other)':>9s} {'random P(actual)':>17s} {'random P(other)':>16s}")
    for b, r in zip(result["bridge"], result["random"]):
        print(f"{b['strength']:8.3g} {b['p_correct']:10.4f} {b['p_other']:9.4f} {r['p_correct']:17.4f} "
              f"{r['p_other']:16.4f}")
    print(f"P(other) change: bridge {result['bridge_p_other_change']:+.4f}, random "
          f"{result['random_p_other_change']:+.4f}")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def cmd_bridge_explain(args) -> int:
    from circuitir.runtime.steer import explain

    result = explain(args.bridged, args.dense, args.circuit, args.n, args.seed, device=args.device)
    if args.json:
        print_json(result)
        return 0
    print(f"{result['task']}: circuit of {result['circuit_nodes']} nodes decoded into the dense model "
          f"({result['n']} held-out prompts); dense task loss {result['dense_task_loss']:.4f}")
    print(f"{'boundary':9s} {'agreement':>9s} {'task loss':>9s} {'sparse->dense':>13s} {'ablated':>8s} {'change':>8s}")
    for row in result["boundaries"]:
        print(f"{row['boundary']:9s} {row['circuit_agreement']:9.3f} {row['circuit_task_loss']:9.4f} "
              f"{row['sparse_task_loss']:13.4f} {row['ablated_task_loss']:8.4f} {row['ablation_change']:+8.4f}")
    return 0


# ---------------------------------------------------------------- parser

def add_task_file_option(p, text: str | None = None) -> None:
    p.add_argument("--task-file", metavar="T.jsonl",
                   help=text or "your own task instead of --task: one JSON object per line with prompt, answer, "
                                "alternative and optionally split (train|heldout)")


def add_device_option(p) -> None:
    """--device and --threads: every command that runs a model has both."""
    p.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps "
                                                    "[default: auto]")
    p.add_argument("--threads", type=int, help="torch CPU threads (with --jobs: per job) [default: torch's, one "
                                               "per core; with --jobs, the cores shared out]")


def add_model_options(p) -> None:
    """Options of every command that loads a model."""
    p.add_argument("--tokenizer", metavar="DIR",
                   help="directory with vocab.bpe and encoder.json, for a model whose config names a BPE "
                        "(OpenAI's tinypython_2k) [default: $CIRCUITIR_TOKENIZER, or the files beside the model]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="circuitir",
        description="Compile, run and verify the circuits inside weight-sparse transformers.",
        epilog="Bad input exits with code 2 and one line saying what is wrong.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a weight-sparse (or --dense) model on Python source",
                       description="Weight-sparse pretraining (the paper's recipe). Writes a checkpoint that "
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
    p.add_argument("--eval-every", type=int, help="steps between validation-loss log lines "
                                                  "[default: the preset's; small: 1000]")
    p.add_argument("--keep-every", type=int, default=0, metavar="N",
                   help="also write a snapshot every N steps beside the output (m.pt -> m-step<S>.pt for step S; "
                        "the last step is the output itself), without optimiser state and with its validation "
                        "loss: pick the one matching another model's loss (the paper compares circuits at equal "
                        "pretraining loss) [default: 0, off]")
    training_run_options(p)
    add_device_option(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="precision of the forward and backward passes (autocast; weights stay float32)")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("eval", help="task loss and accuracy of a model",
                       description="Binary cross-entropy between the correct and alternative next token at "
                                   "the last position (the paper's task loss), and accuracy, on held-out prompts.")
    p.add_argument("model", help="checkpoint (.pt) or OpenAI release directory")
    p.add_argument("--task", help="task name or alias, or 'all' (see `circuitir tasks`)")
    add_task_file_option(p)
    p.add_argument("--split", default="heldout", choices=["heldout", "train"])
    p.add_argument("-n", type=int, default=512, help="number of prompts [default: 512]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print {task, loss, accuracy, n}")
    add_device_option(p)
    add_model_options(p)
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

    p = sub.add_parser("trace", help="trace a model: sites, channel counts, nonzero weights",
                       description="Trace the model with torch.fx (sites as leaves) and summarise it.")
    p.add_argument("model", help="checkpoint (.pt) or OpenAI release directory")
    p.add_argument("--json", action="store_true")
    add_model_options(p)
    p.set_defaults(run=cmd_trace)

    p = sub.add_parser("passes", help="list the compiler passes and their options")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_passes)

    p = sub.add_parser("extract", help="extract the minimal circuit for a task (the main job)",
                       description="Run the pass pipeline (trace, ablate, prune, lower, fold-constants, dce) and "
                                   "write the circuit as .cir. The file is written only when extraction finishes.")
    p.add_argument("model", help="checkpoint (.pt) or OpenAI release directory")
    p.add_argument("--task", help="task name or alias (see `circuitir tasks`), or 'all' (-o is then a directory)")
    add_task_file_option(p)
    p.add_argument("-o", "--output", required=True, help=".cir file to write (with --task all: a directory)")
    p.add_argument("--jobs", type=int, default=1, help="with --task all: extractions run in parallel [1]")
    p.add_argument("--target-loss", type=float, help="task loss the circuit must reach [default: 0.15 nats]")
    p.add_argument("--targets", metavar="T1,T2,...",
                   help="the loss-vs-size frontier: one circuit per target loss in one run (the learned mask "
                        "and the means are shared; each file is the one --target-loss T would write), "
                        "written into -o DIR as TASK-tT.cir, with a table (and --plot F.png)")
    p.add_argument("--plot", help="with --targets: draw nodes and edges against the target (.png/.pdf/.svg)")
    p.add_argument("--ablation", choices=["mean", "zero", "resample"],
                   help="what replaces channels outside the circuit [default: mean over the pretraining corpus]")
    p.add_argument("--pipeline", help="pass pipeline as text (see `circuitir passes`)")
    p.add_argument("--seed", type=int, default=0, help="seed (same seed, byte-identical file)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print {task, nodes, edges, loss, target_loss, seconds}")
    add_device_option(p)
    add_model_options(p)
    p.set_defaults(run=cmd_extract)

    p = sub.add_parser("check", help="verify a circuit against its model: sufficiency, necessity, minimality, "
                                     "faithfulness",
                       description="Prints a table; exits 1 when a claim fails (usable as a CI gate), 2 on bad input.")
    p.add_argument("circuit", help=".cir file")
    p.add_argument("model", help="the checkpoint the circuit was extracted from")
    p.add_argument("-n", type=int, default=256, help="held-out prompts [default: 256]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--necessity-loss", type=float, default=0.5 * 0.6931471805599453,
                   help="loss the model without the circuit must reach [default: ln(2)/2]")
    p.add_argument("--no-control", action="store_true", help="skip the random re-initialised model control")
    p.add_argument("--nonsense", action="store_true",
                   help="also run the extraction on the task with shuffled labels (an extraction's time)")
    add_task_file_option(p, "the task file the circuit was extracted on (its header records the file's hash)")
    p.add_argument("--prompts", metavar="P.jsonl",
                   help="also measure the circuit alone and its agreement with the model on your prompts "
                        "(task-file format; reported, not a claim)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true",
                   help="print {sufficiency, necessity, minimality, faithfulness, controls, passed}")
    add_device_option(p)
    add_model_options(p)
    p.set_defaults(run=cmd_check)

    p = sub.add_parser("run", help="run a circuit on prompts, without the model",
                       description="Print the candidates' logits at each prompt's last token and which wins.")
    p.add_argument("circuit", help=".cir file")
    p.add_argument("prompt", nargs="+", help="prompt text (use $'...' for newlines in bash)")
    p.add_argument("--json", action="store_true", help="print [{prompt, logits, prediction}]")
    p.set_defaults(run=cmd_run)

    p = sub.add_parser("diff", help="compare two circuits (exit 0 equal, 1 different)",
                       description="Structural diff (nodes, edges, weights beyond --tolerance, header); with "
                                   "--model and --task also behavioural (losses, per-prompt predictions).")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--model", help="model for the tokenizer of a behavioural diff")
    p.add_argument("--task", help="task for a behavioural diff")
    add_task_file_option(p)
    p.add_argument("-n", type=int, default=256, help="held-out prompts for the behavioural diff")
    p.add_argument("--tolerance", type=float, default=1e-6, help="relative tolerance for weights [1e-6]")
    p.add_argument("--ignore-header", action="store_true", help="compare structure only")
    p.add_argument("--json", action="store_true")
    add_model_options(p)
    p.set_defaults(run=cmd_diff)

    p = sub.add_parser("import-viz", help="turn OpenAI's released circuit (viz_data.pt) into a .cir",
                       description="Read OpenAI's pruning result (circuit_data: kept channels per location; "
                                   "importances) with weights_only=True and lower it on the model it was pruned "
                                   "on, mean-ablated like an extracted circuit, so it runs, checks and diffs.")
    p.add_argument("viz", help="viz_data.pt (viz/<model>/<task>/<sweep>/<k>/viz_data.pt)")
    p.add_argument("--model", required=True, help="the model it was pruned on (OpenAI release directory)")
    p.add_argument("-o", "--output", required=True, help=".cir file to write")
    p.add_argument("--task", help="task name [default: the one the viz path names]")
    add_task_file_option(p)
    p.add_argument("--target-loss", type=float, default=0.15, help="target loss check holds it to [0.15]")
    p.add_argument("--mean-tokens", type=int, default=65536, help="corpus tokens the means are taken over")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_device_option(p)
    add_model_options(p)
    p.set_defaults(run=cmd_import_viz)

    p = sub.add_parser("export", help="write a circuit as graph JSON or safetensors (or a model as safetensors)",
                       description="--format json: a graph file shaped like circuit-tracer's and Neuronpedia's "
                                   "(metadata, nodes with layer/site/index/label/statistics, links with weights; "
                                   "README, Export). --format safetensors: the circuit's tensors; given a model "
                                   "instead of a .cir, the model as a .safetensors checkpoint.")
    p.add_argument("input", help=".cir file (or a model checkpoint to convert to safetensors)")
    p.add_argument("--format", choices=["json", "safetensors"], default="json")
    p.add_argument("-o", "--output", help="file to write [json: standard output]")
    p.add_argument("--model", help="with a model, nodes get activation statistics on the task's held-out prompts")
    p.add_argument("--task", help="task for the statistics [default: the circuit's]")
    add_task_file_option(p)
    p.add_argument("-n", type=int, default=128, help="held-out prompts for the statistics [128]")
    add_device_option(p)
    add_model_options(p)
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("render", help="draw a circuit: SVG, PDF, PNG, DOT or TikZ (laid out by Graphviz)",
                       description="Layers bottom to top, one band per layer and sublayer, a head's q/k/v "
                                   "channels boxed with the head, edge width by |weight| and colour by sign, a "
                                   "legend, node labels from the circuit's `label` lines. --collapse draws one box "
                                   "per head and per group of neurons with the same label. TikZ: .tikz is a "
                                   "picture to \\input, .tex a document pdflatex turns into the figure.")
    p.add_argument("circuit", help=".cir file")
    p.add_argument("-o", "--output", required=True, help="output file: .svg, .pdf, .png, .dot/.gv, .tikz or .tex")
    p.add_argument("--format", choices=["svg", "pdf", "png", "dot", "tikz"],
                   help="output format [default: from the output's extension]")
    p.add_argument("--collapse", action="store_true", help="the summary diagram: heads and groups of neurons")
    p.add_argument("--title", help="graph title [default: task, nodes and edges]")
    p.set_defaults(run=cmd_render)

    p = sub.add_parser("explain", help="what drives each node: top-activating contexts, task classes, embeddings",
                       description="For every node of a circuit, measured on the model: its top-activating tokens "
                                   "with context (held-out pretraining text and the task's prompts), its mean "
                                   "activation on the task's two classes, and for residual channels the tokens "
                                   "whose embedding writes it most. With -i or -o, writes the generated labels into "
                                   "the circuit as `label auto` lines (hand-written labels are kept).")
    p.add_argument("circuit", help=".cir file")
    p.add_argument("--model", required=True, help="the checkpoint the circuit was extracted from")
    p.add_argument("--task", help="task name [default: the circuit header's task]")
    add_task_file_option(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("-i", "--in-place", action="store_true", help="write the labels into the circuit (atomically)")
    where.add_argument("-o", "--output", help="write the labelled circuit here")
    p.add_argument("--windows", type=int, default=256, help="windows of 64 held-out corpus tokens [default: 256]")
    p.add_argument("--prompts", type=int, default=256, help="held-out task prompts [default: 256]")
    p.add_argument("--top", type=int, default=8, help="contexts kept per node [default: 8]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print every node's explanation as JSON")
    add_device_option(p)
    p.set_defaults(run=cmd_explain)

    p = sub.add_parser("show", help="a circuit on one screen: heads, neurons, labels, edges, embedding tokens",
                       description="A compact, paper-sized summary: per layer and sublayer the residual channels "
                                   "read, the heads with their q/k/v channels, the neurons with their labels and "
                                   "edge counts, the channels written; the embedding columns as token sets.")
    p.add_argument("circuit", help=".cir file")
    p.add_argument("--width", type=int, default=100, help="columns [default: 100]")
    p.set_defaults(run=cmd_show)

    p = sub.add_parser("report", help="one self-contained HTML page: figures, check table, node explanations",
                       description="Writes an HTML file with everything inline (no network): the collapsed and "
                                   "full figures (click a node to highlight its edges), the check table, the node "
                                   "table with explanations, and per-node activation examples.")
    p.add_argument("circuit", help=".cir file")
    p.add_argument("--model", required=True, help="the checkpoint the circuit was extracted from")
    p.add_argument("-o", "--output", required=True, help="HTML file to write")
    p.add_argument("--task", help="task name [default: the circuit header's task]")
    add_task_file_option(p)
    checking = p.add_mutually_exclusive_group()
    checking.add_argument("--check-json", help="use this `circuitir check --json` output instead of checking again")
    checking.add_argument("--no-check", action="store_true", help="leave the check table out (checking takes "
                                                                  "minutes)")
    p.add_argument("-n", type=int, default=256, help="held-out prompts for the check [default: 256]")
    p.add_argument("--windows", type=int, default=256, help="corpus windows for the explanations [default: 256]")
    p.add_argument("--prompts", type=int, default=256, help="task prompts for the explanations [default: 256]")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_option(p)
    p.set_defaults(run=cmd_report)

    add_bridge_parsers(sub)
    return parser


def training_run_options(p) -> None:
    """The options every training command shares: resume, log, progress, JSON (threads: add_device_option)."""
    p.add_argument("--resume", help="continue an interrupted run from its checkpoint")
    p.add_argument("--log", "--log-file", dest="log",
                   help="append one JSON line per evaluation to this file (under torchrun write --log-file: "
                        "torchrun's own parser takes --log for its --log-dir)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print final metrics as JSON")


def add_bridge_parsers(sub) -> None:
    """`bridge train`, `bridge eval` and `steer` (issue 8)."""
    bridge = sub.add_parser("bridge", help="bridges between a sparse and a dense model: train, eval",
                            description="Encoders/decoders at every sublayer boundary (the paper's bridges).")
    bsub = bridge.add_subparsers(dest="bridge_command", required=True, metavar="SUBCOMMAND")
    p = bsub.add_parser("train", help="fit bridges to two frozen models (--sparse), or train a sparse model "
                                      "jointly with them",
                        description="Loss = [sparse LM loss, joint mode] + Σ NMSE both ways + Σ KL(dense ‖ "
                                    "hybrid) for both hybrid directions. Writes a bridged checkpoint.")
    p.add_argument("--dense", required=True, help="the dense model (frozen)")
    p.add_argument("--sparse", help="an existing sparse model (frozen): fit only the bridges")
    p.add_argument("--init-sparse", metavar="M.pt",
                   help="joint mode started from this trained sparse model: its weights are trained on with "
                        "the bridges, at --lr, kept at its density (far cheaper than a joint run from scratch)")
    p.add_argument("--bridges-from", metavar="B.pt",
                   help="with --sparse: start the maps from this bridged checkpoint's bridges instead of least "
                        "squares (it must couple the same two models; a bridged checkpoint is itself a sparse "
                        "model: --sparse B.pt --bridges-from B.pt)")
    p.add_argument("--fit", choices=("all", "decoders", "encoders"),
                   help="with --sparse: the maps trained; the others are kept as they start, and their terms "
                        "are not computed [default: all]")
    p.add_argument("-o", "--output", required=True, help="bridged checkpoint to write (.pt)")
    p.add_argument("--preset", default="small", help="joint mode from scratch (neither --sparse nor "
                                                     "--init-sparse): the new sparse model's recipe preset")
    p.add_argument("--steps", type=int, help="optimiser steps [default: 1200]")
    p.add_argument("--batch-size", type=int, help="sequences per step [default: 16]")
    p.add_argument("--lr", type=float, help="peak learning rate [default: 1e-3]")
    p.add_argument("--nmse-weight", type=float, help="weight of the NMSE terms [default: 1]")
    p.add_argument("--kl-weight", type=float, help="weight of the hybrid KL terms [default: 1]")
    p.add_argument("--lm-weight", type=float, help="joint mode: weight of the sparse LM loss [default: 1]")
    p.add_argument("--encoder-k", type=int, help="AbsTopK k of the encoders [default: the sparse width]")
    p.add_argument("--seed", type=int, help="random seed (same seed, same bytes)")
    training_run_options(p)
    add_device_option(p)
    p.set_defaults(run=cmd_bridge_train)

    p = bsub.add_parser("eval", help="per boundary: NMSE both ways, hybrids' KL and losses",
                        description="Both hybrid graphs at every boundary (dense prefix -> encode -> sparse "
                                    "suffix; sparse prefix -> decode -> dense suffix) beside the two models.")
    p.add_argument("bridged", help="bridged checkpoint")
    p.add_argument("--dense", required=True, help="the dense model it was bridged to")
    p.add_argument("--task", help="also report task loss on this task")
    add_task_file_option(p)
    p.add_argument("-n", type=int, default=256, help="task prompts [default: 256]")
    p.add_argument("--windows", type=int, default=32, help="validation windows [default: 32]")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_device_option(p)
    p.set_defaults(run=cmd_bridge_eval)

    p = bsub.add_parser("explain", help="a circuit of the bridged sparse model, decoded into the dense model",
                        description="Per boundary: agreement of the dense model's task predictions with the "
                                    "circuit's decoded into the dense suffix, and the dense task-loss change "
                                    "when the circuit's channels are ablated in the sparse model instead.")
    p.add_argument("bridged", help="bridged checkpoint")
    p.add_argument("--dense", required=True, help="the dense model it was bridged to")
    p.add_argument("--circuit", required=True, help="a circuit extracted from the bridged sparse model")
    p.add_argument("-n", type=int, default=256, help="held-out prompts [default: 256]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON")
    add_device_option(p)
    p.set_defaults(run=cmd_bridge_explain)

    p = sub.add_parser("steer", help="steer the dense model along a sparse channel through the bridge",
                       description="The paper's appendix A.4: counterfactual minus actual activation of a sparse channel "
                                   "(from each prompt's contrast partner), decoded into the dense model's "
                                   "read at that boundary, times each strength; beside a random direction "
                                   "of the same norm.")
    p.add_argument("bridged", help="bridged checkpoint")
    p.add_argument("--dense", required=True, help="the dense model it was bridged to")
    p.add_argument("--task", help="task with contrast pairs (or --task-file)")
    add_task_file_option(p, "your own task instead of --task (task-file format); each held-out line is paired "
                            "with the line whose answers are its own swapped and whose prompt has as many "
                            "characters")
    p.add_argument("--node", help="sparse read channel: {L}.attn.act_in[c], {L}.mlp.act_in[c] or final_resid[c]")
    p.add_argument("--circuit", help="steer along all of this circuit's channels at a boundary (the first it "
                                     "has channels at, or --boundary); not with --node")
    p.add_argument("--boundary", help="0.attn, 0.mlp, ..., final: with --circuit, its channels there; alone, every "
                                      "sparse channel there (what the bridge carries at all, a ceiling for one "
                                      "channel or a circuit)")
    p.add_argument("--into", choices=("read", "residual"), default="read",
                   help="where the decoded change goes: the dense read at the boundary, rescaled by the ratio of "
                        "residual RMS (only that sublayer sees it; PAPER A.4) or the dense residual stream there "
                        "(every later sublayer sees it: the change the sparse->dense hybrid would see) "
                        "[default: read]")
    p.add_argument("--strength", default="0,0.25,0.5,0.75,1", help="comma-separated strengths")
    p.add_argument("-n", type=int, default=64, help="held-out prompts [default: 64]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", help="draw the curves (.png/.pdf/.svg, matplotlib)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_device_option(p)
    p.set_defaults(run=cmd_steer)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    command = "circuitir"
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave SIGTERM alone
        previous = None
    try:
        try:
            args = parser.parse_args(argv)
            command = f"circuitir {args.command}"
            check_numbers(args)
            check_device(args)
            if getattr(args, "threads", None):
                import torch
                torch.set_num_threads(args.threads)
            return args.run(args)
        finally:
            # A reader that went away (`circuitir tasks | head`) shows up here, not at interpreter exit.
            sys.stdout.flush()
    except UserError as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        _forget_keyboard_interrupt()
        return 130
    except Terminated:
        print(f"{command}: terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:
        # Stop quietly, as a tool killed by SIGPIPE would; point stdout at /dev/null so the
        # interpreter's own final flush does not raise again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a real file (captured, replaced)
            pass
        return EXIT_BROKEN_PIPE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
