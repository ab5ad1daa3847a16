"""benchmarks/off_template.py: the prompt cutter on hand-written source, and the figures on a hand-made model.

The cutter must find exactly the string literals' closing quotes and the list closings the tasks mean
(nested: another list still open, the next character its `]`; flat: nothing open, the next character a
newline), and nothing else (subscripts, triple-quoted and empty strings, a `]` followed by `,` or `)`).
The model prefers `'` over `"` by a fixed margin whatever it reads, so every figure is known in closed form,
and the circuit is the model with nothing ablated, so it must agree with it on every prompt.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import load_benchmark, tiny_config
from circuitir.data.corpus import is_validation
from circuitir.ir.circuit import Circuit
from circuitir.ir.trace import trace
from circuitir.models.checkpoint import LoadedModel
from circuitir.models.gpt import SparseGPT
from circuitir.models.tokenizer import ByteTokenizer
from circuitir.tasks.user_prompts import prompt_agreement


SOURCE = '''x = 'a'
y = ["b", [1, 2]]
z = [[3], d[0]]
v = d[0]
w = f"{x}" + r'\\d' + ''
s = """doc"""
print([1])
'''


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("off_template")


def test_quote_cuts(bench):
    rows = bench.quote_cuts(SOURCE, "snippet.py")
    assert [(r["prompt"], r["answer"], r["alternative"], r["id"]) for r in rows] == [
        ("x = 'a", "'", '"', "snippet.py:1:6"),
        ("x = 'a'\ny = [\"b", '"', "'", "snippet.py:2:7"),
        (SOURCE[:SOURCE.index('{x}"') + 3], '"', "'", "snippet.py:5:9"),
        (SOURCE[:SOURCE.index("\\d'") + 2], "'", '"', "snippet.py:5:17"),
    ]  # '' (empty) and """doc""" (triple-quoted) are not cut
    assert all(r["split"] == "heldout" for r in rows)
    # the last quote character before each string's opening quote (not written to task files)
    assert [r["_before"] for r in rows] == ["none", "other", "same", "other"]


def test_bracket_cuts(bench):
    rows = bench.bracket_cuts(SOURCE, "snippet.py")
    assert [(r["prompt"].split("\n")[-1], r["answer"], r["alternative"]) for r in rows] == [
        ('y = ["b", [1, 2]', "]", "\n"),   # nested: the enclosing list still open, its `]` next
        ('y = ["b", [1, 2]]', "\n", "]"),  # flat: nothing open, a newline next
        ("z = [[3], d[0]]", "\n", "]"),
    ]  # not cut: `[3]` and `[1]` (a `,` or `)` next), `d[0]` (a subscript, not a list)
    assert [r["prompt"] for r in rows] == [SOURCE[:SOURCE.index("2]") + 2], SOURCE[:SOURCE.index("2]]") + 3],
                                           SOURCE[:SOURCE.index("0]]") + 3]]


def test_window_keeps_the_deciding_bracket_and_whole_characters(bench):
    # 12 bytes: the nested cut's window starts at its enclosing `[` (kept); the flat cut after it on the same
    # line would need 13 to see the `[` it closes (dropped); line 3's flat list fits
    short = bench.bracket_cuts(SOURCE, "snippet.py", context=12)
    assert [(r["prompt"], r["answer"]) for r in short] == [('["b", [1, 2]', "]"), (" [[3], d[0]]", "\n")]
    assert [r["prompt"] for r in bench.quote_cuts(SOURCE, "snippet.py", context=4)] == [
        "= 'a", ' ["b', '"{x}', "r'\\d"]  # each opening quote inside the 4 bytes (an f or r prefix need not be)
    assert bench.window("x\u00e9y", 3, 2) == "y"  # the é's second byte alone is dropped
    assert bench.window("x\u00e9y", 3, 3) == "\u00e9y"


MARGIN = 1.5  # the model's logit of `'` minus that of `"`, on every prompt


@pytest.fixture(scope="module")
def measured(bench, tmp_path_factory):
    root = tmp_path_factory.mktemp("stdlib")
    names = [name for name in (f"mod{i}.py" for i in range(200)) if is_validation(name)][:2]
    (root / names[0]).write_text(SOURCE)
    (root / names[1]).write_text("a = ['p', \"q\", 'r']\nb = 'It''s'\n")
    (root / "train_file.py").write_text("t = 'never cut: a training file'\n")  # path hash: not validation
    assert not is_validation("train_file.py")
    model = SparseGPT(tiny_config(block_size=128, n_layer=1))
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.zero_()
        model.final_logits_bias[ord("'")] = MARGIN
    model.eval()
    loaded = LoadedModel(model, ByteTokenizer(), sha256="", path="hand-made")
    everything = {name: torch.ones(site.width, dtype=torch.bool) for name, site in trace(model).sites.items()}
    circuit = Circuit.from_mask(model, everything, ablation="zero", candidates=[ord('"'), ord("'")])
    out = bench.run(loaded, loaded, {bench.QUOTES: circuit}, cap=8, sources=("validation",), root=root,
                    prompts_dir=root / "prompts")
    return out, circuit, loaded, root


def test_figures_on_a_model_that_always_says_single_quote(measured):
    out, circuit, loaded, root = measured
    result = out["tasks"]["single_double_quote"]["validation"]
    # 9 cuts in the two validation files (3 `"`, 6 `'`), at most 8 // 2 per answer
    assert result["counts"]["available"] == {'"': 3, "'": 6} and result["counts"]["taken"] == {'"': 3, "'": 4}
    single, double = result["by_answer"]["'"], result["by_answer"]['"']
    assert (single["n"], double["n"]) == (4, 3)
    assert single["sparse_acc"] == single["circuit_acc"] == 1.0 and double["sparse_acc"] == double["circuit_acc"] == 0
    assert single["sparse_loss"] == pytest.approx(math.log1p(math.exp(-MARGIN)), abs=1e-6)
    assert double["circuit_loss"] == pytest.approx(math.log1p(math.exp(MARGIN)), abs=1e-5)
    assert result["all"]["sparse_acc"] == pytest.approx(4 / 7) and result["all"]["agree_sparse"] == 1.0
    # the pooled figures are check --prompts's own on the whole written file
    path = root / "prompts" / "off_template_single_double_quote_validation.jsonl"
    assert len(path.read_text().splitlines()) == 7 and "never cut" not in path.read_text()
    whole = prompt_agreement(circuit, loaded, str(path))
    assert whole["model"]["loss"] == pytest.approx(result["all"]["sparse_loss"], abs=1e-6)
    assert whole["circuit"]["accuracy"] == pytest.approx(result["all"]["circuit_acc"])
    assert whole["agreement"] == 1.0
    # the template rows are the task's own held-out prompts, cap of them
    assert out["tasks"]["single_double_quote"]["template"]["all"]["n"] == 8
    json.dumps(out)
