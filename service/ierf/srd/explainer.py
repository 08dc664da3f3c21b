"""Public SRD API (contract; implementation lands with the engine)."""

from __future__ import annotations

import torch
from torch import nn


class Decomposition:
    """Everything SRD knows about one batch of images that does not depend on the target.

    Holds logits, the sharing ratios of every stage (per-position scalars) and what the head
    needs to build a start map. Every further target or iERF seed costs one cheap scatter.
    """

    logits: torch.Tensor

    def saliency(self, target: int | torch.Tensor, contrast: str | int = "identity") -> torch.Tensor:
        """Signed (B, H, W) map at input resolution."""
        raise NotImplementedError

    def ierf(self, layer: str, positions: torch.Tensor) -> torch.Tensor:
        """(B, P, H, W) iERFs of the PFVs at ``positions`` (P, 2) of ``layer``; each sums to 1."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors only (cacheable as raw bytes / safetensors, never pickle)."""
        raise NotImplementedError


class SRD:
    """Sharing Ratio Decomposition over any supported model graph."""

    name = "srd"

    def __init__(self, model: nn.Module) -> None:
        raise NotImplementedError

    @property
    def layers(self) -> list[str]:
        """Names accepted as ``layer``: every post-activation PFV map, in forward order."""
        raise NotImplementedError

    def decompose(self, x: torch.Tensor) -> Decomposition:
        raise NotImplementedError

    def load_decomposition(self, state: dict[str, torch.Tensor]) -> Decomposition:
        raise NotImplementedError

    def saliency(self, x: torch.Tensor, target: int | torch.Tensor, contrast: str | int = "identity") -> torch.Tensor:
        return self.decompose(x).saliency(target, contrast)

    def ierf(self, x: torch.Tensor, layer: str, positions: torch.Tensor) -> torch.Tensor:
        return self.decompose(x).ierf(layer, positions)
