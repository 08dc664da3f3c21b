"""What crosses the ingress -> worker hop: jobs, outcomes, a model's description, and the checks of a
request against it.

Kept free of torch (numpy and the standard library only): the ingress imports this module, and a thin
ingress should not load a deep-learning framework (about 1 s and 400 MB per replica) to validate and
forward requests. :mod:`ierf.serving.worker` holds the model and imports these names from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ierf.serving.errors import InvalidArgument, ResourceExhausted, echo
from ierf.serving.images import ACCEPTED_FORMATS, TENSOR_DTYPES
from ierf.serving.settings import GRPC_MAX_MESSAGE_ENV

DEFAULT_METHOD = "srd"


# --------------------------------------------------------------------------------------- messages
# ``pixels`` None: the job travels by content hash alone (the ingress sent this image recently, or the caller
# named it by its hash); the worker answers from what its caches hold (the decomposition, the logits, the view
# it kept), and one that no longer holds what it needs answers PixelsNeeded: the ingress sends the job again
# with the pixels. A warm call so skips the view cut and most of the hop.


@dataclass
class ExplainJob:
    pixels: np.ndarray | None  # canonical uint8 (H, W, 3), the model's view of it (view_version), or None
    content_hash: str  # of the canonical pixels, also when a view travels
    method: str = DEFAULT_METHOD
    target: int | None = None
    contrast: str | int = "identity"
    overlay: bool = False
    return_input: bool = False
    deadline: float | None = None  # time.time() after which the caller no longer waits
    # set: ``pixels`` are already the model's view (resize + centre crop), made by the ingress with this
    # preprocessing version; a decoded photo is mostly pixels the model never sees, and travels at its size
    view_version: str = ""


@dataclass
class IERFJob:
    pixels: np.ndarray | None
    content_hash: str
    layer: str
    positions: np.ndarray  # int64 (P, 2) rows of (row, col)
    overlay: bool = False
    return_input: bool = False
    deadline: float | None = None
    map_itemsize: int = 4  # bytes per value of the maps the caller asked for (float32 4, float16 2)
    view_version: str = ""  # as ExplainJob's


@dataclass
class PredictJob:
    pixels: np.ndarray | None
    content_hash: str
    top_k: int = 5
    deadline: float | None = None
    view_version: str = ""  # as ExplainJob's


@dataclass(frozen=True)
class Score:
    index: int
    name: str
    probability: float
    logit: float


@dataclass(frozen=True)
class LayerShape:
    name: str
    channels: int
    height: int
    width: int


@dataclass
class Provenance:
    model_id: str
    weights_digest: str
    method: str
    method_version: str
    preprocess_version: str
    content_hash: str
    # (artifact, tier): "l1"|"l2" found there; "miss" computed here; "disabled" computed here and kept in no
    # tier (too big for each, the cache off, or only Redis could keep it and Redis is known down), so the next
    # request computes it again
    cache: list[tuple[str, str]] = field(default_factory=list)
    timings: list[tuple[str, float]] = field(default_factory=list)  # (stage, seconds)


@dataclass
class Outcome:
    provenance: Provenance
    maps: np.ndarray | None = None  # float32: (H, W) saliency or (P, H, W) iERFs
    target: Score | None = None
    top_classes: list[Score] = field(default_factory=list)
    layer: LayerShape | None = None
    overlays: list[bytes] = field(default_factory=list)
    model_input: np.ndarray | None = None  # uint8 (H, W, 3): the model's view the maps refer to


@dataclass(frozen=True)
class ModelDescription:
    id: str
    weights_digest: str
    input_height: int
    input_width: int
    preprocess_version: str
    class_names: list[str]
    layers: list[LayerShape]
    methods: list[str]
    default_method: str
    device: str
    encodings: tuple[str, ...] = ACCEPTED_FORMATS
    tensor_dtypes: tuple[str, ...] = TENSOR_DTYPES
    # other names the engine accepts for a layer ("layer4" for "layer4.2", "layer4.2.relu:2"): alias -> name
    layer_aliases: dict[str, str] = field(default_factory=dict)
    # methods this model's architecture cannot run (left out of ``methods``): name -> why
    refused_methods: dict[str, str] = field(default_factory=dict)
    # the short side's size before the centre crop (input_height x input_width); 0: not said, so the
    # ingress sends decoded images whole
    resize: int = 0


# ------------------------------------------------------------------------------------ validation
# Pure checks against a model's description: the worker runs them, and the ingress runs them first
# (when it holds the description) so a caller's mistake is answered at once, not behind the queue.


def check_class(index: int, num_classes: int, model_id: str, what: str = "target") -> None:
    if not 0 <= index < num_classes:
        raise InvalidArgument(
            f"{what} {index} is out of range: {model_id} has {num_classes} classes (0..{num_classes - 1})"
        )


CONTRAST_NAMES = ("identity", "mean")  # SRD's contrasts by name; a class to subtract is contrast_class


def check_explain_args(desc: ModelDescription, method: str, target: int | None, contrast: str | int) -> None:
    if method in desc.refused_methods:
        raise InvalidArgument(desc.refused_methods[method])
    if method not in desc.methods:
        raise InvalidArgument(f"unknown method {echo(method)}; available: {', '.join(desc.methods)}")
    n = len(desc.class_names)
    if target is not None:
        check_class(target, n, desc.id)
    if isinstance(contrast, int):
        check_class(contrast, n, desc.id, "contrast class")
        if contrast == target:
            raise InvalidArgument(
                f"contrast_class {contrast} is the target: target minus itself is zero everywhere; "
                "contrast with another class"
            )
    elif contrast not in CONTRAST_NAMES:
        raise InvalidArgument(
            f"contrast {echo(contrast)} is not 'identity' or 'mean'; to subtract another class, set contrast_class"
        )
    if method != DEFAULT_METHOD and contrast != "identity":
        raise InvalidArgument(f"contrast is an SRD option; method {echo(method)} takes contrast 'identity' only")


def check_ierf_args(desc: ModelDescription, layer_name: str, positions: np.ndarray) -> LayerShape:
    """The layer (aliases resolved to their canonical name), after checking the positions on its grid."""
    name = desc.layer_aliases.get(layer_name, layer_name)
    layer = next((item for item in desc.layers if item.name == name), None)
    if layer is None:
        names = [item.name for item in desc.layers]
        prefix = f"{layer_name}:"
        # a run may be a layer's own name or an alias of one (a ResNet block's last ReLU run is the block)
        runs = sorted(
            {n for n in [*names, *desc.layer_aliases] if n.startswith(prefix) and n[len(prefix) :].isdigit()},
            key=lambda n: int(n[len(prefix) :]),
        )
        if runs:  # a reused activation module: the engine's own hint, which the worker's check had lost
            raise InvalidArgument(
                f"layer {echo(layer_name)} runs {len(runs)} times in one forward (a reused activation module): "
                f"name one run, {', '.join(runs)}"
            )
        shown = ", ".join(names[:12]) + (f", … ({len(names)} in all; see GetModel)" if len(names) > 12 else "")
        raise InvalidArgument(f"unknown layer {echo(layer_name)} for {desc.id}; layers: {shown}")
    if len(positions) == 0:
        raise InvalidArgument("no positions given: send at least one (row, col) on the layer's PFV grid")
    for row, col in positions.tolist():
        if not (0 <= row < layer.height and 0 <= col < layer.width):
            raise InvalidArgument(
                f"position ({row}, {col}) is outside the {layer.height}x{layer.width} PFV grid of layer "
                f"{layer.name!r} (rows 0..{layer.height - 1}, cols 0..{layer.width - 1})"
            )
    return layer


def grpc_message_cap() -> int | None:
    """The Serve gRPC proxy's message cap in bytes, as this process's environment sets it (None: unset)."""
    raw = os.environ.get(GRPC_MAX_MESSAGE_ENV, "").strip()
    return int(raw) if raw.isdigit() else None


def check_response_fits(desc: Any, maps: int, itemsize: int, overlay: bool, return_input: bool) -> None:
    """Refuse, before any work, a ComputeIERF whose response could pass the gRPC proxy's message cap (it
    would be computed, then dropped by the proxy): P maps, P overlay PNGs (at most ~4 bytes per pixel),
    the input crop. The ingress checks when it already holds the model's description, the worker always
    (Ray's processes inherit the cap's environment variable from the process that started them)."""
    cap = grpc_message_cap()
    if cap is None:
        return
    pixels = desc.input_height * desc.input_width
    worst = maps * pixels * (itemsize + (4 if overlay else 0)) + (3 * pixels if return_input else 0) + (1 << 16)
    if worst > cap:
        fit = max(1, (cap - (3 * pixels if return_input else 0) - (1 << 16)) // (pixels * (itemsize + 4 * overlay)))
        raise ResourceExhausted(
            f"{maps} maps of {desc.input_height}x{desc.input_width}{' with overlays' if overlay else ''} could "
            f"make a response of {worst / 2**20:.0f} MiB, over the gRPC message cap of {cap / 2**20:.0f} MiB "
            f"({GRPC_MAX_MESSAGE_ENV}); ask for at most {fit} positions per call, float16 maps or no overlays"
        )


def check_top_k(desc: ModelDescription, top_k: int) -> int:
    n = len(desc.class_names)
    value = top_k or 5
    if not 1 <= value <= n:
        raise InvalidArgument(f"top_k {top_k} is out of range: 1..{n}")
    return value
