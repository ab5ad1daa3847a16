"""Matplotlib figures the commands draw (``extract --targets --plot``, ``steer --plot``): one place for the
headless backend, the file types a ``--plot`` may name and the atomic write."""

from __future__ import annotations

from pathlib import Path

from circuitir.errors import UserError

PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def check_plot_path(path: str) -> None:
    """A ``--plot`` file name matplotlib can write, checked before any work."""
    if not str(path).lower().endswith(PLOT_SUFFIXES):
        raise UserError(f"--plot {path}: use a .png, .pdf or .svg file name")


def subplots(**kwargs):
    """``plt.subplots`` on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(**kwargs)


def save_figure(fig, path) -> None:
    """Write ``fig`` to ``path`` atomically, in the format its suffix names (PNG without one), and close it."""
    import matplotlib.pyplot as plt

    from circuitir.models.checkpoint import atomic_path

    suffix = Path(path).suffix.lower().lstrip(".") or "png"
    with atomic_path(path) as temp:
        fig.savefig(temp, format=suffix)
    plt.close(fig)


def write_results(out: dict, draw=None, plot_path: str | None = None, json_path: str | None = None,
                  json_default=None) -> None:
    """The ending the benchmark scripts share: ``draw(out, plot_path)`` when a figure was asked for (and say
    where it went), then ``out`` as JSON to ``json_path``; both written whole or not at all."""
    import json

    from circuitir.models.checkpoint import atomic_write_text

    if plot_path and draw is not None:
        draw(out, plot_path)
        print(f"figure: {plot_path}")
    if json_path:
        atomic_write_text(json_path, json.dumps(out, indent=1, default=json_default) + "\n")
