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
