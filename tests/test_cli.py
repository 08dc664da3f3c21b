"""The ``ierf`` CLI, run in-process through ``main(argv)`` and once as ``python -m ierf.cli``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ierf.cli import ClassProbability, ExplainRequest, Explanation, InProcessBackend, LayerRow, main, parse_position
from ierf.images import demo_image, load_image
from ierf.models import available_models
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
IMG = "{image}"  # placeholders filled in per test


@pytest.fixture(scope="module")
def coffee_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "coffee.png"
    Image.fromarray(demo_image("coffee")).save(path)
    return path


def _error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err
    return lines[-1] if lines else ""


def test_models_lists_every_model_and_where_weights_are(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in available_models():
        assert re.search(rf"^{name}\s", out, re.MULTILINE)
    assert "efficientnet-lite0-57934424.pth" in out
    assert "v3-r256-c224-tf127" in out


def test_demo_image_writes_the_bundled_photo(tmp_path, capsys):
    out = tmp_path / "nested" / "coffee.png"
    assert main(["demo-image", "coffee", "-o", str(out)]) == 0
    assert np.array_equal(load_image(out), demo_image("coffee"))
    assert str(out) in capsys.readouterr().out


def test_module_entry_point_works_as_in_make_run(tmp_path):
    out = tmp_path / "chelsea.png"
    env = {**os.environ, "PYTHONPATH": str(REPO / "service")}
    done = subprocess.run(
        [sys.executable, "-m", "ierf.cli", "demo-image", "chelsea", "-o", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert load_image(out).shape == (300, 451, 3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo-image", "dog", "-o", "x.png"], "unknown demo image 'dog'"),
        (["demo-image", "coffee", "-o", "x.jpg"], "output must be a .png file"),
        (["explain", IMG, "-o", "out.png", "--model", "resnet5"], "unknown model 'resnet5'"),
        (["explain", "{missing}", "-o", "out.png"], "does not exist"),
        (["explain", IMG, "-o", "out.png", "--layer", "layer1"], "--layer and --position go together"),
        (["explain", IMG, "-o", "out.png", "--position", "1,2"], "--layer and --position go together"),
        (["explain", IMG, "-o", "out.png", "--layer", "x", "--position", "a,b"], "ROW,COL"),
        (["explain", IMG, "-o", "out.png", "--layer", "x", "--position", "-1,2"], "got '-1,2'"),
        (["explain", IMG, "-o", "out.png", "--weights", "{text}", "--model", "resnet18"], "not a readable PyTorch"),
        (
            ["explain", IMG, "-o", "out.png", "--layer", "x", "--position", "1,2", "--target", "3"],
            "an iERF (--layer/--position) has no target",
        ),
        (["explain", IMG, "-o", "out.png", "--target", "zzzz"], "no class name contains 'zzzz'"),
        (["explain", IMG, "-o", "out.png", "--target", "cat"], "ambiguous"),
        (["explain", IMG, "-o", "out.png", "--target", "1000"], "out of range"),
        (["explain", IMG, "-o", "out.png", "--contrast", "zzzz"], "no class name contains 'zzzz'"),
        (["explain", "{image}", "-o", "out.jpg"], "output must be a .png file"),
        (["explain", IMG, "-o", "out.png", "--model", "resnet50"], "resnet50-0676ba61.pth"),
        (["explain", IMG, "-o", "out.png", "--weights", "{missing}"], "not found"),
        (["explain", "{text}", "-o", "out.png"], "not a recognised image format"),
        (["explain", IMG, "-o", ".png"], "output must be a .png file name"),
        (["explain", IMG, "-o", "{dir}.png"], "is a directory"),
        (["explain", "{image}", "-o", "{image}"], "is the input image: it would be overwritten"),
        (["explain", IMG, "-o", "out.png", "--layer", "x", "--position", "99999999999999999999,0"], "outside any"),
        (["explain", IMG, "-o", "out.png", "--layer", "x", "--position", "\u00b2,3"], "ROW,COL"),
        (["--server", "", "explain", IMG, "-o", "out.png"], "--server needs an ADDRESS"),
        (["explain", IMG, "-o", "out.png", "--timeout", "5"], "--timeout applies with --server"),
        (["--server", "127.0.0.1:1", "explain", IMG, "-o", "out.png", "--timeout", "0"], "positive number"),
        (["--server", "127.0.0.1:1", "explain", IMG, "-o", "out.png", "--device", "cpu"], "--device does not apply"),
        # --server leaves the image undecoded; a missing file or a directory is still the command's fault (2),
        # said before any call to the (here unreachable) server
        (["--server", "127.0.0.1:1", "--timeout", "5", "explain", "{missing}", "-o", "out.png"], "does not exist"),
        (["--server", "127.0.0.1:1", "--timeout", "5", "explain", "{dir}.png", "-o", "out.png"], "is a directory"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, coffee_png, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IERF_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    (tmp_path / "folder.png").mkdir()
    image = tmp_path / "photo.png"
    image.write_bytes(coffee_png.read_bytes())
    paths = {"image": str(image), "missing": str(tmp_path / "missing.png"), "text": str(text)}
    paths["dir"] = str(tmp_path / "folder")
    argv = [arg.format(**paths) for arg in argv]
    assert main(argv) == 2
    line = _error(capsys)
    command = next(arg for arg in argv if arg in ("explain", "demo-image"))
    assert line.startswith(f"ierf {command}: error: ") and message in line, line
    assert not (tmp_path / "out.png").exists()
    assert image.read_bytes() == coffee_png.read_bytes()  # the input is never touched


def test_argparse_errors_exit_2(capsys):
    assert main(["explain"]) == 2  # no image, no -o
    assert "required" in capsys.readouterr().err
    # a forgotten --position value is said as such (the option after it was taken for the value)
    assert main(["explain", "x.png", "--layer", "l", "--position", "-o", "y.png"]) == 2
    assert "--position: expected one argument" in capsys.readouterr().err
    assert main(["explain", "x.png", "-o", "y.png", "--device", "tpu"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["explain", "x.png", "-o", "y.png", "--weights", "w.pth", "--random-init"]) == 2
    assert main([]) == 2


def test_server_may_follow_the_command(coffee_png, capsys):
    """``ierf explain IMG --server ADDR`` reaches the SDK like ``ierf --server ADDR explain IMG`` (here an
    address nobody listens on: a one-line UNAVAILABLE error after the CLI's few quick retries, exit status
    1: a server that cannot answer is not a usage error, which exits 2)."""
    from ierf.serving.local import free_port

    address = f"127.0.0.1:{free_port()}"
    for argv in (["--server", address, "models"], ["models", "--server", address]):
        assert main(argv) == 1
        line = _error(capsys)
        assert line.startswith(f"ierf models: error: server {address}: UNAVAILABLE"), line
    assert main(["explain", str(coffee_png), "-o", "x.png", "--server", address]) == 1
    assert f"server {address}: UNAVAILABLE" in _error(capsys)


def test_parse_position():
    assert parse_position("3,4") == (3, 4)
    assert parse_position(" 0 , 12 ") == (0, 12)
    for bad in ("3", "3,4,5", "-1,2", "1.5,2", ""):
        with pytest.raises(ValueError, match="ROW,COL"):
            parse_position(bad)


# --- end to end through the SRD engine ------------------------------------------------------------


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in output:\n{text}"
    return float(match.group(1))


def test_explain_prints_top5_and_writes_the_saliency_overlay(coffee_png, tmp_path, capsys):
    out = tmp_path / "coffee_srd.png"
    assert main(["explain", str(coffee_png), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    ranks = re.findall(r"^\s+(\d)\.\s+(\d+)\s+(.+?)\s+([\d.]+)%$", printed, re.MULTILINE)
    assert [int(r[0]) for r in ranks] == [1, 2, 3, 4, 5]
    assert (int(ranks[0][1]), ranks[0][2]) == (967, "espresso")
    assert float(ranks[0][3]) == pytest.approx(95.7, abs=2)
    assert "SRD saliency for 967 'espresso'" in printed and f"wrote {out}" in printed
    # Identity contrast on a global-pool + linear head: the map sums to the target logit.
    target_logit = _number(r"target logit (\S+)", printed)
    assert _number(r"map sum (\S+),", printed) == pytest.approx(target_logit, rel=1e-3)
    picture = Image.open(out)
    assert picture.format == "PNG" and picture.width == 224 and picture.height > 224


def test_explain_named_target_and_contrast(coffee_png, tmp_path, capsys):
    out = tmp_path / "cup.png"
    explain = ["explain", str(coffee_png), "-o", str(out)]
    assert main([*explain, "--target", "CUP", "--contrast", "espresso"]) == 0
    printed = capsys.readouterr().out
    assert "SRD saliency for 968 'cup'" in printed and "contrast minus 'espresso'" in printed
    assert out.is_file()


def _listed_layers(printed: str) -> dict[str, tuple[int, int, int]]:
    """``ierf layers`` output -> {name: (channels, rows, cols)} (the first line is the header)."""
    header, *lines = printed.splitlines()
    assert header.split()[:2] == ["layer", "channels"]
    table = {}
    for line in lines:
        name, channels, rows, x, cols = line.split()
        assert x == "x"
        table[name] = (int(channels), int(rows), int(cols))
    return table


def test_layers_lists_each_grid(capsys):
    """The grid is what ``--position`` indexes: without it a user guessed positions from the names."""
    assert main(["layers"]) == 0
    table = _listed_layers(capsys.readouterr().out)
    assert table["_swish:0"] == (32, 112, 112)  # the stem: stride 2 at 224²
    assert list(table.values())[-1] == (1280, 7, 7)  # the head's last PFV map
    assert main(["layers", "--model", "vgg16"]) == 0
    assert _listed_layers(capsys.readouterr().out)["features.29"] == (512, 14, 14)


def test_layers_takes_random_init_as_explain_does(capsys):
    """A user copying ``--random-init`` from an explain command line gets the same table (random weights are
    what ``layers`` loads anyway when no file is named); with ``--weights`` too it is a usage error."""
    assert main(["layers", "--model", "resnet18"]) == 0
    plain = capsys.readouterr().out
    assert main(["layers", "--model", "resnet18", "--random-init"]) == 0
    assert capsys.readouterr().out == plain
    assert main(["layers", "--model", "resnet18", "--random-init", "--weights", "w.pth"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    # with --server the server decides its weights: refused as explain refuses it, before any call
    assert main(["--server", "127.0.0.1:9", "layers", "--random-init"]) == 2
    assert "--weights/--random-init do not apply with --server" in _error(capsys)


def test_explain_ierf_and_layer_errors(coffee_png, tmp_path, capsys):
    assert main(["layers"]) == 0
    layers = list(_listed_layers(capsys.readouterr().out))
    assert layers, "the engine reported no layers for efficientnet_lite0"
    out = tmp_path / "ierf.png"
    explain = ["explain", str(coffee_png), "-o", str(out)]
    assert main([*explain, "--layer", layers[-1], "--position", "2,3"]) == 0
    printed = capsys.readouterr().out
    assert f"iERF of {layers[-1]} at (2, 3)" in printed
    assert _number(r"map sum (\S+)", printed) == pytest.approx(1.0, abs=1e-3)
    assert out.is_file()
    assert main([*explain, "--layer", "no.such.layer", "--position", "0,0"]) == 2
    assert "no.such.layer" in _error(capsys)


def test_explain_torchvision_model_with_random_weights(coffee_png, tmp_path, capsys):
    out = tmp_path / "mobilenet.png"
    assert main(["explain", str(coffee_png), "-o", str(out), "--model", "mobilenet_v2", "--random-init"]) == 0
    printed = capsys.readouterr().out
    assert "random_init(seed=0)" in printed and out.is_file()


class _Recorder:
    """A backend that records which model each command asked for (the CLI's plumbing, not a server)."""

    def __init__(self) -> None:
        self.models: list[str] = []

    def model_names(self) -> list[str]:
        return []

    def layers(self, model: str, weights: str | None = None) -> list[LayerRow]:
        self.models.append(model)
        return [LayerRow(f"layer{i}", 8, 4, 4) for i in range(200)]

    def explain(self, request):
        raise AssertionError("not used")


def test_without_model_a_server_uses_its_own_default(capsys):
    """``--server`` without ``--model`` asked every server for efficientnet_lite0 (NOT_FOUND on a server
    that does not host it); now it asks for the server's default, and in-process keeps efficientnet_lite0."""
    recorder = _Recorder()
    assert main(["--server", "127.0.0.1:1", "layers"], backend=recorder) == 0
    assert main(["layers"], backend=recorder) == 0
    assert main(["layers", "--model", "resnet18"], backend=recorder) == 0
    assert recorder.models == ["", "efficientnet_lite0", "resnet18"]


def test_a_reader_that_goes_away_ends_the_listing_quietly(monkeypatch):
    """``ierf layers | head -1``: the closed pipe used to end in a BrokenPipeError traceback."""
    read, write = os.pipe()
    os.close(read)  # nobody reads: the first flush fails with EPIPE
    stdout = os.fdopen(write, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        assert main(["layers"], backend=_Recorder()) == 0
    finally:
        stdout.close()


def test_the_overlay_is_written_before_the_report_so_a_closed_pipe_cannot_cost_it(coffee_png, tmp_path, monkeypatch):
    """``ierf explain … | head -1`` (or ``| true``) under PYTHONUNBUFFERED, as in the Docker image: the
    top-5 went out first, the pipe broke, and the command ended as a success without writing the PNG."""
    read, write = os.pipe()
    os.close(read)
    stdout = os.fdopen(write, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", stdout)
    out = tmp_path / "srd.png"
    try:
        assert main(["explain", str(coffee_png), "-o", str(out)]) == 0
    finally:
        stdout.close()
    assert load_image(out).shape[1:] == (224, 3)  # the overlay, captioned below the 224² crop


def test_ctrl_c_ends_with_one_line_and_status_130(capsys):
    class Interrupted(_Recorder):
        def layers(self, model: str, weights: str | None = None) -> list[LayerRow]:
            raise KeyboardInterrupt

    assert main(["layers"], backend=Interrupted()) == 130
    assert _error(capsys) == "ierf layers: interrupted"


def test_server_mode_uploads_the_files_own_bytes_when_the_server_reads_its_format(tmp_path):
    """``--server`` re-encoded the decoded photo as PNG for each of its calls (a 12 MP JPEG: ~15 MB each)."""
    from ierf.cli import ExplainRequest
    from ierf.serving.remote_backend import _upload

    pixels = demo_image("chelsea")
    jpeg, bmp = tmp_path / "cat.jpg", tmp_path / "cat.bmp"
    Image.fromarray(pixels).save(jpeg, quality=90)
    Image.fromarray(pixels).save(bmp)
    assert _upload(ExplainRequest(image=load_image(jpeg), path=str(jpeg))) == jpeg.read_bytes()
    for request in (ExplainRequest(image=pixels, path=str(bmp)), ExplainRequest(image=pixels)):
        assert _upload(request) is request.image  # a format the server does not take, or no file: the pixels


def test_server_mode_decodes_a_file_the_server_does_not_read_before_uploading(tmp_path: Path) -> None:
    """``--server`` leaves the image undecoded (``image=None``), so for a format the server does not read
    (BMP) ``_upload`` must decode the file itself: returning ``request.image`` sent None, not the pixels."""
    from ierf.serving.remote_backend import _upload

    pixels = demo_image("chelsea")
    bmp = tmp_path / "cat.bmp"
    Image.fromarray(pixels).save(bmp)
    sent = _upload(ExplainRequest(image=None, path=str(bmp)))
    assert isinstance(sent, np.ndarray)
    np.testing.assert_array_equal(sent, load_image(bmp))


def test_the_cli_and_the_package_import_without_torch():
    """``import ierf`` is lazy (PEP 562): ``ierf --server`` only talks to a server and started in ~4.5 s,
    almost all of it importing torch. The names still resolve on first use."""
    code = (
        "import sys, ierf.cli, ierf, ierf.models; assert 'torch' not in sys.modules, 'torch imported'; "
        "assert ierf.SRD.__name__ == 'SRD' and callable(ierf.models.load_model) and ierf.srd.register_activation; "
        "assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_server_errors_exit_2_when_the_request_is_at_fault_and_1_when_the_server_cannot_answer() -> None:
    """A cap's RESOURCE_EXHAUSTED is refused again on every retry (2, "fix the command"); an overload's,
    marked with a pause to wait, is not (1, "retry later")."""
    import grpc
    from ierf.cli import BackendFailure
    from ierf.serving.remote_backend import _server_errors
    from ierf_client import IerfError, ResourceExhaustedError

    class Backend:
        address = "svc:9000"

        def __init__(self, error: IerfError) -> None:
            self.error = error

        @_server_errors
        def call(self) -> None:
            raise self.error

    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    cases = [
        (ResourceExhaustedError(exhausted, "image is over the cap"), ValueError),
        (ResourceExhaustedError(exhausted, "service overloaded", 0.25), BackendFailure),
        (ResourceExhaustedError(exhausted, "Request dropped due to backpressure", 0.0), BackendFailure),  # proxy
        (IerfError(grpc.StatusCode.UNAUTHENTICATED, "bad token"), ValueError),
        (IerfError(grpc.StatusCode.INTERNAL, "boom"), BackendFailure),
        # an unknown model or layer is the command's fault (2); a server that is down or too slow is not (1)
        (IerfError(grpc.StatusCode.NOT_FOUND, "no model 'r5'"), ValueError),
        (IerfError(grpc.StatusCode.INVALID_ARGUMENT, "bad position"), ValueError),
        (IerfError(grpc.StatusCode.UNAVAILABLE, "connection refused"), BackendFailure),
        (IerfError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline"), BackendFailure),
    ]
    for error, expected in cases:
        with pytest.raises(expected, match=f"server svc:9000: {error.code.name}"):
            Backend(error).call()


def test_python_dash_m_prints_one_line_for_a_server_that_cannot_answer() -> None:
    """Run as ``python -m ierf.cli``, the module was imported twice and the failure escaped as a traceback."""
    from ierf.serving.local import free_port

    run = subprocess.run(
        [sys.executable, "-m", "ierf.cli", "--server", f"127.0.0.1:{free_port()}", "models", "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert "UNAVAILABLE" in run.stderr.strip().splitlines()[-1]


class _EchoBackend:
    """Records the request and answers with a fixed saliency (the CLI's plumbing, not the engine)."""

    def __init__(self) -> None:
        self.requests: list[ExplainRequest] = []

    def model_names(self) -> list[str]:
        return []

    def layers(self, model: str, weights: str | None = None) -> list:
        return []

    def explain(self, request: ExplainRequest) -> Explanation:
        self.requests.append(request)
        top = [ClassProbability(7, "cock", 0.9)]
        return Explanation(
            kind="saliency", model="fake", weights="none", pixels=np.zeros((8, 8, 3), np.uint8),
            map=np.zeros((8, 8), np.float32), top=top, target=top[0], target_logit=1.0,
        )  # fmt: skip


def test_target_auto_is_case_insensitive(coffee_png: Path, tmp_path: Path) -> None:
    """--help says "auto (top-1, default)": "AUTO" is that keyword in any case, not a class name."""
    backend = _EchoBackend()
    assert main(["explain", str(coffee_png), "-o", str(tmp_path / "o.png"), "--target", "AUTO"], backend=backend) == 0
    assert backend.requests[0].target == "auto"


def test_output_suffix_is_case_insensitive(tmp_path: Path, capsys) -> None:
    """OUT.PNG is a PNG file name (cameras and Windows users write upper case)."""
    out = tmp_path / "UPPER.PNG"
    assert main(["demo-image", "coffee", "-o", str(out)]) == 0
    assert Image.open(out).format == "PNG"


def test_explicit_target_reports_its_own_probability(coffee_png: Path, tmp_path: Path, capsys) -> None:
    """The "(p=...)" of a chosen target is that class's softmax probability, not the top-1's; and
    --contrast is case-insensitive like --target AUTO (MEAN is the mean contrast, not a class name)."""
    out = tmp_path / "cup.png"
    assert main(["explain", str(coffee_png), "-o", str(out), "--target", "cup", "--contrast", "MEAN"]) == 0
    printed = capsys.readouterr().out
    ranks = {int(i): float(p) for i, p in re.findall(r"^\s+\d\.\s+(\d+)\s+.+?\s+([\d.]+)%$", printed, re.MULTILINE)}
    assert 968 in ranks, "cup is expected among coffee's top-5"
    reported = float(re.search(r"968 'cup' \(p=([\d.]+)\)", printed).group(1))
    assert reported == pytest.approx(ranks[968] / 100, abs=6e-4)
    assert "contrast mean" in printed


def test_in_process_ierf_is_of_the_requested_row_and_col() -> None:
    """--position ROW,COL: the in-process backend explains PFV (row, col), checked against the engine on a
    non-square position (the other CLI tests read the position back from the summary line only)."""
    import ierf
    import torch
    from ierf.models import load_model

    image = demo_image("coffee")
    backend = InProcessBackend()
    layer = backend.layers("efficientnet_lite0")[-1].name
    result = backend.explain(ExplainRequest(image=image, layer=layer, position=(2, 5)))
    loaded = load_model("efficientnet_lite0")
    x = loaded.normalize(torch.from_numpy(loaded.resize_crop(image)).permute(2, 0, 1)[None])
    decomposition = ierf.SRD(loaded.module).decompose(x)
    expected = decomposition.ierf(layer, torch.tensor([[2, 5]]))[0, 0].float().numpy()
    np.testing.assert_allclose(result.map, expected, rtol=1e-5, atol=1e-7)
    assert result.position == (2, 5)


def test_explicit_target_reports_its_own_logit() -> None:
    """The reported target logit is the chosen class's, not the top-1's: with the identity contrast the SRD map
    of the target sums to it (cup, 968, is not coffee's top-1)."""
    result = InProcessBackend().explain(ExplainRequest(image=demo_image("coffee"), target="cup"))
    assert result.target is not None and result.target.index == 968 != result.top[0].index
    assert float(result.map.sum()) == pytest.approx(result.target_logit, rel=1e-3)


def test_a_report_that_cannot_be_written_exits_1(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Guards against ending with status 0 when stdout fails for another reason than a closed pipe (a full
    disk under ``ierf layers > list.txt``): the script would go on with a truncated listing as if it were whole."""
    import errno
    import io

    class FullDisk(io.TextIOBase):
        def write(self, text: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sys, "stdout", FullDisk())
    assert main(["layers"], backend=_Recorder()) == 1
    assert _error(capsys) == "ierf layers: error: [Errno 28] No space left on device"


def test_a_contrast_given_by_id_is_reported_by_its_class_name() -> None:
    """Guards against echoing the --contrast text instead of the class it resolved to: "minus '967'" says
    nothing, and a misspelt-but-matching name would be printed as if it were the class subtracted."""
    request = ExplainRequest(image=demo_image("coffee"), model="resnet18", random_init=True, contrast="967")
    result = InProcessBackend().explain(request)
    assert result.contrast == "minus 'espresso'"


def test_contrast_with_an_ierf_is_refused_not_ignored(coffee_png: Path, tmp_path: Path, capsys) -> None:
    """Guards against checking only --target: ``--layer L --position R,C --contrast mean`` would draw the plain iERF
    (an iERF has no contrast) while the user believes the contrast was applied."""
    backend = _EchoBackend()
    argv = ["explain", str(coffee_png), "-o", str(tmp_path / "o.png"), "--layer", "x", "--position", "1,2"]
    assert main([*argv, "--contrast", "mean"], backend=backend) == 2
    assert "an iERF (--layer/--position) has no target" in _error(capsys)
    assert backend.requests == [] and not (tmp_path / "o.png").exists()


class _GridBackend(_EchoBackend):
    """Answers with a non-square layer grid (2 rows x 4 cols): the shipped models' grids are all square."""

    def layers(self, model: str, weights: str | None = None) -> list:
        return [LayerRow("wide", 8, 2, 4)]

    def explain(self, request: ExplainRequest) -> Explanation:
        self.requests.append(request)
        erf = np.zeros((8, 8), np.float32)
        erf[2:4, 2:6] = 1 / 8
        return Explanation(
            kind="ierf", model="fake", weights="none", pixels=np.zeros((8, 8, 3), np.uint8), map=erf,
            top=[ClassProbability(7, "cock", 0.9)], layer=request.layer, position=request.position, feature_hw=(2, 4),
        )  # fmt: skip


def test_grids_are_printed_rows_by_cols(coffee_png: Path, tmp_path: Path, capsys) -> None:
    """Guards against printing a layer's grid as cols x rows: ``--position ROW,COL`` is read against that grid, so a
    swapped report on a non-square layer sends the user to positions outside it."""
    backend = _GridBackend()
    assert main(["layers"], backend=backend) == 0
    assert _listed_layers(capsys.readouterr().out) == {"wide": (8, 2, 4)}
    out = tmp_path / "wide.png"
    argv = ["explain", str(coffee_png), "-o", str(out), "--layer", "wide", "--position", "1,3"]
    assert main(argv, backend=backend) == 0
    assert "iERF of wide at (1, 3) (feature map 2x4); map sum 1" in capsys.readouterr().out


class _ChosenTargetBackend(_EchoBackend):
    """Answers a saliency of class 968 'cup' while 967 'espresso' is the top-1."""

    def explain(self, request: ExplainRequest) -> Explanation:
        self.requests.append(request)
        top = [ClassProbability(967, "espresso", 0.9), ClassProbability(968, "cup", 0.05)]
        saliency = np.linspace(-1, 1, 224 * 224, dtype=np.float32).reshape(224, 224)
        return Explanation(
            kind="saliency", model="fake", weights="none", pixels=np.full((224, 224, 3), 90, np.uint8),
            map=saliency, top=top, target=top[1], target_logit=1.0,
        )  # fmt: skip


def test_the_overlay_caption_names_the_explained_class_not_the_top_1(coffee_png: Path, tmp_path: Path) -> None:
    """Guards against captioning the picture with the top-1 class: an overlay of "cup" labelled "SRD 967 espresso"
    is read, once the PNG is shared without the terminal output, as the espresso evidence."""
    from ierf.viz import overlay_signed

    out = tmp_path / "cup.png"
    assert main(["explain", str(coffee_png), "-o", str(out), "--target", "cup"], backend=_ChosenTargetBackend()) == 0
    result = _ChosenTargetBackend().explain(ExplainRequest(image=np.zeros((1, 1, 3), np.uint8)))
    written = np.asarray(Image.open(out).convert("RGB"))

    def drawn(caption: str) -> np.ndarray:
        return np.asarray(overlay_signed(result.pixels, result.map, caption=caption))

    assert np.array_equal(written, drawn("SRD 968 cup"))
    assert not np.array_equal(written, drawn("SRD 967 espresso"))


def test_server_mode_reports_a_contrast_given_by_id_by_its_class_name() -> None:
    """``--server`` sends a contrast given by id as contrast_class and reports it by the served model's class
    name, as the in-process backend does (echoing the text would print "minus '2'"). Against a loopback gRPC
    server that answers with a three-class model's description."""
    from concurrent import futures

    import grpc
    from ierf.serving.remote_backend import RemoteBackend
    from ierf_proto.v1 import explainer_pb2 as pb
    from ierf_proto.v1 import explainer_pb2_grpc as pb_grpc

    asked: list[tuple[int, int]] = []
    score = pb.ClassScore(index=1, name="one", probability=0.6, logit=2.0)

    class ThreeClasses(pb_grpc.ExplainServiceServicer):
        def GetModel(self, request, context):
            spec = pb.InputSpec(height=8, width=8, channels=3, color_space="RGB", max_image_bytes=1 << 20)
            names = ["zero", "one", "two"]
            return pb.ModelInfo(id="m", weights_digest="abc", input=spec, num_classes=3, class_names=names)

        def Predict(self, request, context):
            return pb.PredictResponse(top_classes=[score])

        def Explain(self, request, context):
            asked.append((request.target, request.contrast_class))
            saliency = pb.Tensor(data=bytes(4 * 64), dtype=pb.DATA_TYPE_FLOAT32, shape=[8, 8])
            view = pb.Tensor(data=bytes(8 * 8 * 3), dtype=pb.DATA_TYPE_UINT8, shape=[8, 8, 3])
            return pb.ExplainResponse(map=saliency, target=score, model_input=view)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ExplainServiceServicer_to_server(ThreeClasses(), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    backend = RemoteBackend(address, timeout=10)
    try:
        image = np.zeros((8, 8, 3), np.uint8)
        result = backend.explain(ExplainRequest(image=image, model="m", target="1", contrast="2"))
    finally:
        backend.close()
        server.stop(None)
    assert asked == [(1, 2)]
    assert result.contrast == "minus 'two'"


# -- acceptance round 9 (CLI user) ------------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["--target", "--contrast"])
@pytest.mark.parametrize("value", ["²", "+²", "1²"])
def test_a_superscript_digit_class_is_refused_as_a_class_not_as_a_python_int_error(
    option: str, value: str, coffee_png: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``class_index`` takes ``str.isdigit`` as "an id", which is true of "²" too; ``int("²")`` then fails
    and the user reads Python's "invalid literal for int() with base 10" instead of a class error
    (parse_position already refuses such digits with its own message)."""
    out = tmp_path / "out.png"
    assert main(["explain", str(coffee_png), "-o", str(out), option, value]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "invalid literal for int()" not in err, err
    assert "class" in err, err
    assert not out.exists()


def test_an_iERF_of_a_layer_alias_is_reported_under_the_canonical_name(
    coffee_png: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--layer layer4`` on a ResNet explains ``layer4.1`` (the block's output); the report named the alias,
    where the server's answer and ``ierf layers`` name the block."""
    out = tmp_path / "alias.png"
    args = ["explain", str(coffee_png), "-o", str(out), "--model", "resnet18", "--random-init"]
    assert main([*args, "--layer", "layer4", "--position", "3,4"]) == 0
    assert "iERF of layer4.1 at (3, 4)" in capsys.readouterr().out


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width`` x ``height`` (no pixel data: its size is all a reader checks first)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_server_mode_leaves_the_pixel_limit_to_the_server(tmp_path: Path, capsys) -> None:
    """README (Command line): "In-process, images of up to Pillow's 89.5 Mpx decode ...; a server takes up to
    its ``max_pixels``". With ``--server`` the CLI still decoded the whole file locally before uploading its
    bytes, so an image over Pillow's 89.5 Mpx was refused by the client (exit 2, "that Pillow decodes") and
    never reached a server configured for more. Here the server is unreachable: the answer must come from
    there (UNAVAILABLE, exit 1), not from a local decode."""
    from ierf.serving.local import free_port

    big = _png_header_only(tmp_path / "big.png", 9500, 9500)  # 90.25 Mpx, a PNG the server reads as it is
    address = f"127.0.0.1:{free_port()}"
    status = main(["--server", address, "--timeout", "2", "explain", str(big), "-o", str(tmp_path / "out.png")])
    line = _error(capsys)
    assert "Pillow" not in line, line
    assert status == 1 and f"server {address}: UNAVAILABLE" in line, line
