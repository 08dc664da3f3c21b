"""Proof of fidelity: SRD against the baselines on material the project generates itself.

Two models, one protocol per model, every method run with the same settings:

* **TinyResNet** (trained on the synthetic digits-on-textures set, ``ierf.fidelity``) on held-out
  test images (seed 1, glyphs never seen in training): pointing game and energy-in-box against the
  glyph box, the same two on the same architecture at random initialisation (model randomisation
  check), deletion / insertion AUC, Gini sparseness, max-sensitivity, the manipulation attack.
* **EfficientNet-Lite0** (bundled real ImageNet weights) on the grid pointing game: every (grid,
  cell) case of 2x2 grids of the offline photos it classifies confidently; deletion / insertion on
  a subset of cases, max-sensitivity and the attack on the single 224² photos.
* **APOP** on both models.

Targets are the ground-truth class (synthetic) or the cell photo's class (grid). Maps follow the one
rule of ``ierf.baselines`` (signed channel sum, bilinear upsampling, no normalisation). SRD runs with
its defaults (exact head, identity contrast); nothing here is tuned toward any method.

    python benchmarks/fidelity.py                  # full run (~36 min on 2 shared cores)
    python benchmarks/fidelity.py --fast           # every experiment on a small subset (a few minutes)
    python benchmarks/fidelity.py --out DIR --methods srd,gradient,gradcam --publish benchmarks/results
    python benchmarks/fidelity.py --methods srd --skip-synthetic --merge out/fidelity/results.json --out DIR
        # recompute some rows, take every other row from an earlier run with the same settings

Writes ``results.json`` (every number, seeds, settings, versions, runtimes), ``table.md`` and PNG
figures to ``--out`` (default ``out/fidelity/``); ``--publish DIR`` also copies the table, the results
(as ``fidelity_results.json``) and the main figures there under stable names.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import ierf
import numpy as np
import torch
from ierf.baselines import BASELINE_METHODS
from ierf.fidelity import grid, synthetic
from ierf.fidelity.apop import apop_agreement
from ierf.fidelity.tiny_resnet import load_tiny_resnet, random_tiny_resnet, training_record
from ierf.metrics import (
    energy_in_box,
    gini,
    insertion_deletion,
    manipulation_attack,
    max_sensitivity,
    pointing_game,
)
from ierf.models import load_model

METHODS = ("srd", *BASELINE_METHODS)
#: Same settings on both models; IG and SmoothGrad are cut from their registry defaults (32 / 16) to keep
#: the 448² grid affordable on 2 cores.
METHOD_OPTIONS: dict[str, dict] = {"integrated_gradients": {"n_steps": 16}, "smoothgrad": {"n_samples": 10}}
#: Methods with a differentiable map path (the attack needs d map / d input).
# LRP is not attackable: its differentiable_saliency is refused (Zennit's hooks do not carry the map's
# derivative, so an attack would meet gradient masking); its cells read "—".
ATTACKABLE = ("srd", "gradient", "input_x_gradient", "gradcam")
#: Extra documented variants (rows of their own; the main rows use every method's defaults).
VARIANTS: dict[str, tuple[str, dict, str]] = {
    "gradcam@layer2": (
        "gradcam",
        {"layer": "layer2"},
        "Grad-CAM on TinyResNet's 12x12 layer2 instead of the 6x6 final map",
    ),
}
SEED = 0


@dataclass
class Settings:
    n_synthetic: int
    n_perturb_synthetic: int
    n_sensitivity_synthetic: int
    n_attack_synthetic: int
    attack_steps_synthetic: int
    grid_orders: int
    n_perturb_grid: int
    perturb_steps_grid: int
    n_sensitivity_real: int
    n_attack_real: int
    attack_steps_real: int
    n_apop_real_crops: int
    max_grids: int | None = None
    sensitivity_samples: int = 8
    sensitivity_radius: float = 0.02
    perturb_steps_synthetic: int = 20
    attack_output_weight: float = 10.0
    attack_beta: float = 5.0


FULL = Settings(
    n_synthetic=500,
    n_perturb_synthetic=500,
    n_sensitivity_synthetic=50,
    n_attack_synthetic=16,
    attack_steps_synthetic=50,
    grid_orders=2,
    n_perturb_grid=8,
    perturb_steps_grid=10,
    n_sensitivity_real=6,
    n_attack_real=4,
    attack_steps_real=20,
    n_apop_real_crops=96,
    sensitivity_samples=6,
)

FAST = Settings(
    n_synthetic=32,
    n_perturb_synthetic=16,
    n_sensitivity_synthetic=8,
    n_attack_synthetic=4,
    attack_steps_synthetic=5,
    grid_orders=1,
    n_perturb_grid=2,
    perturb_steps_grid=5,
    n_sensitivity_real=1,
    n_attack_real=2,
    attack_steps_real=3,
    n_apop_real_crops=8,
    max_grids=2,
    sensitivity_samples=2,
)


@dataclass
class MethodResult:
    scores: dict[str, float] = field(default_factory=dict)
    seconds_per_map: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# explainers


def make_explainer(method: str, model: torch.nn.Module):
    base, options, _ = VARIANTS.get(method, (method, METHOD_OPTIONS.get(method, {}), ""))
    return ierf.create_explainer(base, model, **options)


def attack_explain_factory(method: str):
    """model -> differentiable f(x, target); SRD is differentiable through its public API."""
    base = VARIANTS.get(method, (method, {}, ""))[0]

    def factory(model: torch.nn.Module):
        explainer = make_explainer(method, model)
        if base == "srd":
            return explainer.saliency
        return explainer.differentiable_saliency

    return factory


def maps_for(explainer, x: torch.Tensor, target: torch.Tensor, batch: int = 50) -> torch.Tensor:
    return torch.cat([explainer.saliency(x[i : i + batch], target[i : i + batch]) for i in range(0, len(x), batch)])


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def record_perturbation(r: MethodResult, pc) -> dict[str, np.ndarray]:
    """Deletion/insertion AUCs into the row; the mean curves for the figure."""
    r.scores["deletion_auc"] = float(pc.deletion_auc.mean())
    r.scores["insertion_auc"] = float(pc.insertion_auc.mean())
    return {
        "fractions": pc.fractions.numpy(),
        "deletion": pc.deletion.mean(0).numpy(),
        "insertion": pc.insertion.mean(0).numpy(),
    }


def record_sensitivity(r: MethodResult, sens: torch.Tensor) -> None:
    r.scores["max_sensitivity"] = float(np.nanmean(sens.numpy())) if torch.isfinite(sens).any() else float("nan")
    if (n_nan := int(torch.isnan(sens).sum())) > 0:
        r.notes.append(f"max-sensitivity undefined (all-zero map) for {n_nan}/{len(sens)} images")


def record_attack(
    r: MethodResult,
    key: str,
    method: str,
    explainer,
    model: torch.nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    own: torch.Tensor,
    s: Settings,
    *,
    epsilon: float,
    bounds: tuple[float, float],
    steps: int,
):
    """Push each image's map toward its neighbour's (``own`` rolled by one); scores and time into the row."""
    res, seconds = timed(
        lambda: manipulation_attack(
            attack_explain_factory(method),
            explainer.saliency,
            model,
            x,
            target,
            torch.roll(own, 1, dims=0),
            epsilon=epsilon,
            bounds=bounds,
            steps=steps,
            output_weight=s.attack_output_weight,
            beta=s.attack_beta,
        )
    )
    r.scores.update({f"attack_{k}": v for k, v in res.summary().items()})
    r.seconds_per_map[key] = seconds
    return res


# ---------------------------------------------------------------------------------------------------------
# synthetic (TinyResNet)


def run_synthetic(methods: list[str], s: Settings, out: Path) -> tuple[dict[str, MethodResult], dict, dict]:
    data = synthetic.generate("test", s.n_synthetic)
    x, y, boxes = data.inputs(), data.labels, data.boxes
    trained, random_model = load_tiny_resnet(), random_tiny_resnet(seed=SEED)
    with torch.no_grad():
        accuracy = float((trained(x).argmax(1) == y).float().mean())
    generator = torch.Generator().manual_seed(SEED)
    random_maps = torch.rand(x.shape[0], *x.shape[-2:], generator=generator)
    centre = torch.zeros(x.shape[0], *x.shape[-2:])
    centre[:, x.shape[-2] // 2, x.shape[-1] // 2] = 1.0
    reference = {
        "random map": {
            "pointing_game": float(pointing_game(random_maps, boxes).mean()),
            "energy_in_box": float(energy_in_box(random_maps, boxes).mean()),
        },
        "centre point": {
            "pointing_game": float(pointing_game(centre, boxes).mean()),
            "energy_in_box": float(energy_in_box(centre, boxes).mean()),
        },
        "box share of image": float(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).float().mean())
        / (x.shape[-2] * x.shape[-1]),
    }
    results: dict[str, MethodResult] = {}
    examples: dict[str, torch.Tensor] = {}
    curves: dict[str, dict[str, np.ndarray]] = {}
    attack_examples: dict[str, dict] = {}
    n_p, n_s, n_a = s.n_perturb_synthetic, s.n_sensitivity_synthetic, s.n_attack_synthetic
    for method in methods:
        log(f"[synthetic] {method}")
        r = results[method] = MethodResult()
        explainer = make_explainer(method, trained)
        explainer.saliency(x[:2], y[:2])  # warm-up (tracing, lazy imports) outside the timing
        maps, seconds = timed(lambda e=explainer: maps_for(e, x, y))
        r.seconds_per_map["tiny_resnet"] = seconds / len(x)
        r.scores["pointing_game"] = float(pointing_game(maps, boxes).mean())
        r.scores["energy_in_box"] = float(energy_in_box(maps, boxes).mean())
        r.scores["gini"] = float(gini(maps).mean())
        examples[method] = maps[:6]
        rand_explainer = make_explainer(method, random_model)
        rand_maps = maps_for(rand_explainer, x, y)
        r.scores["pointing_game_random_init"] = float(pointing_game(rand_maps, boxes).mean())
        r.scores["energy_in_box_random_init"] = float(energy_in_box(rand_maps, boxes).mean())
        pc = insertion_deletion(trained, x[:n_p], y[:n_p], maps[:n_p], n_steps=s.perturb_steps_synthetic, seed=SEED)
        curves[method] = record_perturbation(r, pc)
        sens = max_sensitivity(
            explainer.saliency,
            x[:n_s],
            y[:n_s],
            radius=s.sensitivity_radius,
            n_samples=s.sensitivity_samples,
            seed=SEED,
            maps=maps[:n_s],
        )
        record_sensitivity(r, sens)
        if VARIANTS.get(method, (method,))[0] in ATTACKABLE:
            xa, ya = x[:n_a], y[:n_a]
            res = record_attack(
                r,
                "attack_tiny_resnet_total",
                method,
                explainer,
                trained,
                xa,
                ya,
                maps[:n_a],
                s,
                epsilon=(8 / 255) / synthetic.INPUT_STD,
                bounds=(
                    (0 - synthetic.INPUT_MEAN) / synthetic.INPUT_STD,
                    (1 - synthetic.INPUT_MEAN) / synthetic.INPUT_STD,
                ),
                steps=s.attack_steps_synthetic,
            )
            attack_examples[method] = {
                "x": xa[:2],
                "x_adv": res.x_adv[:2],
                "before": res.maps_before[:2],
                "after": res.maps_after[:2],
                "target": torch.roll(maps[:n_a], 1, dims=0)[:2],
            }
        log(f"    {json.dumps({k: round(v, 4) for k, v in r.scores.items()})}")
    apop = apop_agreement(trained, x, seed=SEED)
    extras = {
        "accuracy": accuracy,
        "reference": reference,
        "apop": apop,
        "images": data.images[:6],
        "boxes": boxes[:6],
        "labels": y[:6],
        "examples": examples,
        "curves": curves,
        "attack_examples": attack_examples,
    }
    return results, extras, {"n_images": len(x), "test_seed": data.seed}


# ---------------------------------------------------------------------------------------------------------
# real images (EfficientNet-Lite0)


def _real_crops(photos: dict[str, np.ndarray], n: int, size: int, preprocess) -> torch.Tensor:
    """n random square crops (side 40-100 % of the short side, random flip) of the offline photos, seeded."""
    from PIL import Image

    rng = np.random.default_rng(SEED)
    names = sorted(photos)
    crops = []
    for i in range(n):
        photo = photos[names[i % len(names)]]
        h, w = photo.shape[:2]
        side = int(rng.uniform(0.4, 1.0) * min(h, w))
        y0, x0 = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        crop = photo[y0 : y0 + side, x0 : x0 + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crops.append(preprocess(np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size)))))
    return torch.stack(crops)


def run_real(methods: list[str], s: Settings) -> tuple[dict[str, MethodResult], dict, dict]:
    loaded = load_model("efficientnet_lite0")
    model = loaded.module
    images = grid.confident_images(model, loaded.preprocess)
    cases = grid.build_grids(images, orders=s.grid_orders)
    if s.max_grids is not None:  # --fast: the first grids only
        keep = cases.grid_index < s.max_grids
        cases = grid.GridCases(
            grids=cases.grids[: s.max_grids],
            grid_index=cases.grid_index[keep],
            targets=cases.targets[keep],
            boxes=cases.boxes[keep],
            names=cases.names[: s.max_grids],
            images=cases.images,
        )
    log(f"[grid] {len(images)} confident photos: {[(i.name, i.label, round(i.prob, 2)) for i in images]}")
    log(f"[grid] {cases.grids.shape[0]} grids, {len(cases)} cases")
    singles = torch.stack([i.pixels for i in images])
    single_targets = torch.tensor([i.label for i in images])
    lo, hi = (0 - 127) / 128, (255 - 127) / 128
    # deletion / insertion on an even spread of cases (different grids and cells)
    perturb_idx = torch.linspace(0, len(cases) - 1, s.n_perturb_grid).round().long()
    results: dict[str, MethodResult] = {}
    examples: dict[str, torch.Tensor] = {}
    curves: dict[str, dict[str, np.ndarray]] = {}
    example_cases = [0, 5]
    for method in methods:
        if method in VARIANTS:
            continue
        log(f"[grid] {method}")
        r = results[method] = MethodResult()
        explainer = make_explainer(method, model)
        explainer.saliency(singles[:1], single_targets[:1])  # warm-up
        maps = torch.empty(len(cases), *cases.grids.shape[-2:])
        t = time.perf_counter()
        for g in range(cases.grids.shape[0]):
            idx = (cases.grid_index == g).nonzero()[:, 0]
            if method == "srd":  # the product's use: ratios once per image, every further target a scatter
                dec = explainer.decompose(cases.grids[g : g + 1])
                maps[idx] = torch.cat([dec.saliency(int(c)) for c in cases.targets[idx]])
            else:
                maps[idx] = explainer.saliency(cases.grids[g].expand(len(idx), -1, -1, -1), cases.targets[idx])
        r.seconds_per_map["efficientnet_lite0_grid"] = (time.perf_counter() - t) / len(cases)
        r.scores["pointing_game"] = float(pointing_game(maps, cases.boxes).mean())
        r.scores["energy_in_box"] = float(energy_in_box(maps, cases.boxes).mean())
        r.scores["gini"] = float(gini(maps).mean())
        examples[method] = maps[example_cases]
        xs = cases.grids[cases.grid_index[perturb_idx]]
        grid_classes = torch.stack([cases.targets[cases.grid_index == cases.grid_index[k]] for k in perturb_idx])
        pc = insertion_deletion(
            model,
            xs,
            cases.targets[perturb_idx],
            maps[perturb_idx],
            n_steps=s.perturb_steps_grid,
            batch_size=8,
            seed=SEED,
            classes=grid_classes,  # the probability among the grid's four classes
        )
        curves[method] = record_perturbation(r, pc)
        del maps
        n_s = s.n_sensitivity_real
        sens = max_sensitivity(
            explainer.saliency,
            singles[:n_s],
            single_targets[:n_s],
            radius=s.sensitivity_radius,
            n_samples=s.sensitivity_samples,
            seed=SEED,
        )
        record_sensitivity(r, sens)
        if method in ATTACKABLE:
            n_a = s.n_attack_real
            record_attack(
                r,
                "attack_efficientnet_total",
                method,
                explainer,
                model,
                singles[:n_a],
                single_targets[:n_a],
                maps_for(explainer, singles[:n_a], single_targets[:n_a]),
                s,
                epsilon=8 / 128,
                bounds=(lo, hi),
                steps=s.attack_steps_real,
            )
        log(f"    {json.dumps({k: round(v, 4) for k, v in r.scores.items()})}")
    crops = _real_crops(grid.candidate_photos(), s.n_apop_real_crops, 256, loaded.preprocess)
    apop = apop_agreement(model, torch.cat([singles, crops]), batch_size=16, seed=SEED)
    extras = {
        "images": [(i.name, i.label, loaded.class_names[i.label], i.prob) for i in images],
        "apop": apop,
        "apop_inputs": f"{len(singles)} confident photos + {len(crops)} random crops of the offline photos",
        "examples": examples,
        "example_grids": cases.grids[cases.grid_index[example_cases]],
        "example_boxes": cases.boxes[example_cases],
        "example_labels": [loaded.class_names[int(c)] for c in cases.targets[example_cases]],
        "curves": curves,
        "chance": 0.25,
    }
    meta = {"n_grids": int(cases.grids.shape[0]), "n_cases": len(cases), "n_perturb_cases": len(perturb_idx)}
    return results, extras, meta


# ---------------------------------------------------------------------------------------------------------
# reporting

COLUMNS = (
    ("tiny", "pointing_game", "PG↑"),
    ("tiny", "pointing_game_random_init", "PG rand-init↓"),
    ("tiny", "energy_in_box", "EiB↑"),
    ("tiny", "deletion_auc", "Del↓"),
    ("tiny", "insertion_auc", "Ins↑"),
    ("tiny", "gini", "Gini"),
    ("tiny", "max_sensitivity", "MaxSens↓"),
    ("tiny", "attack_pearson_before_after", "Attack r↑"),
    ("tiny", "attack_topk_before_after", "Attack top-k↑"),
    ("real", "pointing_game", "Grid PG↑"),
    ("real", "energy_in_box", "Grid EiB↑"),
    ("real", "deletion_auc", "Del↓"),
    ("real", "insertion_auc", "Ins↑"),
    ("real", "gini", "Gini"),
    ("real", "max_sensitivity", "MaxSens↓"),
    ("real", "attack_pearson_before_after", "Attack r↑"),
    ("real", "attack_topk_before_after", "Attack top-k↑"),
)


def fmt(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def markdown_table(tiny: dict[str, MethodResult], real: dict[str, MethodResult], methods: list[str]) -> str:
    head = (
        ["method"]
        + [f"{'Tiny' if m == 'tiny' else 'Eff'} {label}" for m, _, label in COLUMNS]
        + ["s/map Tiny", "s/map Eff"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        cells = [method]
        for model, key, _ in COLUMNS:
            source = tiny if model == "tiny" else real
            cells.append(fmt(source[method].scores.get(key)) if method in source else "—")
        cells.append(fmt(tiny[method].seconds_per_map.get("tiny_resnet")) if method in tiny else "—")
        cells.append(fmt(real[method].seconds_per_map.get("efficientnet_lite0_grid")) if method in real else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def signed_image(ax, m: torch.Tensor, title: str | None = None) -> None:
    """Blue-white-red, white at zero, symmetric scale at the 99.5th percentile of |map| (clipped beyond)."""
    peak = float(torch.quantile(m.abs().flatten().float(), 0.995)) or float(m.abs().max()) or 1.0
    ax.imshow(m.numpy(), cmap="seismic", vmin=-peak, vmax=peak)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def figures(out: Path, methods: list[str], tiny_extra: dict | None, real_extra: dict | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if tiny_extra is not None:
        rows = min(4, len(tiny_extra["images"]))
        fig, axes = plt.subplots(rows, len(methods) + 1, figsize=(1.5 * (len(methods) + 1), 1.6 * rows), squeeze=False)
        for i in range(rows):
            ax = axes[i, 0]
            ax.imshow(tiny_extra["images"][i].permute(1, 2, 0).numpy())
            y0, x0, y1, x1 = tiny_extra["boxes"][i].tolist()
            ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="lime", lw=1))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"label {int(tiny_extra['labels'][i])}" if i == 0 else None, fontsize=8)
            for j, method in enumerate(methods, start=1):
                signed_image(axes[i, j], tiny_extra["examples"][method][i], method if i == 0 else None)
        fig.suptitle("TinyResNet, held-out synthetic test images (green: glyph box; red +, blue −)", fontsize=9)
        fig.tight_layout()
        written.append(out / "examples_synthetic.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    if real_extra is not None:
        shown = [m for m in methods if m in real_extra["examples"]]
        rows = real_extra["example_grids"].shape[0]
        fig, axes = plt.subplots(rows, len(shown) + 1, figsize=(1.7 * (len(shown) + 1), 1.9 * rows), squeeze=False)
        for i in range(rows):
            ax = axes[i, 0]
            ax.imshow(((real_extra["example_grids"][i] * 128 + 127).clamp(0, 255) / 255).permute(1, 2, 0).numpy())
            y0, x0, y1, x1 = real_extra["example_boxes"][i].tolist()
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="lime", lw=1.5))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(f"target: {real_extra['example_labels'][i]}", fontsize=8)
            for j, method in enumerate(shown, start=1):
                signed_image(axes[i, j], real_extra["examples"][method][i], method if i == 0 else None)
        fig.suptitle("EfficientNet-Lite0, grid pointing game (green: target cell)", fontsize=9)
        fig.tight_layout()
        written.append(out / "examples_grid.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    for key, extra, title in (
        ("synthetic", tiny_extra, "TinyResNet (synthetic)"),
        ("grid", real_extra, "EfficientNet-Lite0 (grid)"),
    ):
        if extra is None or not extra["curves"]:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for method, c in extra["curves"].items():
            style = {"lw": 2.5, "color": "black"} if method == "srd" else {"lw": 1}
            axes[0].plot(c["fractions"], c["deletion"], label=method, **style)
            axes[1].plot(c["fractions"], c["insertion"], label=method, **style)
        axes[0].set_title(f"{title}: deletion (lower is better)", fontsize=9)
        axes[1].set_title(f"{title}: insertion (higher is better)", fontsize=9)
        for ax in axes:
            ax.set_xlabel("fraction of pixels changed")
            ax.set_ylabel("p(target)")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        written.append(out / f"curves_{key}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    if tiny_extra is not None and tiny_extra["attack_examples"]:
        shown = list(tiny_extra["attack_examples"])
        fig, axes = plt.subplots(len(shown), 4, figsize=(6.5, 1.7 * len(shown)), squeeze=False)
        for i, method in enumerate(shown):
            ex = tiny_extra["attack_examples"][method]
            signed_image(axes[i, 0], ex["before"][0], "map before" if i == 0 else None)
            signed_image(axes[i, 1], ex["target"][0], "target map" if i == 0 else None)
            signed_image(axes[i, 2], ex["after"][0], "map after attack" if i == 0 else None)
            diff = (ex["x_adv"][0] - ex["x"][0]).abs().sum(0)
            axes[i, 3].imshow(diff.numpy(), cmap="gray")
            axes[i, 3].set_xticks([])
            axes[i, 3].set_yticks([])
            axes[i, 0].set_ylabel(method, fontsize=8)
            if i == 0:
                axes[i, 3].set_title("|perturbation|", fontsize=8)
        fig.tight_layout()
        written.append(out / "attack_synthetic.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def versions() -> dict[str, str]:
    import captum
    import pytorch_grad_cam
    import skimage
    import sklearn
    import zennit

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "captum": captum.__version__,
        "pytorch_grad_cam": getattr(pytorch_grad_cam, "__version__", "1.5.7"),
        "zennit": getattr(zennit, "__version__", "0.5.1"),
        "scikit-image": skimage.__version__,
        "scikit-learn": sklearn.__version__,
        "ierf": ierf.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/fidelity"))
    parser.add_argument("--fast", action="store_true", help="small subset of every experiment")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated; default: all")
    parser.add_argument("--skip-real", action="store_true", help="TinyResNet only")
    parser.add_argument("--skip-synthetic", action="store_true", help="EfficientNet-Lite0 only")
    parser.add_argument("--no-variants", action="store_true", help="leave out the documented extra rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--publish",
        type=Path,
        help="also copy table.md, results.json (as fidelity_results.json) and the main figures here",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        help="results.json of an earlier run with the same settings: its rows fill in what this run skips",
    )
    args = parser.parse_args(argv)
    if args.fast and args.publish:  # a smoke run's numbers would replace the committed full-run results
        parser.error("--publish copies over the committed results: use it with a full run, not --fast")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    known = set(ierf.available_methods())
    unknown = [m for m in methods if m not in known]
    if unknown:
        parser.error(f"unknown methods {unknown}; available: {sorted(known)}")
    if not args.no_variants:
        methods += [v for v in VARIANTS if VARIANTS[v][0] in methods]
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    settings = FAST if args.fast else FULL
    prev = json.loads(args.merge.read_text()) if args.merge else None
    if prev is not None and prev["settings"] != settings.__dict__:  # checked before half an hour of work, not after
        parser.error(f"--merge {args.merge}: that run used other settings")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tiny, tiny_extra, tiny_meta = ({}, None, {}) if args.skip_synthetic else run_synthetic(methods, settings, args.out)
    real, real_extra, real_meta = ({}, None, {}) if args.skip_real else run_real(methods, settings)
    total = time.perf_counter() - t0
    tiny_summary = tiny_extra and {k: tiny_extra[k] for k in ("accuracy", "reference", "apop")}
    real_summary = real_extra and {k: real_extra[k] for k in ("apop", "apop_inputs", "images")}
    merged_from = None
    if prev is not None:  # rows of an earlier full run for every (model, method) this run did not compute
        merged_from = {"path": str(args.merge), "total_seconds": prev["total_seconds"], "versions": prev["versions"]}
        for key, rows in (("tiny_resnet", tiny), ("efficientnet_lite0", real)):
            for m, r in prev[key].items():
                rows.setdefault(m, MethodResult(**r))
        methods += [m for m in prev["methods"] if m not in methods]
        methods.sort(key=lambda m: (list(METHODS) + list(VARIANTS)).index(m))
        tiny_meta = tiny_meta or prev["tiny_meta"]
        real_meta = real_meta or prev["real_meta"]
        tiny_summary = tiny_summary or {
            "accuracy": prev["synthetic_accuracy"],
            "reference": prev["synthetic_reference"],
            "apop": prev["apop"]["tiny_resnet"],
        }
        real_summary = real_summary or {
            "apop": prev["apop"]["efficientnet_lite0"],
            "apop_inputs": prev.get("apop_inputs")
            or f"{len(prev['grid_images'])} confident photos + {settings.n_apop_real_crops} random crops of the "
            "offline photos",
            "images": prev["grid_images"],
        }
    table = markdown_table(tiny, real, methods)
    record = training_record()
    notes = [
        f"Tiny = TinyResNet on {tiny_meta.get('n_images', 0)} held-out synthetic test images "
        f"(accuracy {fmt(tiny_summary and tiny_summary['accuracy'])}; checkpoint test accuracy "
        f"{record['test_accuracy']:.3f}); Eff = EfficientNet-Lite0 on {real_meta.get('n_cases', 0)} grid cases "
        f"({real_meta.get('n_grids', 0)} grids of 448²; chance 0.25), Del/Ins on {real_meta.get('n_perturb_cases', 0)} "
        "cases, MaxSens and attack on the single 224² photos.",
    ]
    if tiny_summary:
        ref = tiny_summary["reference"]
        notes.append(
            f"Synthetic references: random map PG {ref['random map']['pointing_game']:.3f} / EiB "
            f"{ref['random map']['energy_in_box']:.3f}; centre point PG {ref['centre point']['pointing_game']:.3f}; "
            f"the box covers {ref['box share of image']:.1%} of the image."
        )
        notes.append(f"APOP TinyResNet: {json.dumps({k: round(v, 3) for k, v in tiny_summary['apop'].items()})}")
    if real_summary:
        notes.append(
            f"APOP EfficientNet-Lite0 ({real_summary['apop_inputs']}): "
            f"{json.dumps({k: round(v, 3) for k, v in real_summary['apop'].items()})}"
        )
    if merged_from:
        ran = [
            f"{m} on {label}"
            for label, ran_rows in (("TinyResNet", tiny_extra), ("EfficientNet-Lite0", real_extra))
            if ran_rows
            for m in methods
            if m in ran_rows["examples"]
        ]
        notes.append(
            f"Rows recomputed in this run: {', '.join(ran)}; every other row comes from {merged_from['path']} "
            "(same settings and seeds; each method's numbers are computed independently)."
        )
    notes.append(
        "PG = pointing game, EiB = energy in box (positive part), Del/Ins = deletion/insertion AUC of p(target) "
        "(grid: softmax over the grid's four classes), "
        "Gini of |map|, MaxSens = max relative map change under ±2% uniform noise, Attack r / top-k = Pearson "
        "/ top-10% overlap of the map before vs after the manipulation attack (— = method has no differentiable "
        "path here). Variants: " + "; ".join(f"{k}: {v[2]}" for k, v in VARIANTS.items())
    )
    unsmoothed = [
        f"{m} on {label}"
        for label, source in (("TinyResNet", tiny), ("EfficientNet-Lite0", real))
        for m, r in source.items()
        if r.scores.get("attack_smoothed") == 0.0
    ]
    if unsmoothed:
        notes.append(
            "Attacked WITHOUT softplus smoothing (the explainer refused the smoothed copy; a weaker attack, so "
            "these robustness numbers are optimistic): " + ", ".join(unsmoothed)
        )
    text = table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    (args.out / "table.md").write_text(text)
    written = figures(args.out, [m for m in methods if m not in VARIANTS], tiny_extra, real_extra)
    result = {
        "settings": settings.__dict__,
        "fast": args.fast,
        "seed": SEED,
        "methods": methods,
        "method_options": METHOD_OPTIONS,
        "variants": {k: {"method": v[0], "options": v[1], "why": v[2]} for k, v in VARIANTS.items()},
        "tiny_resnet": {m: r.__dict__ for m, r in tiny.items()},
        "efficientnet_lite0": {m: r.__dict__ for m, r in real.items()},
        "tiny_meta": tiny_meta,
        "real_meta": real_meta,
        "synthetic_reference": tiny_summary and tiny_summary["reference"],
        "synthetic_accuracy": tiny_summary and tiny_summary["accuracy"],
        "apop": {
            "tiny_resnet": tiny_summary and tiny_summary["apop"],
            "efficientnet_lite0": real_summary and real_summary["apop"],
        },
        "apop_inputs": real_summary and real_summary["apop_inputs"],
        "grid_images": real_summary and real_summary["images"],
        "merged_from": merged_from,
        "training_record": record,
        "versions": versions(),
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "total_seconds": total,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(text)
    print(f"total {total:.0f} s; wrote {args.out}/results.json, table.md, " + ", ".join(p.name for p in written))
    if args.publish:
        args.publish.mkdir(parents=True, exist_ok=True)
        shutil.copy(args.out / "table.md", args.publish / "fidelity_table.md")
        shutil.copy(args.out / "results.json", args.publish / "fidelity_results.json")
        for path in [] if merged_from else written:  # a merged run's figures show only the rows it recomputed
            shutil.copy(path, args.publish / f"fidelity_{path.name}")
        print(f"published to {args.publish}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
