"""Devices, dtypes and ranks: where a model runs, in what precision, and as which process of a job.

``--device auto|cpu|cuda|cuda:N|mps`` picks the device (``auto``: CUDA if
torch sees a GPU, else Apple's MPS, else the CPU); asking for one torch cannot
use is bad input, one line. ``--dtype float32|bfloat16`` is the precision of
training's forward and backward passes (autocast; the weights, the optimiser
and the sparsity projection stay float32).

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) training is data
parallel: :func:`distributed_context` joins the process group (NCCL on CUDA,
gloo on CPU) and says which rank this process is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from circuitir.errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(name: str | None = "auto") -> torch.device:
    name = (name or "auto").strip()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind not in DEVICES[1:] or (index and not index.isdigit()) or (index and kind != "cuda"):
        raise UserError(f"--device {name}: use one of {', '.join(DEVICES)} (or cuda:N)")
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise UserError(f"--device {name}: torch sees no CUDA GPU (this torch is {build}); use --device cpu, "
                            "or install a CUDA build of torch on a machine with a GPU")
        if index and int(index) >= torch.cuda.device_count():
            raise UserError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    if kind == "mps" and not _mps_available():
        raise UserError(f"--device {name}: MPS (Apple GPU) is not available to this torch; use --device cpu")
    return torch.device(name)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_dtype(name: str | None = "float32") -> torch.dtype:
    name = name or "float32"
    if name not in DTYPES:
        raise UserError(f"--dtype {name}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class Distributed:
    """This process's place in a data-parallel job (a single process is rank 0 of 1)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_context(device: torch.device) -> Distributed:
    """Join the torchrun job this process belongs to, if any; NCCL on CUDA, gloo otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size <= 1:
        return Distributed()
    import datetime

    import torch.distributed as dist
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
        except Exception as exc:  # a missing MASTER_ADDR, a rank that never came up
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"rank {rank}: cannot join the torchrun job ({backend}): {first[:200]}") from None
    return Distributed(rank, world_size, local_rank)


def rank_device(device: torch.device, dist_info: Distributed) -> torch.device:
    """One GPU per rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` in a distributed job."""
    if device.type == "cuda" and device.index is None and dist_info.active:
        torch.cuda.set_device(dist_info.local_rank)
        return torch.device("cuda", dist_info.local_rank)
    return device
