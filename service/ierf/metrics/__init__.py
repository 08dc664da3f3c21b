"""Fidelity metrics on signed (B, H, W) maps (see each module for the exact protocol).

Sign policy: maps stay signed. ``energy_in_box`` uses the positive part (evidence for the class);
``gini`` uses |map| because sparseness of magnitude is its definition; pointing game, insertion /
deletion and top-k intersection rank by the signed value (most positive first). Nothing takes an
absolute value silently.
"""

from ierf.metrics.complexity import gini
from ierf.metrics.localisation import boxes_to_masks, energy_in_box, pointing_game
from ierf.metrics.manipulation import ManipulationResult, manipulation_attack, smooth_activations_copy
from ierf.metrics.perturbation import PerturbationCurves, gaussian_blur, insertion_deletion, pixel_ranking
from ierf.metrics.robustness import max_sensitivity
from ierf.metrics.similarity import pearson, ssim, top_k_intersection

__all__ = [
    "ManipulationResult",
    "PerturbationCurves",
    "boxes_to_masks",
    "energy_in_box",
    "gaussian_blur",
    "gini",
    "insertion_deletion",
    "manipulation_attack",
    "max_sensitivity",
    "pearson",
    "pixel_ranking",
    "pointing_game",
    "smooth_activations_copy",
    "ssim",
    "top_k_intersection",
]
