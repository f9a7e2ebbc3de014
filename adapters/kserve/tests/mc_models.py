"""The model class the tests' servers serve (imported by them as ``mc_models:Tiny``)."""

from __future__ import annotations

import torch


class Tiny(torch.nn.Module):
    """y = x @ W.T + b: small enough that a store of dozens costs nothing."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)  # type: ignore[no-any-return]
