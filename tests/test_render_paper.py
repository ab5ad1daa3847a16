"""examples/paper: the LaTeX document with the TikZ figure and the listing builds with latexmk."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "examples" / "paper"
TOOLS = ("make", "latexmk", "pdflatex", "dot", "pdftotext")
missing = [tool for tool in TOOLS if shutil.which(tool) is None]


@pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)} (README: Figures for papers)")
def test_paper_builds_with_figure_and_listing(tmp_path):
    work = tmp_path / "paper"
    shutil.copytree(PAPER, work, ignore=shutil.ignore_patterns("*.pdf", "*.aux", "*.log", "*.fls", "_minted*"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(["make", f"ROOT={ROOT}", f"PYTHON={sys.executable}"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    text = subprocess.run(["pdftotext", "-layout", str(work / "paper.pdf"), "-"], capture_output=True, text=True,
                          check=True).stdout
    assert "The bracket-counting circuit of a weight-sparse transformer" in text
    # the figure (TikZ, as text in the PDF) and the listing (coloured by minted or Pygments)
    assert "bracket_counting: 82 nodes, 151 edges" in text and "head 4 q3 k6 v3" in text
    assert "weight > 0" in text or "weight  > 0" in text
    assert "1.mlp.post_act[214]" in text and "label auto" in text
    mode = (work / "listing-mode.tex").read_text().strip()
    assert mode in ("\\mintedtrue", "\\mintedfalse")
    log = (work / "paper.log").read_text(errors="replace")
    assert ("_minted-paper" in log) == (mode == "\\mintedtrue")
