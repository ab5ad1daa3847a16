"""The README's Python example runs as written, and prints what it claims."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    for folder in ("models", "examples"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    monkeypatch.chdir(tmp_path)
    source = readme_example()
    assert "import circuitir as cir" in source
    assert not re.search(r"^\s*from circuitir", source, re.M)  # only cir.*
    namespace: dict = {}
    exec(compile(source, "README.md", "exec"), namespace)
    out = capsys.readouterr().out.splitlines()
    circuit = namespace["circuit"]
    # The printed figures are the circuit's: the shipped bracket circuit's nodes and edges.
    assert out[0].split()[:2] == [str(circuit.n_nodes), str(circuit.n_edges)]
    assert circuit.n_nodes == 82 and circuit.header["metrics"]["loss"] <= 0.15
    assert (tmp_path / "brackets.cir").read_text() == circuit.text()
    runs = namespace["circuit"].run(["x = [[1, 2]", "x = [1, 2"])
    assert [r["prediction"] for r in runs] == ["]", "]"]
    assert out[2] == "{'sufficiency': True, 'necessity': True, 'minimality': True, 'faithfulness': True}"
    assert out[3] == "True"  # the shipped circuit, to float rounding: extraction is deterministic
    small = namespace["small"]
    assert small.n_nodes > 0 and out[4] == f"{small.n_nodes} {small.n_edges}"
