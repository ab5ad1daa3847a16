"""``circuitir report``: one self-contained HTML page about a circuit.

Everything is inline (SVG figures, CSS, a little JavaScript), so the file
opens anywhere without a network: the collapsed and the full figure, the
``check`` table, the node table with each node's explanation, and per node
its top-activating contexts. Clicking a node in the full figure (or its row in
the table) highlights its edges and its row.
"""

from __future__ import annotations

import copy
import html
import re

from circuitir.explain import NodeExplanation, annotate
from circuitir.ir.circuit import Circuit, Node
from circuitir.render.graphviz import render_bytes
from circuitir.render.structure import title_of

CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1200px; color: #222; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px; }
.meta { color: #555; }
figure { margin: 12px 0; overflow: auto; border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
figure svg { max-width: 100%; height: auto; }
#full svg { max-width: none; }
figcaption { color: #555; font-size: 13px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { border-bottom: 1px solid #e4e4e4; padding: 4px 6px; text-align: left; vertical-align: top; }
th { background: #f6f6f6; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pass { color: #1a7f37; font-weight: 600; } .fail { color: #c0392b; font-weight: 600; }
code, .ctx { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }
.ctx { white-space: pre; display: block; }
.ctx mark { background: #ffd54f; padding: 0 1px; }
.ctx .ws { color: #aaa; }
.hand { color: #1a7f37; } .auto { color: #777; }
tr.node-row { cursor: pointer; } tr.node-row.selected { background: #fff3c4; }
#full g.node { cursor: pointer; }
#full.has-selection g.edge { opacity: 0.08; }
#full.has-selection g.edge.hl { opacity: 1; }
#full g.edge.hl path { stroke-width: 3px; }
#full g.node.selected path, #full g.node.selected polygon { stroke: #ff8f00; stroke-width: 3px; }
#full g.node.neighbour path, #full g.node.neighbour polygon { stroke: #ff8f00; stroke-width: 1.5px; }
details { margin: 2px 0; } summary { cursor: pointer; }
"""

SCRIPT = r"""
(function () {
  "use strict";
  const figure = document.getElementById("full");
  const nodes = new Map();
  figure.querySelectorAll("g.node").forEach(function (g) {
    const name = g.querySelector("title").textContent;
    nodes.set(name, g);
    g.addEventListener("click", function () { select(name); });
  });
  const edges = Array.from(figure.querySelectorAll("g.edge")).map(function (g) {
    const ends = g.querySelector("title").textContent.split("->");
    return { g: g, source: ends[0], target: ends[1] };
  });
  const rows = new Map();
  document.querySelectorAll("tr.node-row").forEach(function (row) {
    rows.set(row.dataset.node, row);
    row.addEventListener("click", function () { select(row.dataset.node); });
  });
  function select(name) {
    figure.classList.add("has-selection");
    nodes.forEach(function (g) { g.classList.remove("selected", "neighbour"); });
    rows.forEach(function (row) { row.classList.remove("selected"); });
    let count = 0;
    edges.forEach(function (edge) {
      const on = edge.source === name || edge.target === name;
      edge.g.classList.toggle("hl", on);
      if (on) {
        count += 1;
        const other = nodes.get(edge.source === name ? edge.target : edge.source);
        if (other) { other.classList.add("neighbour"); }
      }
    });
    if (nodes.has(name)) { nodes.get(name).classList.add("selected"); }
    if (rows.has(name)) { rows.get(name).classList.add("selected"); }
    document.body.dataset.selected = name;
    document.body.dataset.highlighted = String(count);
    const status = document.getElementById("selection");
    status.textContent = name + ": " + count + " edges highlighted";
  }
  // #click=NODE clicks that node on load (a link to a node; also how the tests drive a real click).
  const match = /^#click=(.+)$/.exec(decodeURIComponent(window.location.hash));
  if (match && nodes.has(match[1])) {
    nodes.get(match[1]).dispatchEvent(new MouseEvent("click", { bubbles: true }));
  }
  document.body.dataset.ready = "1";
})();
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def inline_svg(data: bytes, prefix: str) -> str:
    """SVG from Graphviz, ready to inline: no XML prolog or doctype, ids unique to this figure."""
    text = data.decode("utf-8")
    text = text[text.index("<svg"):]
    text = re.sub(r'\bid="', f'id="{prefix}', text)
    return re.sub(r"<!--.*?-->", "", text, flags=re.S)


def _shown(text: str) -> str:
    """Context text on one line: newlines and tabs as visible marks."""
    return _e(text).replace("\n", '<span class="ws">&#8629;</span>').replace("\t", '<span class="ws">&#8677;</span>')


def _context_html(context) -> str:
    return (f"<span class=\"ctx\">{context.activation:+8.3f}  {_shown(context.before)}<mark>{_shown(context.token)}"
            f"</mark>{_shown(context.after)}</span>")


def check_table(result: dict | None) -> str:
    if result is None:
        return ("<p>Not checked here. Run <code>circuitir check C.cir M.pt --json &gt; check.json</code> and give "
                "<code>--check-json check.json</code>, or leave out <code>--no-check</code>.</p>")
    mark = lambda ok: '<span class="pass">PASS</span>' if ok else '<span class="fail">FAIL</span>'  # noqa: E731
    s, n, m, f = (result[k] for k in ("sufficiency", "necessity", "minimality", "faithfulness"))
    rows = [("sufficiency", s["passed"], f"circuit alone: loss {s['loss']:.4f} &le; target {s['target_loss']} "
                                         f"(accuracy {s['accuracy']:.3f}, {s['n']} held-out prompts)"),
            ("necessity", n["passed"], f"model without the circuit: loss {n['ablated_loss']:.4f} &ge; "
                                       f"{n['threshold']:.4f} (full model {n['full_model_loss']:.4f})"),
            ("minimality", m["passed"], f"{m['necessary']}/{m['total']} nodes push the loss over the target when "
                                        f"removed"),
            ("faithfulness", f["passed"], f"circuit vs ablated model: max |&Delta;logit| "
                                          f"{f['max_abs_logit_diff']:.2e}")]
    body = "".join(f"<tr><td>{name}</td><td>{mark(ok)}</td><td>{text}</td></tr>" for name, ok, text in rows)
    verdict = "all claims hold" if result["passed"] else "some claims FAIL"
    return (f"<table id=\"check\"><tr><th>claim</th><th>result</th><th>measured</th></tr>{body}</table>"
            f"<p>{mark(result['passed'])} {verdict}</p>")


def node_table(circuit: Circuit, explanations: dict[Node, NodeExplanation]) -> str:
    rows = []
    for node, e in explanations.items():
        label = circuit.labels.get(node)
        source = label.source if label else "auto"
        text = label.text if label else e.label
        means = " ".join(f"<code>{_e(k)}</code>&nbsp;{v:+.3f}" for k, v in e.class_means.items())
        embed = " ".join(f"<code>{_e(t)}</code>{v:+.2f}" for t, v in e.embed_tokens[:4])
        best = _context_html(e.corpus_contexts[0]) if e.corpus_contexts else ""
        rows.append(f"<tr class=\"node-row\" id=\"row-{_e(node)}\" data-node=\"{_e(node)}\"><td><code>{_e(node)}"
                    f"</code></td><td class=\"{source}\">{_e(text)}</td><td>{means}</td><td>{embed}</td>"
                    f"<td>{best}</td></tr>")
    return ("<table id=\"nodes\"><tr><th>node</th><th>label</th><th>mean at the last token, by answer</th>"
            "<th>embedding writes it</th><th>strongest context</th></tr>" + "".join(rows) + "</table>")


def examples_html(explanations: dict[Node, NodeExplanation]) -> str:
    parts = []
    for node, e in explanations.items():
        if not (e.corpus_contexts or e.task_contexts):
            continue
        corpus = "".join(_context_html(c) for c in e.corpus_contexts)
        task = "".join(_context_html(c) for c in e.task_contexts)
        direction = "largest" if e.sign > 0 else "most negative"
        parts.append(f"<details id=\"examples-{_e(node)}\"><summary><code>{_e(node)}</code> {_e(e.label)}</summary>"
                     f"<p>Held-out pretraining text ({direction} activations; corpus mean {e.corpus_mean:+.3f}):</p>"
                     f"{corpus}<p>Task prompts:</p>{task}</details>")
    return "".join(parts)


def build_report(circuit: Circuit, explanations: dict[Node, NodeExplanation], check_result: dict | None = None,
                 source: str = "") -> str:
    """The report page, as text. ``explanations`` from :func:`circuitir.explain.explain`."""
    labelled = copy.deepcopy(circuit)
    annotate(labelled, explanations)  # the figures show generated labels where the circuit has none
    title = title_of(circuit)
    collapsed = inline_svg(render_bytes(labelled, "svg", collapse=True), "c-")
    full = inline_svg(render_bytes(labelled, "svg"), "f-")
    def setting(group: str, key: str) -> str:
        value = circuit.header.get(group)
        return str(value.get(key, "?")) if isinstance(value, dict) else str(value or "?")

    meta = " &middot; ".join(_e(x) for x in (source, f"model {setting('source', 'file')}",
                                             f"ablation {setting('ablation', 'kind')}") if x)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<style>{CSS}</style></head>
<body>
<h1>{_e(title)}</h1>
<p class="meta">{meta}</p>
<h2>Summary figure</h2>
<figure id="collapsed">{collapsed}<figcaption>One box per head and per group of neurons with the same label;
the residual stream folded into the edges.</figcaption></figure>
<h2>Every node</h2>
<p>Click a node (or its row below) to highlight its edges. <span id="selection"></span></p>
<figure id="full">{full}</figure>
<h2>Check</h2>
{check_table(check_result)}
<h2>Nodes</h2>
{node_table(circuit, explanations)}
<h2>Activation examples</h2>
{examples_html(explanations)}
<script>
window.addEventListener("error", function () {{
  document.body.dataset.errors = String(Number(document.body.dataset.errors || "0") + 1);
}});
{SCRIPT}
</script>
</body></html>
"""
