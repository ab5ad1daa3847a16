"""benchmarks/frontier.py: the geometric means and ratios it prints, and its cache of circuits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def frontier():
    return load_benchmark("frontier")


def test_summary_uses_only_the_tasks_every_model_meets(frontier):
    sizes = {"s": {"a": {0.1: {"nodes": 10, "edges": 20}, 0.2: {"nodes": 5, "edges": 8}},
                   "b": {0.1: {"nodes": 40, "edges": 80}, 0.2: {"nodes": 20, "edges": 32}}},
             "d": {"a": {0.1: {"nodes": 100, "edges": 400}, 0.2: {"nodes": 50, "edges": 80}},
                   "b": {0.2: {"nodes": 80, "edges": 320}}}}  # d does not meet b at 0.1
    rows = frontier.summarise(sizes, ["s", "d"], ["a", "b"], [0.1, 0.2])
    assert rows[0]["tasks"] == ["a"]
    assert rows[0]["s"]["edges"] == pytest.approx(20) and rows[0]["ratios"]["d"] == pytest.approx(20.0)
    assert rows[1]["tasks"] == ["a", "b"]
    assert rows[1]["s"]["edges"] == pytest.approx(math.sqrt(8 * 32))       # 16
    assert rows[1]["d"]["edges"] == pytest.approx(math.sqrt(80 * 320))     # 160
    assert rows[1]["ratios"]["d"] == pytest.approx(10.0)


def test_pairwise_ratio_uses_the_tasks_that_pair_meets(frontier):
    sizes = {"s": {"a": {0.1: {"nodes": 10, "edges": 20}}, "b": {0.1: {"nodes": 40, "edges": 80}}},
             "d": {"a": {0.1: {"nodes": 100, "edges": 400}}, "b": {}},          # d misses b
             "m": {"a": {0.1: {"nodes": 50, "edges": 100}}, "b": {0.1: {"nodes": 90, "edges": 720}}}}
    everyone = frontier.summarise(sizes, ["s", "d", "m"], ["a", "b"], [0.1])
    assert everyone[0]["tasks"] == ["a"] and everyone[0]["ratios"]["m"] == pytest.approx(5.0)
    (row,) = frontier.pairwise(sizes, "s", "m", ["a", "b"], [0.1])
    assert row["tasks"] == ["a", "b"]
    assert row["ratio"] == pytest.approx(math.sqrt(100 * 720) / math.sqrt(20 * 80))  # 6.71..., not 5
    assert frontier.pairwise(sizes, "s", "d", ["b"], [0.1]) == []


def test_circuits_are_extracted_once_and_read_back(frontier, bracket_model, tmp_path, monkeypatch):
    model, metrics = bracket_model
    target = round(metrics["tasks"]["bracket_brace"]["loss"] + 0.25, 2)
    first = frontier.frontier_sizes(str(model), "bracket_brace", [target, 0.001], tmp_path, progress=False)
    assert list(first) == [target] and first[target]["nodes"] > 0 and first[target]["loss"] <= target + 0.1
    assert (tmp_path / Path(model).stem / "bracket_brace-t0.001.unmet").read_text().startswith("the full model")

    def no_extraction(*args, **kwargs):
        raise AssertionError("extracted again")

    monkeypatch.setattr(frontier, "extract_frontier", no_extraction)
    assert frontier.frontier_sizes(str(model), "bracket_brace", [target, 0.001], tmp_path, progress=False) == first
    # another model under the same file name does not silently reuse the cache
    other = tmp_path / "elsewhere" / Path(model).name
    other.parent.mkdir()
    other.write_bytes(Path(model).read_bytes() + b"\0")
    with pytest.raises(SystemExit, match="extracted from another model"):
        frontier.frontier_sizes(str(other), "bracket_brace", [target], tmp_path, progress=False)
    # cache only: a target never extracted is left out, not extracted
    assert frontier.frontier_sizes(str(model), "bracket_brace", [target, 0.5], tmp_path, progress=False,
                                   extract=False) == first
