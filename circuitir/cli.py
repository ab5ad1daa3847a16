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


def show_progress(args) -> bool:
    """Progress bars on a terminal only: not with --quiet or --json, and not into a log file or
    pipe, where every refresh would add a line."""
    return not (getattr(args, "quiet", False) or getattr(args, "json", False)) and sys.stderr.isatty()


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

    metrics = train(recipe, args.output, resume=args.resume, progress=show_progress(args), log=log)
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


def read_circuit(path: str):
    """Parse a .cir file; a syntax error keeps its file:line:col report."""
    from circuitir.api import load as load_circuit
    return load_circuit(path)


def load(path: str):
    from circuitir.api import load_model
    return load_model(path)


def cmd_trace(args) -> int:
    from circuitir.ir.trace import summary

    info = summary(load(args.model).model)
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
    from circuitir.runtime.extract import extract
    from circuitir.tasks import get_task

    task = get_task(args.task)
    loaded = load(args.model)
    circuit, summary = extract(loaded, task, pipeline=args.pipeline, target=args.target_loss,
                               ablation=args.ablation, seed=args.seed, progress=show_progress(args))
    atomic_write_text(args.output, emit(circuit))
    if args.json:
        print_json(summary)
    else:
        print(f"wrote {args.output}: {summary['nodes']} nodes, {summary['edges']} edges, held-out loss "
              f"{summary['loss']:.4f} (target {summary['target_loss']}) in {summary['seconds']:.0f} s")
    return 0


def cmd_check(args) -> int:
    from circuitir.runtime.check import check

    circuit = read_circuit(args.circuit)
    result = check(circuit, load(args.model), n=args.n, seed=args.seed, necessity_loss=args.necessity_loss,
                   control=not args.no_control, progress=show_progress(args))
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
    unnecessary = [row for row in m["nodes"] if not row["necessary"]]
    for row in unnecessary[:10]:
        lines.append(f"{'':20s} not necessary: {row['node']} (loss without it {row['loss_without']:.4f})")
    lines.append("all claims hold" if result["passed"] else "some claims FAIL")
    return "\n".join(lines)


def cmd_diff(args) -> int:
    from circuitir.runtime.diff import behavioural_diff, format_diff, structural_diff
    from circuitir.tasks import get_task

    a, b = read_circuit(args.a), read_circuit(args.b)
    diff = structural_diff(a, b, tolerance=args.tolerance, header=not args.ignore_header)
    behaviour = None
    if args.model or args.task:
        if not (args.model and args.task):
            raise UserError("a behavioural diff needs both --model and --task")
        loaded = load(args.model)
        behaviour = behavioural_diff(a, b, get_task(args.task), loaded.tokenizer, n=args.n)
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

    circuit = read_circuit(args.circuit)
    title = args.title
    if title is None:
        task = circuit.header.get("task", {})
        title = f"{task.get('name', '') if isinstance(task, dict) else task}: {circuit.n_nodes} nodes, " \
                f"{circuit.n_edges} edges"
    render(circuit, args.output, title)
    print(f"wrote {args.output}")
    return 0


def cmd_bridge_train(args) -> int:
    import torch

    from circuitir.models.bridges import BridgeRecipe, log_to, train_bridges

    recipe = BridgeRecipe()
    for name in ("steps", "batch_size", "lr", "nmse_weight", "kl_weight", "lm_weight", "encoder_k", "seed"):
        value = getattr(args, name)
        if value is not None:
            setattr(recipe, name, value)
    if args.sparse is None:
        from circuitir.models.train import PRESETS
        if args.preset not in PRESETS:
            raise UserError(f"unknown preset {args.preset!r} (known: {', '.join(PRESETS)})")
        recipe.sparse_recipe = PRESETS[args.preset].to_dict()
        recipe.sparse_recipe["steps"] = recipe.steps
    if recipe.steps <= 0 or recipe.batch_size <= 0:
        raise UserError("--steps and --batch-size must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = train_bridges(args.dense, args.output, sparse_path=args.sparse, recipe=recipe, resume=args.resume,
                           progress=show_progress(args), log=log_to(args.log))
    if args.json:
        print_json(result)
    else:
        print(f"wrote {args.output} ({result['steps']} steps)")
    return 0


def cmd_bridge_eval(args) -> int:
    from circuitir.runtime.steer import bridge_eval

    result = bridge_eval(args.bridged, args.dense, args.task, args.n, args.windows)
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
        line = (f"{row['boundary']:9s} {row['nmse_enc']:9.4f} {row['nmse_dec']:9.4f} {row['kl_d2s']:8.4f} "
                f"{row['kl_s2d']:8.4f} {row['lm_loss_d2s']:8.4f} {row['lm_loss_s2d']:8.4f}")
        if task:
            line += f" {row['task_loss_d2s']:9.4f} {row['task_loss_s2d']:9.4f}"
        print(line)
    return 0


def cmd_steer(args) -> int:
    from circuitir.runtime.steer import parse_strengths, plot_steering, steer

    strengths = parse_strengths(args.strength)
    if args.plot and not args.plot.lower().endswith((".png", ".pdf", ".svg")):
        raise UserError(f"--plot {args.plot}: use a .png, .pdf or .svg file name")
    result = steer(args.bridged, args.dense, args.task, args.node, strengths, args.circuit, args.n, args.seed)
    if args.plot:
        plot_steering(result, args.plot)
    if args.json:
        print_json(result)
        return 0
    print(f"{result['task']}: steering channel(s) {result['channels']} at {result['boundary']} "
          f"({result['n']} held-out prompts; P = dense model's mean next-token probability)")
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

    result = explain(args.bridged, args.dense, args.circuit, args.n, args.seed)
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
    training_run_options(p)
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

    p = sub.add_parser("trace", help="trace a model: sites, channel counts, nonzero weights",
                       description="Trace the model with torch.fx (sites as leaves) and summarise it.")
    p.add_argument("model", help="checkpoint (.pt) or OpenAI release directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_trace)

    p = sub.add_parser("passes", help="list the compiler passes and their options")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_passes)

    p = sub.add_parser("extract", help="extract the minimal circuit for a task (the main job)",
                       description="Run the pass pipeline (trace, ablate, prune, lower, fold-constants, dce) and "
                                   "write the circuit as .cir. The file is written only when extraction finishes.")
    p.add_argument("model", help="checkpoint (.pt) or OpenAI release directory")
    p.add_argument("--task", required=True, help="task name or alias (see `circuitir tasks`)")
    p.add_argument("-o", "--output", required=True, help=".cir file to write")
    p.add_argument("--target-loss", type=float, help="task loss the circuit must reach [default: 0.15 nats]")
    p.add_argument("--ablation", choices=["mean", "zero", "resample"],
                   help="what replaces channels outside the circuit [default: mean over the pretraining corpus]")
    p.add_argument("--pipeline", help="pass pipeline as text (see `circuitir passes`)")
    p.add_argument("--seed", type=int, default=0, help="seed (same seed, byte-identical file)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print {task, nodes, edges, loss, target_loss, seconds}")
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
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true",
                   help="print {sufficiency, necessity, minimality, faithfulness, passed}")
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
    p.add_argument("-n", type=int, default=256, help="held-out prompts for the behavioural diff")
    p.add_argument("--tolerance", type=float, default=1e-6, help="relative tolerance for weights [1e-6]")
    p.add_argument("--ignore-header", action="store_true", help="compare structure only")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_diff)

    p = sub.add_parser("render", help="draw a circuit (Graphviz: .dot source, or .pdf/.svg/.png via dot)")
    p.add_argument("circuit", help=".cir file")
    p.add_argument("-o", "--output", required=True, help="output file: .dot, .gv, .pdf, .svg or .png")
    p.add_argument("--title", help="graph title [default: task, nodes and edges]")
    p.set_defaults(run=cmd_render)
    add_bridge_parsers(sub)
    return parser


def training_run_options(p) -> None:
    """The options every training command shares: resume, threads, log, progress, JSON."""
    p.add_argument("--resume", help="continue an interrupted run from its checkpoint")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--log", help="append one JSON line per evaluation to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print final metrics as JSON")


def add_bridge_parsers(sub) -> None:
    """`bridge train`, `bridge eval` and `steer` (issue 8)."""
    bridge = sub.add_parser("bridge", help="bridges between a sparse and a dense model: train, eval",
                            description="Encoders/decoders at every sublayer boundary (PAPER.md § Bridges).")
    bsub = bridge.add_subparsers(dest="bridge_command", required=True, metavar="SUBCOMMAND")
    p = bsub.add_parser("train", help="fit bridges to two frozen models (--sparse), or train a sparse model "
                                      "jointly with them",
                        description="Loss = [sparse LM loss, joint mode] + Σ NMSE both ways + Σ KL(dense ‖ "
                                    "hybrid) for both hybrid directions. Writes a bridged checkpoint.")
    p.add_argument("--dense", required=True, help="the dense model (frozen)")
    p.add_argument("--sparse", help="an existing sparse model (frozen): fit only the bridges")
    p.add_argument("-o", "--output", required=True, help="bridged checkpoint to write (.pt)")
    p.add_argument("--preset", default="small", help="joint mode: the sparse model's recipe preset")
    p.add_argument("--steps", type=int, help="optimiser steps [default: 1200]")
    p.add_argument("--batch-size", type=int, help="sequences per step [default: 16]")
    p.add_argument("--lr", type=float, help="peak learning rate [default: 1e-3]")
    p.add_argument("--nmse-weight", type=float, help="weight of the NMSE terms [default: 1]")
    p.add_argument("--kl-weight", type=float, help="weight of the hybrid KL terms [default: 1]")
    p.add_argument("--lm-weight", type=float, help="joint mode: weight of the sparse LM loss [default: 1]")
    p.add_argument("--encoder-k", type=int, help="AbsTopK k of the encoders [default: the sparse width]")
    p.add_argument("--seed", type=int, help="random seed (same seed, same bytes)")
    training_run_options(p)
    p.set_defaults(run=cmd_bridge_train)

    p = bsub.add_parser("eval", help="per boundary: NMSE both ways, hybrids' KL and losses",
                        description="Both hybrid graphs at every boundary (dense prefix -> encode -> sparse "
                                    "suffix; sparse prefix -> decode -> dense suffix) beside the two models.")
    p.add_argument("bridged", help="bridged checkpoint")
    p.add_argument("--dense", required=True, help="the dense model it was bridged to")
    p.add_argument("--task", help="also report task loss on this task")
    p.add_argument("-n", type=int, default=256, help="task prompts [default: 256]")
    p.add_argument("--windows", type=int, default=32, help="validation windows [default: 32]")
    p.add_argument("--json", action="store_true", help="print JSON")
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
    p.set_defaults(run=cmd_bridge_explain)

    p = sub.add_parser("steer", help="steer the dense model along a sparse channel through the bridge",
                       description="PAPER.md A.4: counterfactual minus actual activation of a sparse channel "
                                   "(from each prompt's contrast partner), decoded into the dense model's "
                                   "read at that boundary, times each strength; beside a random direction "
                                   "of the same norm.")
    p.add_argument("bridged", help="bridged checkpoint")
    p.add_argument("--dense", required=True, help="the dense model it was bridged to")
    p.add_argument("--task", required=True, help="task with contrast pairs")
    p.add_argument("--node", help="sparse read channel: {L}.attn.act_in[c], {L}.mlp.act_in[c] or final_resid[c]")
    p.add_argument("--circuit", help="steer along all of this circuit's channels at the boundary")
    p.add_argument("--strength", default="0,0.25,0.5,0.75,1", help="comma-separated strengths")
    p.add_argument("-n", type=int, default=64, help="held-out prompts [default: 64]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", help="draw the curves (.png/.pdf/.svg, matplotlib)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_steer)


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
