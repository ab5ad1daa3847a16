"""What drives each node of a circuit, measured on the model it came from.

For every kept node (a channel at a site) :func:`explain` reports

* its top-activating positions in held-out pretraining text (the corpus's
  validation split) and in the task's prompts, each with a window of context;
* its mean activation at the last position of the task's prompts, split by
  the prompt's correct answer (one class per candidate token);
* for residual channels (``act_in``, ``resid_delta``, ``final_resid``), the
  tokens whose embedding writes the channel most;

and a short generated label built from those. :func:`annotate` writes the
labels into a circuit as ``auto`` annotations, never over a hand-written one.
Activations are the full model's (nothing ablated): a node is described by
what it does in the model the circuit was cut from.
"""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field

import torch

from circuitir.errors import UserError
from circuitir.ir.circuit import Circuit, Label, Node, site_specs

RESIDUAL_KINDS = ("act_in", "resid_delta", "final_resid")


@dataclass
class Context:
    before: str
    token: str
    after: str
    activation: float


@dataclass
class NodeExplanation:
    node: str
    kind: str                                   # the site's kind: act_in, q, k, v, post_act, ...
    label: str                                  # generated, short
    sign: int = 1                               # +1: ranked by activation; -1: by its negative
    corpus_mean: float = 0.0
    corpus_contexts: list[Context] = field(default_factory=list)
    task_contexts: list[Context] = field(default_factory=list)
    class_means: dict[str, float] = field(default_factory=dict)   # candidate token -> mean at the last position
    class_std: float = 0.0
    embed_tokens: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def display_text(text: str) -> str:
    """Token text as a reader would write it, ASCII only: `[`, `\\n`, `sp` for a space."""
    if text == " ":
        return "sp"
    return text.encode("unicode_escape").decode("ascii") or repr(text)


def token_text(tokenizer, token: int) -> str:
    """A token of ``tokenizer`` as :func:`display_text` writes it (a lone byte of a character as \\xNN)."""
    text = tokenizer.decode([int(token)])
    if "\ufffd" in text and getattr(tokenizer, "vocab_size", 0) == 256:
        return f"\\x{int(token):02x}"
    return display_text(text)


# ---------------------------------------------------------------- measuring

def record_activations(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-site activations of the unablated model, (N*T, width) each. The one call into the ablation
    module, so that a rename there changes one line here."""
    from circuitir.ir.ablation import record_sites

    return record_sites(model, tokens)


def corpus_windows(loaded, n_windows: int, length: int, seed: int) -> torch.Tensor:
    """``n_windows`` windows of held-out pretraining text (the model's corpus, validation split)."""
    from circuitir.data.corpus import default_corpus_dir, load_corpus

    root = (loaded.meta.get("corpus") or {}).get("root")
    try:
        corpus = load_corpus(root if root else None, loaded.tokenizer)
    except UserError:
        corpus = load_corpus(default_corpus_dir(), loaded.tokenizer)  # the corpus moved: this interpreter's
    text = corpus.validation.long()
    length = min(length, loaded.config.block_size, len(text))
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(text) - length + 1, (n_windows,), generator=generator)
    return torch.stack([text[s:s + length] for s in starts.tolist()])


def prompt_batch(tokenizer, prompts: list[str], block_size: int) -> tuple[torch.Tensor, list[int]]:
    """Prompts padded on the right (causal attention: padding never changes earlier positions)."""
    encoded = [tokenizer.encode(p)[-block_size:] for p in prompts]
    width = max(len(e) for e in encoded)
    batch = torch.zeros(len(encoded), width, dtype=torch.long)
    for row, tokens in enumerate(encoded):
        batch[row, :len(tokens)] = torch.tensor(tokens)
    return batch, [len(e) for e in encoded]


def _context(tokenizer, row: torch.Tensor, position: int, end: int, activation: float,
             before: int = 24, after: int = 4) -> Context:
    decode = lambda ids: tokenizer.decode([int(t) for t in ids])  # noqa: E731
    return Context(decode(row[max(0, position - before):position]), decode(row[position:position + 1]),
                   decode(row[position + 1:min(end, position + 1 + after)]), round(float(activation), 4))


def _top_contexts(tokenizer, tokens, lengths, values: torch.Tensor, sign: int, top: int) -> list[Context]:
    """The ``top`` positions where ``sign * values`` is largest (values: (N, T); padding excluded)."""
    n, width = tokens.shape
    valid = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    scores = torch.where(valid, sign * values, torch.tensor(float("-inf")))
    order = torch.argsort(scores.flatten(), descending=True)[:top]
    return [_context(tokenizer, tokens[i // width], int(i % width), lengths[i // width],
                     float(values.flatten()[i])) for i in order.tolist() if torch.isfinite(scores.flatten()[i])]


def _label(explanation: NodeExplanation, top_tokens: list[str]) -> str:
    """``on [ ( , | ans ]>\\n``: the tokens it fires on (``neg`` when it goes negative on them), and which
    task answer it is higher for, when the two classes' means differ by more than half a standard deviation."""
    parts = [("on " if explanation.sign > 0 else "neg ") + " ".join(top_tokens[:3])]
    if len(explanation.class_means) == 2:
        (a, mean_a), (b, mean_b) = explanation.class_means.items()
        spread = abs(mean_a - mean_b)
        if spread > 0.5 * explanation.class_std and spread > 1e-6:
            high, low = (a, b) if mean_a > mean_b else (b, a)
            parts.append(f"ans {high}>{low}")
    return " | ".join(parts)


def explain(circuit: Circuit, loaded, task=None, n_windows: int = 256, window: int = 64, n_prompts: int = 256,
            top: int = 8, seed: int = 0) -> dict[Node, NodeExplanation]:
    """An explanation for every kept node and output of ``circuit`` (see the module docstring)."""
    from circuitir.tasks import get_task

    tokenizer, model = loaded.tokenizer, loaded.model
    if tokenizer is None:
        raise UserError("explain needs a model with a tokenizer (byte-level or tinypython)")
    if circuit.config.get("d_model") != loaded.config.d_model or \
            circuit.config.get("n_layer") != loaded.config.n_layer:
        raise UserError("the circuit's config does not match the model's (d_model / n_layer differ): "
                        "explain a circuit with the model it was extracted from")
    name = task if task is not None else circuit.provenance.task
    task_obj = get_task(name) if name else None
    specs = {s.name: s for s in site_specs(circuit.config, len(circuit.candidates))}
    candidates = [token_text(tokenizer, t) for t in circuit.candidates]

    model.eval()
    windows = corpus_windows(loaded, n_windows, window, seed)
    corpus_acts = record_activations(model, windows)
    prompts, lengths, classes = [], [], []
    if task_obj is not None:
        examples = task_obj.examples("heldout", n_prompts, seed=seed)
        prompts = [e.prompt for e in examples]
        first = [tokenizer.encode(e.correct)[0] for e in examples]
        classes = [circuit.candidates.index(t) if t in circuit.candidates else -1 for t in first]
        prompt_tokens, lengths = prompt_batch(tokenizer, prompts, loaded.config.block_size)
        prompt_acts = record_activations(model, prompt_tokens)
        last = torch.tensor(lengths) - 1

    out: dict[Node, NodeExplanation] = {}
    embedding = model.state_dict().get("transformer.wte.weight")
    for node in circuit.sorted(n for n, d in circuit.nodes.items() if d.kind in ("kept", "output")):
        if node.site == "logits":
            token = candidates[node.index]
            out[node] = NodeExplanation(str(node), "logits", f"logit {token}")
            continue
        kind = specs[node.site].kind
        values = corpus_acts[node.site][:, node.index].reshape(windows.shape)
        sign = 1 if float(values.max()) - float(values.median()) >= float(values.median()) - float(values.min()) \
            else -1
        explanation = NodeExplanation(str(node), kind, "", sign, round(float(values.mean()), 4))
        explanation.corpus_contexts = _top_contexts(tokenizer, windows, [windows.shape[1]] * len(windows), values,
                                                    sign, top)
        top_tokens = _top_tokens(tokenizer, windows, values, sign)
        if task_obj is not None:
            prompt_values = prompt_acts[node.site][:, node.index].reshape(prompt_tokens.shape)
            explanation.task_contexts = _top_contexts(tokenizer, prompt_tokens, lengths, prompt_values, sign, top)
            at_last = prompt_values[torch.arange(len(prompts)), last]
            for k, token in enumerate(candidates):
                chosen = at_last[torch.tensor(classes) == k]
                if len(chosen):
                    explanation.class_means[token] = round(float(chosen.mean()), 4)
            explanation.class_std = round(float(at_last.std()), 4) if len(at_last) > 1 else 0.0
        if kind in RESIDUAL_KINDS:
            column = circuit.embed.get(node.index)
            if column is None and embedding is not None:
                column = embedding[:, node.index]
            if column is not None:
                order = torch.argsort(column.abs(), descending=True)[:5]
                explanation.embed_tokens = [(token_text(tokenizer, int(t)), round(float(column[t]), 4))
                                            for t in order.tolist() if float(column[t]) != 0.0]
        explanation.label = _label(explanation, top_tokens)
        out[node] = explanation
    return out


def _top_tokens(tokenizer, windows, values, sign, share: float = 0.1) -> list[str]:
    """The current tokens of the strongest 1% of positions (at least 32), each holding at least ``share`` of
    them, most frequent first (at least the most frequent one)."""
    top = max(32, values.numel() // 100)
    order = torch.argsort((sign * values).flatten(), descending=True)[:top]
    counts = collections.Counter(int(windows.flatten()[i]) for i in order.tolist()).most_common(3)
    return [token_text(tokenizer, t) for rank, (t, count) in enumerate(counts) if rank == 0 or count >= share * top]


def annotate(circuit: Circuit, explanations: dict[Node, NodeExplanation]) -> int:
    """Write the generated labels into ``circuit`` as ``auto`` labels; hand-written ones are kept.

    Returns the number of labels written."""
    written = 0
    for node, explanation in explanations.items():
        current = circuit.labels.get(node)
        if current is not None and current.source == "hand":
            continue
        circuit.labels[node] = Label(explanation.label, "auto")
        written += 1
    return written


def format_explanations(explanations: dict[Node, NodeExplanation], circuit: Circuit, width: int = 100) -> str:
    """A readable text report: one paragraph a node."""
    lines = []
    for node, e in explanations.items():
        label = circuit.labels.get(node)
        shown = label.text if label is not None else e.label
        mark = "" if label is None or label.source == "auto" else "  (hand-written)"
        lines.append(f"{node}: {shown}{mark}")
        if e.kind == "logits":
            continue
        if e.class_means:
            means = ", ".join(f"answer {k!s}: {v:+.3f}" for k, v in e.class_means.items())
            lines.append(f"    mean at the last prompt token: {means} (std {e.class_std:.3f})")
        if e.embed_tokens:
            lines.append("    embedding writes it: " + " ".join(f"{t}({v:+.2f})" for t, v in e.embed_tokens))
        for title, contexts in (("corpus", e.corpus_contexts[:3]), ("task", e.task_contexts[:3])):
            for c in contexts:
                text = f"{c.before}[[{c.token}]]{c.after}".encode("unicode_escape").decode("ascii")
                lines.append(f"    {title} {c.activation:+8.3f}  ...{text[-(width - 26):]}")
    return "\n".join(lines)
