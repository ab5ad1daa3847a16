"""Sites: the named places where interpretable activations live.

A :class:`Site` is an identity module (like TransformerLens' HookPoint) that
torch.fx keeps as a leaf, so every traced graph has one call per site and a
pass can find, mask or replace it by name. A site can carry an *ablation*:
a ``keep`` mask over its channels (boolean; or float in [0, 1] while pruning learns it) and the ``fill`` values that stand
in for the channels it does not keep, ``x*keep + fill*(1-keep)``. Those are
plain attributes, never buffers, so they do not enter the state dict.
"""

from __future__ import annotations

import torch
from torch import nn


class Site(nn.Module):
    def __init__(self, name: str, width: int):
        super().__init__()
        self.name = name
        self.width = width
        self.keep: torch.Tensor | None = None  # bool [width]
        self.fill: torch.Tensor | None = None  # float [width]
        self.recording: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep is not None:
            if self.keep.dtype == torch.bool:
                x = torch.where(self.keep, x, self.fill.to(x.dtype))
            else:  # a soft (differentiable) mask, as pruning learns it
                x = x * self.keep + self.fill.to(x.dtype) * (1 - self.keep)
        if self.recording is not None:
            self.recording.append(x.detach())
        return x

    def set_ablation(self, keep: torch.Tensor | None, fill: torch.Tensor | None = None) -> None:
        if keep is None:
            self.keep = self.fill = None
            return
        keep = torch.as_tensor(keep, dtype=torch.bool)
        if keep.shape != (self.width,):
            raise ValueError(f"site {self.name}: mask has shape {tuple(keep.shape)}, expected ({self.width},)")
        fill = torch.zeros(self.width) if fill is None else torch.as_tensor(fill, dtype=torch.float32)
        if fill.shape != (self.width,):
            raise ValueError(f"site {self.name}: fill has shape {tuple(fill.shape)}, expected ({self.width},)")
        self.keep, self.fill = keep, fill

    def extra_repr(self) -> str:
        return f"{self.name!r}, width={self.width}"
