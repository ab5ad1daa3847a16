"""Context dilution: does the extracted bracket circuit predict where the models fail?

PAPER.md (bracket circuit, "Attacks on it"): the `[` embedding writes
detector channels, a head with near-constant query and keys averages them over
the context into a depth channel, and a later head or MLP thresholds it. An
average falls like 1/length, so the paper predicts that long nested lists are
read as flat; and a stray `[` in a comment (`# Don't get distracted: [`) before
a flat list makes the model close it with `]]`. This script puts the models
and the circuit side by side on those prompts:

* **prompts** are bracket_counting's own (``circuitir/tasks``: the task's
  preamble lines, variable names and digit lists; nested `x = [[1, 2]` wants
  `]`, flat `x = [1, 2]` a newline, in contrasting pairs), grown from the
  shortest up to the model's context (block_size) in two ways:
  *list*, more elements in the list (the paper's attack), and *context*, more
  lines of the task's bracket-free preamble code before a list of its usual 1
  to 4 elements (the same dilution without a long list);
* **P(correct)** is the task's measure, the softmax over the two candidates at
  the last token, for the weight-sparse model, the dense model, and the
  circuit compiled and run on its own (``circuit.compile()``: no model);
* **the depth channel** is found from the circuit, not named by hand: among the
  circuit's kept attention writes (``{L}.attn.resid_delta`` nodes, where an
  averaging head's output enters the residual stream) the channel whose value
  at the last token, in the circuit alone, best separates nested from flat
  train-split task prompts (|Cohen's d|). Its value is read in the compiled
  circuit and, for the same channel, in the full sparse model; the
  nested-minus-flat gap of each contrasting pair is fitted as a + b/n (n the
  prompt's length in tokens), with R^2 beside that of a straight line a + b*n;
* **the distractor**: the task's prompts with `# Don't get distracted: [` as
  the preceding line, and the same comment without the `[` as a control.

The verdict compares, per sweep and per kind of prompt (nested, flat), how each
system's mean P(correct) moves with length: it *holds*, *degrades* (falls by
at least 0.15 from the shortest bucket) or *fails* (falls below 1/2 in some
bucket, the first such bucket its *onset*). A model's behaviour is predicted
when the circuit holds where the model holds and falls where it falls; the
distractor is predicted when it fools the circuit and the model alike. Each
line gives the numbers, so "predicted" can be read with its size.

    python benchmarks/context_dilution.py [--quick] [--json OUT] [--plot PNG]

About 25 s on one core by default (``--quick``: 5 s, and no figure); figures
measured on the shipped models are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import circuitir as cir  # noqa: E402
from circuitir.errors import UserError  # noqa: E402
from circuitir.render.plots import write_results  # noqa: E402
from circuitir.ir.circuit import Node, site_specs  # noqa: E402
from circuitir.ir.masked import with_recordings  # noqa: E402
from circuitir.ir.trace import trace  # noqa: E402
from circuitir.tasks import NAMES, Example, number_list, pair, preamble  # noqa: E402
from circuitir.tasks.evaluate import candidate_logits, encode_examples  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK = "bracket_counting"
NESTED_ANSWER = "]"  # bracket_counting: `[[..]` is still open (answer `]`), `[..]` is closed (a newline)
SWEEPS = {"list": "more elements in the list (the paper's attack)",
          "context": "more lines of bracket-free code before a list of 1-4 elements"}
DISTRACTOR = "# Don't get distracted: ["
CONDITIONS = {"plain": None, "distractor": DISTRACTOR, "control": DISTRACTOR[:-2]}  # control: no `[`
SYSTEMS = ("sparse", "dense", "circuit")
KINDS = ("nested", "flat")
FAILED = 0.5  # mean P(correct) below this: the system reads that kind of prompt as the other kind
DEGRADED = 0.15  # a fall in mean P(correct) of at least this much from the shortest bucket counts as degrading


# ---------------------------------------------------------------- prompts

def bracket_pair(head: str, inner: str) -> tuple[Example, Example]:
    """bracket_counting's contrasting pair (nested first) for one head and list body."""
    return pair((f"{head}[[{inner}]", NESTED_ANSWER, "\n"), (f"{head}[{inner}]", "\n", ""))


def grown_pair(sweep: str, step: int, rng: random.Random) -> tuple[Example, Example]:
    """A pair of the task's shape grown ``step`` times: ``step + 1`` list elements (``list``) or
    ``step`` preamble lines before the task's usual list (``context``)."""
    if sweep == "list":
        head = preamble(rng) + f"{rng.choice(NAMES)} = "
        return bracket_pair(head, number_list(rng, step + 1, step + 1))
    head = "".join(preamble(rng) for _ in range(step)) + f"{rng.choice(NAMES)} = "
    return bracket_pair(head, number_list(rng))


def sweep_prompts(sweep: str, pairs_per_step: int, tokenizer, block_size: int, seed: int) -> list[Example]:
    """Pairs (nested, flat, nested, flat, ...) at every growth step until none fits the context."""
    rng = random.Random(f"context-dilution:{sweep}:{seed}")
    out = []
    for step in range(block_size):
        fitting = [p for p in (grown_pair(sweep, step, rng) for _ in range(pairs_per_step))
                   if len(tokenizer.encode(p[0].prompt)) <= block_size]
        if not fitting and step > 0:
            break
        out.extend(example for p in fitting for example in p)
    return out


def distractor_prompts(n_pairs: int, seed: int) -> dict[str, list[Example]]:
    """The same pairs under each condition: the task's own preamble, the distractor line, the control line."""
    out = {}
    for condition, line in CONDITIONS.items():
        rng = random.Random(f"context-dilution:distractor:{seed}")
        examples = []
        for _ in range(n_pairs):
            first = preamble(rng)  # drawn under every condition, so the names and lists are the same
            head = (first if line is None else line + "\n") + f"{rng.choice(NAMES)} = "
            examples.extend(bracket_pair(head, number_list(rng)))
        out[condition] = examples
    return out


# ---------------------------------------------------------------- the circuit, recorded

class CircuitRecorder(torch.fx.Interpreter):
    """Runs a compiled circuit (``circuit.compile()``) and keeps every site's live vector.

    A site's live vector is the output of its ``LiveSite`` module, which ``compile`` traces through:
    the last graph node that torch.fx recorded inside that module (``nn_module_stack``). Its channels
    are the site's kept and constant nodes in ascending order, as ``compile`` lays them out."""

    def __init__(self, circuit, module=None):
        super().__init__(module if module is not None else circuit.compile())
        key_to_site = {spec.name.replace(".", "_"): spec.name for spec in site_specs(circuit.config)}
        last: dict[str, str] = {}  # site -> name of the last graph node inside its LiveSite
        for node in self.module.graph.nodes:
            for path in node.meta.get("nn_module_stack") or {}:
                parts = path.split(".")
                if len(parts) == 2 and parts[0] == "sites" and parts[1] in key_to_site:
                    last[key_to_site[parts[1]]] = node.name
        if not last:
            raise UserError("this torch does not record nn_module_stack while tracing: cannot read the circuit's sites")
        self.site_of: dict[str, str] = {node_name: site for site, node_name in last.items()}
        self.channels = {site: circuit.site_nodes(site) for site in last}
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, node):
        out = super().run_node(node)
        if node.name in self.site_of:
            self.values[self.site_of[node.name]] = out
        return out

    @torch.no_grad()
    def record(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(candidate logits (B, T, K), {site: live values (B, T, live channels)})."""
        self.values = {}
        logits = self.run(tokens)
        for site, value in self.values.items():
            if value.shape[-1] != len(self.channels[site]):
                raise UserError(f"recorded {site} has {value.shape[-1]} channels, the circuit "
                                f"{len(self.channels[site])}: compile's layout changed")
        return logits, self.values

    def node_value(self, values: dict, node: Node) -> torch.Tensor:
        return values[node.site][..., self.channels[node.site].index(node.index)]


def cohens_d(a: torch.Tensor, b: torch.Tensor) -> float:
    pooled = torch.sqrt((a.var() + b.var()) / 2)
    difference = a.mean() - b.mean()
    return 0.0 if float(difference) == 0 else float(difference / pooled.clamp_min(1e-12))


def find_depth_channel(circuit, recorder: CircuitRecorder, tokenizer, n: int = 256, seed: int = 0) -> dict:
    """The circuit's attention write that best separates nested from flat task prompts (circuit alone).

    Every kept node is scored (signed Cohen's d, nested minus flat, at the last token on ``n``
    train-split prompts); the depth channel is the best-scoring ``*.attn.resid_delta`` node, the
    residual channel an averaging head writes. Nodes downstream of it (the MLP that thresholds it,
    the final reads) separate the two as well or better: they are listed, not chosen."""
    task = cir.get_task(TASK)
    examples = task.examples("train", n, seed)
    batch = encode_examples(task, examples, tokenizer, circuit.config["block_size"])
    _, values = recorder.record(batch.tokens)
    rows = torch.arange(len(batch))
    nested = torch.tensor([e.correct == NESTED_ANSWER for e in examples])
    scores = []
    for node in circuit.kept_nodes():
        if node.site not in values:
            continue
        at_last = recorder.node_value(values, node)[rows, batch.last]
        scores.append({"node": str(node), "site": node.site, "channel": node.index,
                       "d": cohens_d(at_last[nested], at_last[~nested])})
    scores.sort(key=lambda s: -abs(s["d"]))  # stable: ties keep the circuit's node order
    writes = [s for s in scores if s["site"].endswith(".attn.resid_delta")]
    if not writes:
        raise UserError("the circuit keeps no attention write (*.attn.resid_delta): no depth channel to read")
    return {"node": writes[0]["node"], "site": writes[0]["site"], "channel": writes[0]["channel"],
            "d": writes[0]["d"], "attention_writes": writes[:5], "all_nodes": scores[:5], "n": len(examples)}


# ---------------------------------------------------------------- measuring

def binary_p(pair_logits: torch.Tensor) -> torch.Tensor:
    """P(correct) over the two candidates from (N, 2) logits [correct, alternative]."""
    return torch.sigmoid(pair_logits[:, 0] - pair_logits[:, 1])


@torch.no_grad()
def measure(systems: dict, examples: list[Example], batch_size: int = 128) -> dict:
    """Per prompt: its length, whether it is nested, P(correct) of each system, and the depth channel's
    value in the circuit (``depth_circuit``) and in the full sparse model (``depth_model``).

    Prompts run in batches of similar length (less padding: attention is causal, so right padding
    never changes a prompt's own positions)."""
    task = cir.get_task(TASK)
    sparse, dense, circuit = systems["sparse"], systems["dense"], systems["circuit"]
    recorder, depth = systems["recorder"], Node(systems["depth"]["site"], systems["depth"]["channel"])
    tokenizer, block_size = sparse.tokenizer, sparse.config.block_size
    lengths = np.array([len(tokenizer.encode(e.prompt)) for e in examples])
    order = np.argsort(lengths, kind="stable")
    n = len(examples)
    out = {"length": lengths, "nested": np.array([e.correct == NESTED_ANSWER for e in examples]),
           **{name: np.zeros(n) for name in (*SYSTEMS, "depth_circuit", "depth_model")}}
    for start in range(0, n, batch_size):
        index = order[start:start + batch_size]
        batch = encode_examples(task, [examples[i] for i in index], tokenizer, block_size)
        rows = torch.arange(len(batch))
        logits, sites, _ = systems["sparse_recording"](batch.tokens)
        out["sparse"][index] = binary_p(candidate_logits(logits, batch)).numpy()
        out["depth_model"][index] = sites[depth.site][rows, batch.last, depth.index].numpy()
        out["dense"][index] = binary_p(candidate_logits(dense.model(batch.tokens), batch)).numpy()
        circuit_logits, values = recorder.record(batch.tokens)
        at_last = circuit_logits[rows, batch.last]  # (B, K): the circuit's candidates
        position = {token: k for k, token in enumerate(circuit.candidates)}
        correct = torch.tensor([position[int(t)] for t in batch.correct])
        alternative = torch.tensor([position[int(t)] for t in batch.alternative])
        out["circuit"][index] = binary_p(torch.stack([at_last[rows, correct], at_last[rows, alternative]], -1)).numpy()
        out["depth_circuit"][index] = recorder.node_value(values, depth)[rows, batch.last].numpy()
    return out


def line_fits(lengths, values) -> dict:
    """Least-squares fits of ``values`` as a + b/n and as a + b*n, each with its R^2."""
    n = np.asarray(lengths, dtype=float)
    y = np.asarray(values, dtype=float)
    total = float(((y - y.mean()) ** 2).sum())
    fits = {}
    for name, x in (("inverse", 1.0 / n), ("linear", n)):
        design = np.stack([np.ones_like(x), x], axis=1)
        (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
        residual = float(((y - design @ np.array([a, b])) ** 2).sum())
        fits[name] = {"a": float(a), "b": float(b), "r2": 1.0 - residual / total if total > 0 else float("nan")}
    return fits


def pair_gaps(result: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
    """For each contrasting pair (nested at 2i, flat at 2i+1): the nested prompt's length and the
    nested-minus-flat value of ``key``."""
    return result["length"][0::2], result[key][0::2] - result[key][1::2]


def bucket_table(result: dict, width: int, block_size: int) -> list[dict]:
    """Mean of every measure per length bucket (lo, lo + width], per kind of prompt."""
    rows = []
    gap_lengths, gaps = pair_gaps(result, "depth_circuit")
    _, model_gaps = pair_gaps(result, "depth_model")
    for lo in range(0, block_size, width):
        hi = lo + width
        inside = (result["length"] > lo) & (result["length"] <= hi)
        if not inside.any():
            continue
        row = {"lo": lo, "hi": hi, "n": int(inside.sum())}
        for kind, mask in (("nested", result["nested"]), ("flat", ~result["nested"])):
            chosen = inside & mask
            row[kind] = {key: float(result[key][chosen].mean()) if chosen.any() else None
                         for key in (*SYSTEMS, "depth_circuit", "depth_model")}
            row[kind]["n"] = int(chosen.sum())
        pairs_inside = (gap_lengths > lo) & (gap_lengths <= hi)
        row["gap_circuit"] = float(gaps[pairs_inside].mean()) if pairs_inside.any() else None
        row["gap_model"] = float(model_gaps[pairs_inside].mean()) if pairs_inside.any() else None
        row["length_mean"] = float(result["length"][inside].mean())
        rows.append(row)
    return rows


def behaviour(table: list[dict], system: str, kind: str) -> dict:
    """How ``system``'s mean P(correct) on ``kind`` prompts changes with length: ``first`` (shortest
    bucket), ``worst`` and ``last`` (longest bucket); ``onset``, the first bucket below FAILED; and a status:
    ``fails`` (some bucket below FAILED), ``degrades`` (no bucket below FAILED, but ``first - worst`` at
    least DEGRADED), else ``holds``."""
    points = [(row, row[kind][system]) for row in table if row[kind][system] is not None]
    first, last = points[0][1], points[-1][1]
    worst_row, worst = min(points, key=lambda p: p[1])
    below = [row for row, value in points if value < FAILED]
    status = "fails" if below else ("degrades" if first - worst >= DEGRADED else "holds")
    return {"status": status, "first": first, "worst": worst, "last": last,
            "worst_bucket": [worst_row["lo"], worst_row["hi"]],
            "onset": [below[0]["lo"], below[0]["hi"]] if below else None}


def summarise(result: dict, table: list[dict]) -> dict:
    gap_lengths, gaps = pair_gaps(result, "depth_circuit")
    _, model_gaps = pair_gaps(result, "depth_model")
    choice = {name: result[name] > 0.5 for name in SYSTEMS}
    return {
        "fit_gap_circuit": line_fits(gap_lengths, gaps),
        "fit_gap_model": line_fits(gap_lengths, model_gaps),
        "behaviour": {kind: {name: behaviour(table, name, kind) for name in SYSTEMS} for kind in KINDS},
        # per prompt: does the circuit choose the answer each model chooses (right or wrong alike)?
        "agreement": {name: float((choice["circuit"] == choice[name]).mean()) for name in ("sparse", "dense")},
        "bucket_correlation": {
            name: float(np.corrcoef([r[k]["circuit"] for r in table for k in KINDS if r[k]["n"]],
                                    [r[k][name] for r in table for k in KINDS if r[k]["n"]])[0, 1])
            for name in ("sparse", "dense")},
    }


def distractor_summary(systems: dict, n_pairs: int, seed: int) -> dict:
    out = {}
    for condition, examples in distractor_prompts(n_pairs, seed).items():
        result = measure(systems, examples)
        out[condition] = {kind: {key: float(result[key][mask].mean())
                                 for key in (*SYSTEMS, "depth_circuit", "depth_model")}
                          for kind, mask in (("nested", result["nested"]), ("flat", ~result["nested"]))}
    return out


def prepare(sparse, dense, circuit, depth_prompts: int = 256, seed: int = 0) -> dict:
    """Everything ``measure`` needs: the models, the compiled circuit with its recorder, the depth channel."""
    source = circuit.header.get("source", {}).get("sha256")
    if source is not None and sparse.sha256 and source != sparse.sha256:
        print(f"warning: the circuit's source.sha256 {source[:12]} is not the sparse model's "
              f"{sparse.sha256[:12]}", file=sys.stderr)
    sparse.model.eval()
    dense.model.eval()
    recorder = CircuitRecorder(circuit)
    return {"sparse": sparse, "dense": dense, "circuit": circuit, "recorder": recorder,
            "sparse_recording": with_recordings(trace(sparse.model)),
            "depth": find_depth_channel(circuit, recorder, sparse.tokenizer, depth_prompts, seed)}


def run(sparse, dense, circuit, *, pairs_per_step: int = 48, distractor_pairs: int = 256,
        depth_prompts: int = 256, buckets: int = 8, seed: int = 0) -> dict:
    """The whole measurement: depth channel, both sweeps (per-prompt results, bucket tables, fits,
    onsets), the distractor; the sparse and dense models are :class:`LoadedModel`, ``circuit`` a Circuit."""
    started = time.perf_counter()
    systems = prepare(sparse, dense, circuit, depth_prompts, seed)
    block_size = sparse.config.block_size
    width = max(1, block_size // buckets)
    out = {"block_size": block_size, "bucket_width": width, "depth": systems["depth"], "sweeps": {}}
    for sweep in SWEEPS:
        examples = sweep_prompts(sweep, pairs_per_step, sparse.tokenizer, block_size, seed)
        result = measure(systems, examples)
        table = bucket_table(result, width, block_size)
        out["sweeps"][sweep] = {"n": len(examples), "table": table, "summary": summarise(result, table),
                                "prompts": result, "example_longest": examples[int(np.argmax(result["length"]))].prompt}
    out["distractor"] = distractor_summary(systems, distractor_pairs, seed)
    out["verdict"] = verdict(out)
    out["seconds"] = time.perf_counter() - started
    return out


# ---------------------------------------------------------------- verdict

def describe(found: dict) -> str:
    where = f", below {FAILED} from ({found['onset'][0]},{found['onset'][1]}]" if found["onset"] else ""
    return (f"{found['status']} ({found['first']:.2f} -> worst {found['worst']:.2f} at "
            f"({found['worst_bucket'][0]},{found['worst_bucket'][1]}] -> {found['last']:.2f}{where})")


def verdict(out: dict) -> dict:
    """Per sweep and kind of prompt: a model's behaviour is *predicted* when the circuit's P(correct) moves
    the same way with length (both hold, or both degrade or fail); and the distractor is predicted when
    it fools (mean P(correct) below 1/2 on flat lists) the circuit and the model alike."""
    lines, matches = [], {}
    for sweep, data in out["sweeps"].items():
        found = data["summary"]["behaviour"]
        for kind in KINDS:
            circuit = found[kind]["circuit"]
            for model in ("sparse", "dense"):
                predicted = (circuit["status"] == "holds") == (found[kind][model]["status"] == "holds")
                matches[f"{sweep}/{kind}/{model}"] = predicted
                if circuit["status"] == found[kind][model]["status"] == "holds":
                    continue  # nothing happens to either: not worth a line
                lines.append(f"{sweep} sweep, {kind}, {model}: {'predicted' if predicted else 'NOT predicted'}: "
                             f"{model} {describe(found[kind][model])}; circuit {describe(circuit)}")
    flat = out["distractor"]["distractor"]["flat"]
    fooled = {name: flat[name] < FAILED for name in SYSTEMS}
    for model in ("sparse", "dense"):
        matches[f"distractor/flat/{model}"] = fooled["circuit"] == fooled[model]
    lines.append("distractor on flat lists: " + ", ".join(
        f"{name} {'fooled' if fooled[name] else 'not fooled'} (P {flat[name]:.2f}; control line "
        f"{out['distractor']['control']['flat'][name]:.2f})" for name in SYSTEMS))
    missed = [key for key, ok in matches.items() if not ok]
    return {"matches": matches, "lines": lines,
            "headline": f"the circuit predicts {len(matches) - len(missed)} of {len(matches)} model behaviours "
                        "(a model's P(correct) holding or falling with length, per sweep and kind; the distractor)"
                        + (f"; not: {', '.join(missed)}" if missed else "")}


# ---------------------------------------------------------------- printing and plotting

def fmt(value, digits: int = 3) -> str:
    return "    -" if value is None else f"{value:.{digits}f}"


def print_report(out: dict) -> None:
    depth = out["depth"]
    print(f"depth channel (found in the circuit, {depth['n']} train-split task prompts): {depth['node']}, "
          f"Cohen's d nested - flat = {depth['d']:+.2f}")
    print("  best attention writes: " + ", ".join(f"{s['node']} {s['d']:+.2f}" for s in depth["attention_writes"]))
    print("  best of all nodes:     " + ", ".join(f"{s['node']} {s['d']:+.2f}" for s in depth["all_nodes"]))
    for sweep, data in out["sweeps"].items():
        print(f"\n== {sweep} sweep: {SWEEPS[sweep]}; {data['n']} prompts, longest {data['example_longest']!r}")
        print("P(correct), mean per length bucket (tokens); depth = the depth channel at the last token "
              "(circuit alone; 'model': the same channel in the full sparse model)")
        print(f"{'length':>10} {'n':>4} | {'nested: sparse':>14} {'dense':>6} {'circuit':>7} | "
              f"{'flat: sparse':>12} {'dense':>6} {'circuit':>7} | {'depth nested':>12} {'flat':>7} {'gap':>7} "
              f"| {'model gap':>9}")
        for row in data["table"]:
            nested, flat = row["nested"], row["flat"]
            print(f"{'(%d,%d]' % (row['lo'], row['hi']):>10} {row['n']:>4} | {fmt(nested['sparse']):>14} "
                  f"{fmt(nested['dense']):>6} {fmt(nested['circuit']):>7} | {fmt(flat['sparse']):>12} "
                  f"{fmt(flat['dense']):>6} {fmt(flat['circuit']):>7} | {fmt(nested['depth_circuit']):>12} "
                  f"{fmt(flat['depth_circuit']):>7} {fmt(row['gap_circuit']):>7} | {fmt(row['gap_model']):>9}")
        summary = data["summary"]
        for label, key in (("circuit", "fit_gap_circuit"), ("sparse model", "fit_gap_model")):
            fit = summary[key]
            print(f"depth gap (nested - flat, per pair) in the {label}: a + b/n with a = {fit['inverse']['a']:+.4f}, "
                  f"b = {fit['inverse']['b']:+.3f}, R^2 = {fit['inverse']['r2']:.3f}  "
                  f"(straight line a + b*n: R^2 = {fit['linear']['r2']:.3f})")
        print("agreement of the circuit's answer with each model's, per prompt: "
              + ", ".join(f"{k} {v:.3f}" for k, v in summary["agreement"].items())
              + "; correlation of bucket P(correct): "
              + ", ".join(f"{k} {v:.3f}" for k, v in summary["bucket_correlation"].items()))
    print("\n== distractor: the task's prompts with the line before the list replaced")
    print(f"{'condition':>10} | {'nested: sparse':>14} {'dense':>6} {'circuit':>7} | {'flat: sparse':>12} "
          f"{'dense':>6} {'circuit':>7} | {'depth nested':>12} {'flat':>7}")
    for condition, kinds in out["distractor"].items():
        nested, flat = kinds["nested"], kinds["flat"]
        print(f"{condition:>10} | {fmt(nested['sparse']):>14} {fmt(nested['dense']):>6} {fmt(nested['circuit']):>7} | "
              f"{fmt(flat['sparse']):>12} {fmt(flat['dense']):>6} {fmt(flat['circuit']):>7} | "
              f"{fmt(nested['depth_circuit']):>12} {fmt(flat['depth_circuit']):>7}")
    print(f"  distractor line: {DISTRACTOR!r}; control: {CONDITIONS['control']!r}; plain: the task's own preamble")
    print()
    for line in out["verdict"]["lines"]:
        print(f"  {line}")
    print(f"VERDICT: {out['verdict']['headline']}")


def plot(out: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"sparse": "tab:blue", "dense": "tab:orange", "circuit": "tab:green"}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for ax, (sweep, data) in zip(axes[0], out["sweeps"].items()):
        table = data["table"]
        for kind, style, face in (("nested", "-", None), ("flat", "--", "white")):
            for name in SYSTEMS:
                points = [(r["length_mean"], r[kind][name]) for r in table if r[kind][name] is not None]
                ax.plot(*zip(*points), style, marker="o" if face is None else "s", ms=4, mfc=face,
                        color=colours[name], label=f"{name}, {kind}")
        ax.axhline(FAILED, color="grey", lw=0.6)
        ax.set_ylim(0, 1.02)
        ax.set_xlim(0, out["block_size"])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("P(correct closing token)")
        ax.set_title(f"{sweep} sweep: {SWEEPS[sweep]}", fontsize=9)
        ax.legend(fontsize=7, ncol=2, loc="lower left")
    ax = axes[1][0]
    depth = out["depth"]
    for sweep, marker, colour in (("list", "o", "tab:purple"), ("context", "s", "tab:brown")):
        prompts = out["sweeps"][sweep]["prompts"]
        lengths, gaps = pair_gaps(prompts, "depth_circuit")
        ax.scatter(lengths, gaps, s=4, alpha=0.3, marker=marker, color=colour,
                   label=f"{sweep} sweep, circuit (per pair)")
        fit = out["sweeps"][sweep]["summary"]["fit_gap_circuit"]["inverse"]
        grid = np.linspace(max(lengths.min(), 1), lengths.max(), 200)
        ax.plot(grid, fit["a"] + fit["b"] / grid, lw=1.5, color=colour,
                label=f"{sweep}: {fit['a']:+.3f} {fit['b']:+.2f}/n, R²={fit['r2']:.2f}")
        rows = out["sweeps"][sweep]["table"]
        ax.plot([r["length_mean"] for r in rows], [r["gap_model"] for r in rows], ":", marker=marker, ms=3,
                color="black", lw=1, label=f"{sweep}: same channel, full sparse model (bucket mean)")
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlabel("prompt length n (tokens)")
    ax.set_ylabel("depth channel: nested − flat (same list, one `[` more)")
    ax.set_title(f"depth channel {depth['node']} (found in the circuit, d = {depth['d']:+.1f})", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1][1]
    conditions = list(out["distractor"])
    x = np.arange(len(conditions))
    bar = 0.13
    for i, name in enumerate(SYSTEMS):
        for j, kind in enumerate(KINDS):
            values = [out["distractor"][c][kind][name] for c in conditions]
            ax.bar(x + (2 * i + j - 2.5) * bar, values, bar, color=colours[name], alpha=1.0 if kind == "flat" else 0.45,
                   label=f"{name}, {kind}")
    ax.axhline(FAILED, color="grey", lw=0.6)
    ax.set_xticks(x, [f"{c}\n{CONDITIONS[c]!r}" if CONDITIONS[c] else f"{c}\n(task preamble)" for c in conditions],
                  fontsize=8)
    ax.set_ylim(0, 1.3)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("P(correct closing token)")
    ax.set_title("distractor line before the list (flat: solid; nested: pale)", fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="upper center")
    names = {k: Path(v).name for k, v in out.get("inputs", {}).items() if k in ("sparse", "dense", "circuit")}
    fig.suptitle(f"Context dilution on {TASK}: sparse model {names.get('sparse', '')}, dense model "
                 f"{names.get('dense', '')}, circuit {names.get('circuit', '')} run alone", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def numpy_to_json(value):
    """``json.dumps`` default for the numpy values in the results."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparse", default=str(ROOT / "models" / "sparse.pt"))
    parser.add_argument("--dense", default=str(ROOT / "models" / "dense.pt"))
    parser.add_argument("--circuit", default=str(ROOT / "examples" / "sparse-brackets.cir"))
    parser.add_argument("--pairs-per-step", type=int, default=48,
                        help="contrasting pairs per growth step (one more list element or preamble line)")
    parser.add_argument("--distractor-pairs", type=int, default=256)
    parser.add_argument("--buckets", type=int, default=8, help="length buckets over the context")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few prompts per step: a smoke run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot", help="write the figure here ('' for none; default "
                        "benchmarks/context_dilution.png, none with --quick)")
    parser.add_argument("--json", help="write every figure (and every prompt's measures) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.pairs_per_step, args.distractor_pairs = 4, 32
    if args.plot is None:
        args.plot = "" if args.quick else str(ROOT / "benchmarks" / "context_dilution.png")
    try:
        sparse, dense, circuit = cir.load_model(args.sparse), cir.load_model(args.dense), cir.load(args.circuit)
        out = run(sparse, dense, circuit, pairs_per_step=args.pairs_per_step,
                  distractor_pairs=args.distractor_pairs, buckets=args.buckets, seed=args.seed)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out["inputs"] = {"sparse": args.sparse, "dense": args.dense, "circuit": args.circuit,
                     "pairs_per_step": args.pairs_per_step, "distractor_pairs": args.distractor_pairs,
                     "seed": args.seed}
    print_report(out)
    print(f"({out['seconds']:.0f} s)")
    write_results(out, plot, args.plot, args.json, json_default=numpy_to_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
