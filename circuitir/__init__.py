"""circuitir: a compiler and verifier for the circuits inside weight-sparse transformers.

``import circuitir as cir`` gives the public API (``circuitir/api.py``):
``cir.load_model``, ``cir.tasks``, ``cir.extract``, ``cir.frontier``, ``cir.check``, ``cir.load``,
``cir.diff``, ``cir.render``, ``cir.site_means``, and :class:`cir.Circuit` with ``save``,
``compile`` and ``run``.
"""

from circuitir.api import check, diff, extract, frontier, get_task, load, load_model, render, site_means, tasks
from circuitir.errors import UserError
from circuitir.ir.circuit import Circuit, Node

__all__ = ["Circuit", "Node", "UserError", "check", "diff", "extract", "frontier", "get_task", "load", "load_model",
           "render", "site_means", "tasks"]
