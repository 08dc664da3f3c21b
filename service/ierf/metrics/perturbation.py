"""Insertion and deletion curves (Petsiuk et al. 2018, RISE) on the target-class probability.

Schedule: pixels are ranked by the *signed* map value, most positive first (the pixels the method
says speak most for the class); ties are broken by a fixed seeded random permutation, never by
raster order. At step k = 0..n_steps the top round(k / n_steps * H * W) pixels (all channels) are
changed, so the curve is sampled at fractions 0, 1/n_steps, ..., 1 (default 20 steps = 5 % each), each
rounded to whole pixels (10 pixels in 4 steps: 0, 0.2, 0.5, 0.8, 1); ``fractions`` holds the real ones,
and the AUC integrates over them.

* **Deletion** starts from the image and replaces ranked pixels by the fill (default ``"mean"``:
  the image's own per-channel mean colour, which removes all local structure without introducing
  the strong out-of-range edges a zero fill makes for non-zero-mean inputs; ``"blur"`` and
  ``"zero"`` are available). Lower AUC = the map found what the prediction depends on.
* **Insertion** starts from a Gaussian-blurred copy (sigma = ``blur_fraction`` x the image side,
  default 4 %, reflect padding) and pastes the original pixels back in ranked order. Higher AUC =
  better.

Score = softmax probability of the target class (RISE). With ``classes`` (B, K) the softmax is taken
over those K logits only: for a 2x2 grid of four photos, "how sure is the model that this cell's
object, rather than one of the other three, is what it sees" - base values around 0.25-1 instead of
the ~0.01 a class gets among 1000 when three other objects share the image. AUC = trapezoid rule
over the fraction axis [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ierf.baselines._common import check_target_range
from ierf.methods import check_input, resolve_target
from ierf.metrics._checks import (
    check_fraction,
    check_maps,
    check_positive_finite,
    check_positive_int,
    check_seed,
    eval_mode,
)

FILLS = ("mean", "blur", "zero")


@dataclass
class PerturbationCurves:
    """Curves (B, n_steps + 1) at ``fractions`` (n_steps + 1,), and their AUCs (B,)."""

    fractions: torch.Tensor
    deletion: torch.Tensor
    insertion: torch.Tensor

    @property
    def deletion_auc(self) -> torch.Tensor:
        return torch.trapezoid(self.deletion, self.fractions, dim=1)

    @property
    def insertion_auc(self) -> torch.Tensor:
        return torch.trapezoid(self.insertion, self.fractions, dim=1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W), reflect padding, kernel radius 3 sigma; sigma 0 copies."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (B, C, H, W) tensor, got {tuple(x.shape)} {x.dtype}")
    sigma = check_fraction(sigma, "sigma")
    if not 0 <= sigma < float("inf"):  # NaN or inf failed in int() with "cannot convert float NaN to integer"
        raise ValueError(f"sigma must be finite and >= 0, got {sigma!r}")
    if sigma == 0:
        return x.clone()
    radius = max(1, int(3.0 * sigma + 0.5))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    out = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def pixel_ranking(maps: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(B, H*W) pixel indices, most positive map value first; ties in a seeded random order."""
    flat = check_maps(maps).flatten(1)  # a NaN pixel was silently ranked last
    generator = torch.Generator().manual_seed(check_seed(seed))
    shuffle = torch.randperm(flat.shape[1], generator=generator).to(flat.device)
    order = torch.argsort(-flat[:, shuffle], dim=1, stable=True)
    return shuffle[order]


def _fill(x: torch.Tensor, fill: str, blur_sigma: float) -> torch.Tensor:
    if fill == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()
    if fill == "blur":
        return gaussian_blur(x, blur_sigma)
    return torch.zeros_like(x)


def _check_classes(logits: torch.Tensor, target: torch.Tensor, classes: torch.Tensor | None) -> None:
    """Targets and ``classes`` the model has (as the explainers check them), not an IndexError mid-loop."""
    check_target_range(logits, target)
    if classes is not None and int(classes.max()) >= logits.shape[1]:
        raise ValueError(f"classes holds {int(classes.max())}, out of range for a model with {logits.shape[1]} classes")


@torch.no_grad()
def insertion_deletion(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor | int,
    maps: torch.Tensor,
    n_steps: int = 20,
    deletion_fill: str = "mean",
    blur_fraction: float = 0.04,
    batch_size: int = 32,
    seed: int = 0,
    classes: torch.Tensor | None = None,
) -> PerturbationCurves:
    """Deletion and insertion curves for each image; see the module docstring for the protocol."""
    x = check_input(x)  # a NaN pixel made a NaN AUC, which a table prints like "not applicable"
    maps = check_maps(maps)
    if x.shape[0] != maps.shape[0] or x.shape[-2:] != maps.shape[-2:]:
        raise ValueError(f"x {tuple(x.shape)} must be (B, C, H, W) matching maps {tuple(maps.shape)}")
    if deletion_fill not in FILLS:
        raise ValueError(f"deletion_fill must be one of {FILLS}, got {deletion_fill!r}")
    n_steps = check_positive_int(n_steps, "n_steps")
    batch_size = check_positive_int(batch_size, "batch_size")
    blur_fraction = check_positive_finite(blur_fraction, "blur_fraction")  # inf overflowed in the blur
    seed = check_seed(seed)  # named here: torch's manual_seed refused 1.5 without naming the argument
    b, _, h, w = x.shape
    target = resolve_target(target, b)
    if classes is not None:
        if not isinstance(classes, torch.Tensor) or classes.is_floating_point() or classes.dtype == torch.bool:
            raise TypeError("classes must be an integer tensor (B, K)")
        classes = classes.to(torch.long).cpu()  # beside the targets (CPU); moved to the logits where used
        if classes.dim() != 2 or classes.shape[0] != b:
            raise ValueError(f"classes must have shape ({b}, K), got {tuple(classes.shape)}")
        if bool((classes < 0).any()):
            raise ValueError("classes holds a negative class index")
        if any(len(set(row)) != len(row) for row in classes.tolist()):
            raise ValueError("a row of classes repeats a class (it would count twice in the softmax)")
        if not (classes == target[:, None]).any(1).all():
            raise ValueError("every target must be one of its row of classes")
    sigma = blur_fraction * min(h, w)
    ranking = pixel_ranking(maps.to(x.device), seed)
    counts = [round(k / n_steps * h * w) for k in range(n_steps + 1)]
    # rank_of[i, p] = position of pixel p in image i's ranking; step k changes pixels with rank < counts[k]
    rank_of = torch.empty_like(ranking)
    rank_of.scatter_(1, ranking, torch.arange(h * w, device=x.device).expand(b, -1))
    deleted_base = _fill(x, deletion_fill, sigma)
    blurred = gaussian_blur(x, sigma)
    curves = {"deletion": torch.empty(b, n_steps + 1), "insertion": torch.empty(b, n_steps + 1)}
    with eval_mode(model):
        for i in range(b):
            for key, changed_from, unchanged in (("deletion", deleted_base[i], x[i]), ("insertion", x[i], blurred[i])):
                probs = []
                for start in range(0, len(counts), batch_size):  # built per batch: batch_size bounds the memory
                    steps = counts[start : start + batch_size]
                    changed = torch.stack([(rank_of[i] < c).view(1, h, w) for c in steps])  # (k, 1, H, W)
                    logits = model(torch.where(changed, changed_from, unchanged))
                    if i == 0 and start == 0:  # the first forward: a class the model lacks is refused by name
                        _check_classes(logits, target, classes)
                    if classes is None:
                        probs.append(logits.softmax(1)[:, target[i]].float().cpu())
                    else:
                        among = logits[:, classes[i].to(logits.device)].softmax(1)
                        probs.append(among[:, int((classes[i] == target[i]).nonzero()[0, 0])].float().cpu())
                curves[key][i] = torch.cat(probs)
    fractions = torch.tensor([c / (h * w) for c in counts])
    return PerturbationCurves(fractions=fractions, deletion=curves["deletion"], insertion=curves["insertion"])
