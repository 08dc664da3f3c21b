"""``ierf`` command line: classify an image, explain it with SRD, write an overlay PNG.

    ierf explain photo.jpg -o srd.png                       # saliency of the top-1 class
    ierf explain photo.jpg --target "tiger cat" -o cat.png
    ierf explain photo.jpg --layer _blocks.10._swish:1 --position 3,4 -o ierf.png
    ierf demo-image coffee -o coffee.png
    ierf models | ierf layers --model resnet50

The commands talk to a :class:`Backend`. :class:`InProcessBackend` runs the engine in this process;
a remote backend (the gRPC SDK behind ``--server``) only has to implement the same three methods.
User errors (the server's refusals of them included) print one line and exit with status 2; a server
that cannot answer (unreachable, out of time, overloaded, failing) exits with status 1; tracebacks are
reserved for bugs.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # as a shell reports SIGINT
DEFAULT_MODEL = "efficientnet_lite0"
MODEL_HELP = f"model name (default: {DEFAULT_MODEL} in-process, the server's default with --server; see `ierf models`)"
TOP_K = 5
SERVER_TIMEOUT_S = 300.0  # a call's whole budget with --server (the shipped server's own cap)
MAX_POSITION = 2**31 - 1


class UsageError(ValueError):
    """A bad command line argument detected by the CLI itself."""


# Weight options a server ignores (it decides its own weights): refused with --server, never dropped.
SERVER_WEIGHTS = "--weights/--random-init do not apply with --server: the server decides its weights"


class BackendFailure(RuntimeError):
    """The backend could not answer: a server unreachable, out of time, overloaded or failing (exit
    status 1, so a script can tell "retry later" from "fix the command", which exits 2)."""


@dataclass(frozen=True)
class ExplainRequest:
    """What to explain; ``target``/``contrast`` stay strings so the backend resolves class names
    against the model it actually serves."""

    image: np.ndarray | None  # uint8 (H, W, 3), the original picture (the backend resizes and crops); None:
    # not decoded here (a server is sent the file and decodes it, up to its own limits)
    model: str = DEFAULT_MODEL
    path: str | None = None  # the file it was read from: a server is sent its bytes, not re-encoded pixels
    weights: str | None = None
    random_init: bool = False
    target: str = "auto"  # "auto" (top-1) | class id | class name
    contrast: str = "identity"  # "identity" | "mean" | class id | class name
    layer: str | None = None  # with position: the iERF of that PFV instead of class saliency
    position: tuple[int, int] | None = None
    device: str = "cpu"


@dataclass(frozen=True)
class ClassProbability:
    index: int
    name: str
    probability: float


@dataclass(frozen=True)
class Explanation:
    kind: Literal["saliency", "ierf"]
    model: str
    weights: str  # where the weights came from, for the user to see
    pixels: np.ndarray  # uint8 (h, w, 3): the model's crop, which the map refers to
    map: np.ndarray  # float32 (h, w), signed
    top: list[ClassProbability]
    target: ClassProbability | None = None  # saliency only
    target_logit: float | None = None
    contrast: str = "identity"
    layer: str | None = None  # iERF only
    position: tuple[int, int] | None = None
    feature_hw: tuple[int, int] | None = None  # the layer's (h, w), to mark the PFV's cell


@dataclass(frozen=True)
class LayerRow:
    """A layer accepted by ``--layer`` and its PFV grid at the model's input size (positions run
    ``0..height-1``, ``0..width-1``)."""

    name: str
    channels: int
    height: int
    width: int


class Backend(Protocol):
    """Where explanations are computed: in this process, or (later) a server."""

    def model_names(self) -> list[str]: ...

    def layers(self, model: str, weights: str | None = None) -> list[LayerRow]: ...

    def explain(self, request: ExplainRequest) -> Explanation: ...


class InProcessBackend:
    """Loads models with :func:`ierf.models.load_model` and explains with :class:`ierf.SRD`."""

    def model_names(self) -> list[str]:
        from ierf.models import available_models

        return available_models()

    def layers(self, model: str, weights: str | None = None) -> list[LayerRow]:
        import ierf
        from ierf.models import load_model
        from ierf.srd import pfv_grid

        # Names and grids depend on the graph only, so explicit random weights do when none are given
        # (--random-init, accepted as explain accepts it, asks for what happens anyway).
        loaded = load_model(model, weights=weights, random_init=weights is None)
        explainer = ierf.SRD(loaded.module)
        size = (loaded.input_size, loaded.input_size)
        rows = []
        for name in explainer.layers:
            shape = explainer.layer_shape(name, size)  # one zero-input forward, shared by every layer
            rows.append(LayerRow(name, int(shape[0]), *pfv_grid(shape)))
        return rows

    def explain(self, request: ExplainRequest) -> Explanation:
        import torch

        import ierf
        from ierf.models import load_model
        from ierf.srd import pfv_grid

        loaded = load_model(
            request.model, weights=request.weights, random_init=request.random_init, device=request.device
        )
        # Resolve class names before the expensive part, so a typo fails fast.
        target = None if request.target == "auto" else loaded.class_index(request.target)
        contrast: str | int = request.contrast.lower()
        if contrast not in ("identity", "mean"):
            contrast = loaded.class_index(request.contrast)
        assert request.image is not None, "the in-process backend is given decoded pixels"
        pixels = loaded.resize_crop(request.image)
        x = loaded.normalize(torch.from_numpy(pixels).permute(2, 0, 1)[None]).to(loaded.device)
        explainer = ierf.SRD(loaded.module)
        layer = None
        if request.layer is not None:  # a bad layer name fails before the forward; an alias is named canonically
            layer = explainer.program.names[explainer.program.source_id(request.layer)]
        decomposition = explainer.decompose(x)
        logits = decomposition.logits[0].detach().float().cpu()
        top = [ClassProbability(*score) for score in loaded.top_k(logits, TOP_K)]
        weights = f"{loaded.weights_source} (sha256 {loaded.weights_digest})"
        if request.layer is not None:
            if request.position is None:
                raise UsageError("--layer needs --position ROW,COL")
            positions = torch.tensor([request.position], dtype=torch.long, device=loaded.device)
            erf = decomposition.ierf(request.layer, positions)[0, 0]
            feat_h, feat_w = pfv_grid(decomposition.layer_shape(request.layer))
            return Explanation(
                kind="ierf",
                model=loaded.name,
                weights=weights,
                pixels=pixels,
                map=erf.detach().float().cpu().numpy(),
                top=top,
                layer=layer,
                position=request.position,
                feature_hw=(int(feat_h), int(feat_w)),
            )
        if target is None:
            target = top[0].index
        saliency = decomposition.saliency(target, contrast=contrast)[0]
        probability = float(torch.softmax(logits.double(), dim=0)[target])
        return Explanation(
            kind="saliency",
            model=loaded.name,
            weights=weights,
            pixels=pixels,
            map=saliency.detach().float().cpu().numpy(),
            top=top,
            target=ClassProbability(target, loaded.class_names[target], probability),
            target_logit=float(logits[target]),
            contrast=str(contrast) if isinstance(contrast, str) else f"minus {loaded.class_names[contrast]!r}",
        )


def parse_position(text: str) -> tuple[int, int]:
    """``"ROW,COL"`` -> (row, col) with non-negative ints (ASCII digits: ``str.isdigit`` also takes "²")."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != 2 or not all(part.isascii() and part.isdigit() for part in parts):
        raise UsageError(f"--position must be ROW,COL with non-negative integers (e.g. 3,4), got {text!r}")
    row, col = int(parts[0]), int(parts[1])
    if max(row, col) > MAX_POSITION:
        raise UsageError(f"--position {text!r} is outside any layer's grid")
    return row, col


def _target(text: str | None) -> str:
    """ "auto" in any case means the top-1 class (as --contrast takes MEAN); anything else as given. Only a
    missing option is the default: an empty one (``--target "$CLASS"`` with CLASS unset) is refused."""
    if text is None:
        return "auto"
    value = _non_empty(text, "--target")
    return "auto" if value.lower() == "auto" else value


def _non_empty(text: str, option: str) -> str:
    value = text.strip()
    if not value:
        raise UsageError(f"{option} is empty; omit it for the default, or give a class id or name")
    return value


def check_output(output: str, image: str | None = None) -> Path:
    """The output path, checked before any work: a .png file name, not a directory, not the input, under
    a folder that is one (or can be made: its nearest existing ancestor is a writable directory)."""
    path = Path(output)
    if path.suffix.lower() != ".png":
        raise UsageError(f"output must be a .png file name (e.g. out.png), got {output!r}")
    if path.is_dir():
        raise UsageError(f"output {output!r} is a directory")
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"cannot write {output!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {output!r}: the folder {str(parent)!r} is not writable")
    if image is not None and path.exists() and Path(image).exists() and path.samefile(image):
        raise UsageError(f"output {output!r} is the input image: it would be overwritten; choose another name")
    return path


SERVER_HELP = "compute on an ierf gRPC service (e.g. 127.0.0.1:9000) through the SDK instead of in-process"
TIMEOUT_HELP = f"with --server: seconds one call may take, retries included (default {SERVER_TIMEOUT_S:g})"


def build_parser() -> argparse.ArgumentParser:
    from ierf import __version__

    parser = argparse.ArgumentParser(prog="ierf", description="Explain what vision models see (SRD, iERF).")
    parser.add_argument("--version", action="version", version=f"ierf {__version__}")
    parser.add_argument("--server", metavar="ADDRESS", help=SERVER_HELP)
    parser.add_argument("--timeout", metavar="SECONDS", type=float, help=TIMEOUT_HELP)
    # --server also after the command (`ierf explain IMG --server ADDR`); SUPPRESS keeps the value given
    # before the command when the sub-command's own copy is absent.
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--server", metavar="ADDRESS", default=argparse.SUPPRESS, help=SERVER_HELP)
    remote.add_argument("--timeout", metavar="SECONDS", type=float, default=argparse.SUPPRESS, help=TIMEOUT_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    explain = commands.add_parser(
        "explain", parents=[remote], help="classify an image and write an SRD saliency or iERF overlay"
    )
    explain.add_argument("image", help="image file (PNG, JPEG, WebP, …)")
    explain.add_argument("-o", "--output", required=True, help="PNG file to write")
    explain.add_argument("--model", help=MODEL_HELP)
    weights = explain.add_mutually_exclusive_group()
    weights.add_argument("--weights", help="state_dict file for torchvision models (.pth)")
    weights.add_argument("--random-init", action="store_true", help="explicitly random weights (seed 0)")
    explain.add_argument("--target", help="class to explain: auto (top-1, default), an id or a name")
    explain.add_argument("--contrast", help="identity (default), mean, or a class id/name to subtract")
    explain.add_argument("--layer", help="layer whose PFV to explain as an iERF (see `ierf layers`)")
    explain.add_argument("--position", help="ROW,COL of the PFV in the layer's feature map (with --layer)")
    explain.add_argument("--device", choices=("cpu", "cuda"), help="in-process only (default cpu)")

    demo = commands.add_parser("demo-image", help="write a bundled real photograph as PNG")
    demo.add_argument("name", help="coffee, chelsea, rocket, astronaut, motorcycle, china, flower")
    demo.add_argument("-o", "--output", required=True, help="PNG file to write")

    commands.add_parser("models", parents=[remote], help="list the available models and where their weights are")

    layers = commands.add_parser("layers", parents=[remote], help="list the layers accepted by --layer")
    layers.add_argument("--model", help=MODEL_HELP)
    layer_weights = layers.add_mutually_exclusive_group()
    layer_weights.add_argument("--weights", help="state_dict file (only the graph matters; random weights otherwise)")
    layer_weights.add_argument("--random-init", action="store_true", help="random weights (the default here)")
    return parser


def _write_png(picture: object, output: str) -> Path:
    from PIL import Image

    path = check_output(output)
    if not isinstance(picture, Image.Image):
        picture = Image.fromarray(np.asarray(picture))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot write {output!r}: {exc.strerror or exc}") from None
    # Written beside it and renamed onto it: a failure half-way (a full disk, Ctrl-C) leaves no truncated
    # PNG, and an earlier one of that name whole.
    fd, temporary = _create_beside(path)
    try:
        with os.fdopen(fd, "wb") as stream:
            picture.save(stream, format="PNG")
        os.replace(temporary, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(exc, OSError) and exc.errno in _USAGE_ERRNOS:
            raise UsageError(f"cannot write {output!r}: {exc.strerror or exc}") from None
        if isinstance(exc, OSError):  # a full disk, a file-size limit, an I/O error: the machine's, not the command's
            raise OutputFailure(f"cannot write {output!r}: {exc.strerror or exc}") from None
        raise
    return path


def _create_beside(path: Path) -> tuple[int, str]:
    """A new, uniquely named file in ``path``'s folder, created 0666 so the kernel applies the umask as for
    any output (mkstemp's 0600 would make it private; reading the umask means setting it, process-wide,
    which another thread's file could catch at 0)."""
    while True:
        temporary = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.part")
        try:
            return os.open(
                temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666
            ), temporary
        except FileExistsError:
            continue


class OutputFailure(Exception):
    """The output could not be written for a reason of the machine's (a full disk): exit 1, not 2."""


# Write errors that a different command line would avoid (exit 2); others (ENOSPC, EFBIG, EIO) exit 1.
_USAGE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR})


def _run_explain(args: argparse.Namespace, backend: Backend) -> int:
    from ierf.images import load_image
    from ierf.viz import feature_cell_box, overlay_signed, render_ierf, saliency_caption

    if (args.layer is None) != (args.position is None):
        raise UsageError("--layer and --position go together (the iERF of one PFV)")
    if args.layer is not None and (args.target is not None or args.contrast is not None):
        raise UsageError("--target/--contrast apply to class saliency; an iERF (--layer/--position) has no target")
    check_output(args.output, args.image)
    sends_file = getattr(backend, "sends_files", False)
    if sends_file:  # the server decodes the file: only check that it is one here
        source = Path(args.image)
        if not source.exists():
            raise FileNotFoundError(f"image file {str(source)!r} does not exist")
        if source.is_dir():
            raise ValueError(f"image path {str(source)!r} is a directory, not an image file")
    request = ExplainRequest(
        image=None if sends_file else load_image(args.image),
        path=str(args.image),
        model=args.model,
        weights=args.weights,
        random_init=args.random_init,
        target=_target(args.target),
        contrast="identity" if args.contrast is None else _non_empty(args.contrast, "--contrast"),
        layer=args.layer,
        position=parse_position(args.position) if args.position is not None else None,
        device=args.device or "cpu",
    )
    result = backend.explain(request)
    if result.kind == "ierf":
        assert result.position is not None and result.feature_hw is not None
        box = feature_cell_box(result.position, result.feature_hw, result.pixels.shape[:2])
        caption = f"iERF {result.layer} @ {result.position[0]},{result.position[1]}"
        picture = render_ierf(result.pixels, result.map, mark=box, caption=caption)
        summary = (
            f"iERF of {result.layer} at {result.position} "
            f"(feature map {result.feature_hw[0]}x{result.feature_hw[1]}); map sum {result.map.sum():.4g}"
        )
    else:
        assert result.target is not None
        caption = saliency_caption("srd", result.target.index, result.target.name, result.contrast)
        picture = overlay_signed(result.pixels, result.map, caption=caption)
        target = f"{result.target.index} {result.target.name!r} (p={result.target.probability:.3f})"
        summary = (
            f"SRD saliency for {target}, contrast {result.contrast}; "
            f"map sum {result.map.sum():.4g}, target logit {result.target_logit:.4g}"
        )
    # The file first, then the report: a reader that closes the pipe early (`| head -1`) must not cost
    # the PNG (a broken pipe ends the command as a success once the file is written).
    path = _write_png(picture, args.output)
    print(f"model: {result.model}   weights: {result.weights}")
    print(f"top-{len(result.top)} classes:")
    for rank, score in enumerate(result.top, start=1):
        print(f"  {rank}. {score.index:>4}  {score.name:<30} {score.probability:7.2%}")
    print(summary)
    print(f"wrote {path}")
    return EXIT_OK


def _run_demo_image(args: argparse.Namespace) -> int:
    from ierf.images import demo_image

    path = _write_png(demo_image(args.name), args.output)
    print(f"wrote {path}")
    return EXIT_OK


def _run_models(backend: Backend) -> int:
    header = f"{'model':<20} {'preprocessing':<24} weights"
    if hasattr(backend, "model_rows"):  # a server reports its own preprocessing and weights
        rows = backend.model_rows()  # before any output: a failed call prints only its error
        width = max([20, *(len(name) + 1 for name, _, _ in rows)])  # "<id> (default)" may be longer
        print(f"{'model':<{width}} {'preprocessing':<24} weights")
        for name, preprocessing, where in rows:
            print(f"{name:<{width}} {preprocessing:<24} {where}")
        return EXIT_OK
    from ierf.models import model_spec, resolve_weights

    print(header)
    for name in backend.model_names():
        try:
            where = str(resolve_weights(name))
        except FileNotFoundError:
            where = "weights not found (use --weights PATH or --random-init; see README 'Models')"
        print(f"{name:<20} {model_spec(name).preprocessing.version:<24} {where}")
    return EXIT_OK


def _run_layers(args: argparse.Namespace, backend: Backend) -> int:
    """One layer per line, its name first (``ierf layers | awk '{print $1}'`` lists the names), then its
    channels and the PFV grid that ``--position ROW,COL`` indexes."""
    if args.random_init and args.server:  # as explain refuses it: the server decides its weights
        raise UsageError(SERVER_WEIGHTS)
    rows = backend.layers(args.model, args.weights)  # before any output: a failed call prints only its error
    width = max([len("layer"), *(len(row.name) for row in rows)])
    print(f"{'layer':<{width}}  {'channels':>8}  grid (rows x cols)")
    for row in rows:
        print(f"{row.name:<{width}}  {row.channels:>8}  {row.height} x {row.width}")
    return EXIT_OK


def _join_negative_positions(argv: Sequence[str]) -> list[str]:
    """argparse reads ``--position -1,2`` as a missing value followed by an unknown option; joined as
    ``--position=-1,2`` the value reaches :func:`parse_position`, which says what is wrong with it. Only
    a number is joined: ``--position -o out.png`` is a forgotten value, which argparse reports."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--position" and arg[:1] == "-" and arg[1:2].isdigit():
            out[-1] = f"--position={arg}"
        else:
            out.append(arg)
    return out


def _check_remote_options(args: argparse.Namespace) -> None:
    """Options that only mean something with (or without) a server, refused rather than ignored."""
    server = getattr(args, "server", None)
    if server is not None and not server.strip():
        raise UsageError("--server needs an ADDRESS (host:port, e.g. 127.0.0.1:9000); it was empty")
    timeout = getattr(args, "timeout", None)
    if timeout is not None:
        if not server:
            raise UsageError("--timeout applies with --server (an in-process run has no call budget)")
        if not (timeout > 0 and math.isfinite(timeout)):
            raise UsageError(f"--timeout must be a positive number of seconds, got {timeout:g}")
    if server and getattr(args, "device", None) is not None:
        raise UsageError("--device does not apply with --server: the server decides its device")


def main(argv: Sequence[str] | None = None, backend: Backend | None = None) -> int:
    """Entry point of the ``ierf`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(_join_negative_positions(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse already printed usage and the problem
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    opened = None  # a backend this call created and must close
    try:
        _check_remote_options(args)
        if backend is None and args.server:
            try:
                import ierf_client  # noqa: F401  (the SDK, a separate package: clients/python)
            except ImportError:
                raise UsageError(
                    "--server needs the Python SDK (package ierf-client): pip install ./clients/python from the "
                    "ierf repository, or ierf[serve] installed beside it"
                ) from None
            from ierf.serving.remote_backend import RemoteBackend

            backend = opened = RemoteBackend(args.server, timeout=args.timeout or SERVER_TIMEOUT_S)
        backend = backend or InProcessBackend()
        if getattr(args, "model", "") is None:  # a server picks its own default model ("")
            args.model = "" if args.server else DEFAULT_MODEL
        if args.command == "explain":
            return _run_explain(args, backend)
        if args.command == "demo-image":
            return _run_demo_image(args)
        if args.command == "models":
            return _run_models(backend)
        return _run_layers(args, backend)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"ierf {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (BackendFailure, OutputFailure) as exc:
        print(f"ierf {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:  # `ierf layers | head`: the reader has gone; no traceback, nothing more to write
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as exc:  # writing the report failed (a full disk under stdout, say)
        print(f"ierf {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"ierf {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if opened is not None:
            opened.close()


if __name__ == "__main__":
    # ``python -m ierf.cli`` runs this file as __main__, while ierf.serving.remote_backend imports
    # ierf.cli: take main from there, so both see one BackendFailure class (not a second copy of it)
    from ierf.cli import main as package_main

    sys.exit(package_main())
