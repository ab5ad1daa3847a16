"""`circuitir report`: one self-contained HTML page, loaded in a real headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from circuitir.cli import main
from circuitir.grammar import parse

ROOT = Path(__file__).resolve().parent.parent
CIRCUIT = ROOT / "examples" / "sparse-brackets.cir"
MODEL = ROOT / "models" / "sparse.pt"
# `circuitir check examples/sparse-brackets.cir models/sparse.pt -n 64 --no-control --json` (minutes to rerun)
CHECK = ROOT / "tests" / "data" / "check-sparse-brackets.json"
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium (Debian: chromium) not installed")
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
CLICKED = "1.mlp.post_act[214]"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert main(["report", str(CIRCUIT), "--model", str(MODEL), "-o", str(out), "--check-json", str(CHECK),
                 "--windows", "64", "--prompts", "64"]) == 0
    return out


@needs_dot
def test_report_is_self_contained_and_complete(report):
    page = report.read_text()
    circuit = parse(CIRCUIT.read_text())
    # nothing fetched: no external scripts, styles, images or links (SVG namespaces are names, not requests)
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=", page)
    assert not [u for u in re.findall(r"https?://[^\"' )]+", page) if "www.w3.org" not in u]
    assert page.count("<svg") == 2 and "<script>" in page and "<style>" in page
    # the check table, as the check's JSON says
    result = json.loads(CHECK.read_text())
    table = page[page.index('<table id="check">'):]
    for claim in ("sufficiency", "necessity", "minimality", "faithfulness"):
        assert re.search(rf"<td>{claim}</td><td><span class=\"(pass|fail)\">", table)
    assert f"{result['sufficiency']['loss']:.4f}" in table
    # every kept node: a row in the node table with its label, a box in the full figure
    full = page[page.index('<figure id="full">'):page.index("<h2>Check")]
    titles = {html.unescape(t) for t in re.findall(r"<title>(.*?)</title>", full)}
    for node in circuit.kept_nodes():
        assert f'data-node="{node}"' in page
        assert str(node) in titles
    row = re.search(rf'<tr class="node-row" id="row-{re.escape(CLICKED)}".*?</tr>', page, re.S)[0]
    assert "<mark>" in row and "auto" in row
    assert f'<details id="examples-{CLICKED}">' in page


def edges_of(page: str, node: str) -> int:
    full = page[page.index('<figure id="full">'):page.index("<h2>Check")]
    titles = [html.unescape(t) for t in re.findall(r"<title>(.*?)</title>", full)]
    ends = [t.split("->") for t in titles if "->" in t]
    return sum(1 for a, b in ends if node in (a, b))


def chromium(*args, timeout=120):
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", *args], capture_output=True, text=True, timeout=timeout)


@needs_dot
@needs_chromium
def test_report_loads_in_chromium_and_a_click_highlights_edges(report, tmp_path):
    page = report.read_text()
    result = chromium(f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                      f"{report.as_uri()}#click={CLICKED}")
    body = re.search(r"<body[^>]*>", result.stdout)[0]
    assert 'data-ready="1"' in body and "data-errors" not in body
    assert f'data-selected="{CLICKED}"' in body
    expected = edges_of(page, CLICKED)
    assert expected > 0 and f'data-highlighted="{expected}"' in body
    assert re.search(rf'class="node-row selected"[^>]*data-node="{re.escape(CLICKED)}"', result.stdout)
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console


@needs_dot
@needs_chromium
def test_report_screenshot_shows_the_figure(report, tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    shot = tmp_path / "shot.png"
    chromium(f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1200,900",
             f"--screenshot={shot}", report.as_uri())
    image = image_module.open(shot).convert("RGB")
    assert image.size == (1200, 900)
    data = image.tobytes()
    pixels = list(zip(data[0::3], data[1::3], data[2::3]))
    inked = sum(1 for p in pixels if sum(p) < 600) / len(pixels)
    assert inked > 0.02  # not blank: text, boxes and edges
    blue = sum(1 for r, g, b in pixels if b > 150 and r < 90 and g < 130)  # positive-weight edges (#1f5fbf)
    red = sum(1 for r, g, b in pixels if r > 150 and g < 90 and b < 80)    # negative-weight edges (#c0392b)
    assert blue > 200 and red > 200


def test_report_bad_input(tmp_path, capsys):
    bad = tmp_path / "check.json"
    bad.write_text("{}")
    assert main(["report", str(CIRCUIT), "--model", str(MODEL), "-o", str(tmp_path / "r.html"),
                 "--check-json", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "circuitir check --json" in err
    assert not (tmp_path / "r.html").exists()
