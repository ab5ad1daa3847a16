"""Many extractions at once: ``circuitir extract M --task all -o DIR --jobs N``.

Each task is extracted in its own process (``spawn``, so no torch state is
shared), with the CPU threads split between the jobs; each writes
``DIR/<task>.cir`` atomically, exactly the file a lone ``circuitir extract``
with the same options would write. A task that cannot be extracted (its
prompts do not fit the model, the model cannot reach the target) is reported
with its reason and the others go on. The pretraining means every job needs
are measured once, before the jobs start, into the on-disk cache they all read.

On a cluster, run one ``circuitir extract`` per (task, seed) as a job-array
element instead (README, "Sweeps on a cluster"): every extraction is a pure
function of model, task, pipeline and seed.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from circuitir.errors import UserError


def _init_worker(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def _extract_one(model_path: str, tokenizer_dir: str | None, device: str | None, task_name: str, output: str,
                 options: dict) -> dict:
    """One job: load (on ``device``), extract, write. Bad input comes back as a row with its reason, not as an
    exception."""
    from circuitir.api import load_model
    from circuitir.grammar import emit
    from circuitir.models.checkpoint import atomic_write_text
    from circuitir.runtime.extract import extract
    from circuitir.tasks import get_task

    started = time.time()
    try:
        loaded = load_model(model_path, tokenizer=tokenizer_dir, device=device)
        circuit, summary = extract(loaded, get_task(task_name), progress=False, **options)
        atomic_write_text(output, emit(circuit))
    except UserError as exc:
        return {"task": task_name, "error": str(exc), "seconds": time.time() - started}
    return {**summary, "output": output}


def warm_means(loaded, options: dict) -> None:
    """Measure the pretraining means the default pipeline needs once, into the cache every job reads."""
    try:
        from circuitir.passes.ablate import pretrain_means
        from circuitir.runtime.extract import build_pipeline
        calls = build_pipeline(options.get("pipeline"), options.get("target"), options.get("ablation"))
    except (ImportError, UserError):
        return  # the jobs measure (or refuse) on their own
    for call in calls:
        if call.name == "mean-ablate" and getattr(call.options, "over", None) == "pretrain":
            pretrain_means(loaded, call.options.tokens, options.get("seed", 0))


def extract_many(model_path: str, task_names: list[str], out_dir: str | Path, *, jobs: int = 1,
                 tokenizer_dir: str | None = None, device: str | None = None, loaded=None,
                 threads: int | None = None, **options) -> list[dict]:
    """Extract every task into ``out_dir/<task>.cir`` with ``jobs`` processes, each loading the model on
    ``device`` (``--device``; several jobs share one GPU) with ``threads`` torch threads (default: the cores
    shared out); one row per task, in order."""
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: give at least 1")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"-o {out_dir}: with --task all, -o is a directory (one .cir per task)")
    out_dir.mkdir(parents=True, exist_ok=True)
    if loaded is not None:
        warm_means(loaded, options)
    outputs = {name: str(out_dir / f"{name}.cir") for name in task_names}
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    model = (model_path, tokenizer_dir, device)
    if jobs == 1:
        return [_extract_one(*model, name, outputs[name], options) for name in task_names]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = [pool.submit(_extract_one, *model, name, outputs[name], options) for name in task_names]
        return [future.result() for future in futures]
