"""Mutation round 28 on ``ierf.cli`` (options, the output check, the PNG write's exit statuses, the tables).
Each test fails on a plausible slip that the suite let through (the mutant's id is in each docstring): a
whitespace-only class taken as a class name, the input image reached through another spelling of its path,
a read-only file system reported as the machine's fault, ``--device`` dropped on the way to the backend,
a layer table narrower than its header, a blank ``--server`` or an infinite ``--timeout`` accepted, the SDK
client behind ``--server`` left open, ``ierf layers --weights`` ignoring its file. A recording backend or the
graph of a random-init MobileNetV2; no server (``--server`` points at a closed port)."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
from ierf.cli import LayerRow, main
from PIL import Image
from test_cli import _EchoBackend
from test_cli_power_user import _partial_save


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    Image.fromarray(np.full((16, 16, 3), 100, np.uint8)).save(path)
    return path


@pytest.mark.parametrize("option", ["--target", "--contrast"])
def test_a_blank_class_is_refused_as_empty(image: Path, tmp_path: Path, option: str, capsys) -> None:
    """K5: ``--target "  "`` (a variable holding only spaces) is as empty as ``""``: refused before any work
    with the "is empty" message, not sent on as a class named two spaces."""
    backend = _EchoBackend()
    assert main(["explain", str(image), "-o", str(tmp_path / "o.png"), option, "   "], backend=backend) == 2
    assert backend.requests == []
    assert f"{option} is empty" in capsys.readouterr().err


def test_the_input_reached_by_another_spelling_is_not_overwritten(image: Path, tmp_path: Path, capsys) -> None:
    """K9: ``-o sub/../in.png`` names the input file through another path; comparing the paths' spelling
    misses it, comparing the files does not."""
    (tmp_path / "sub").mkdir()
    before = image.read_bytes()
    backend = _EchoBackend()
    out = tmp_path / "sub" / ".." / "in.png"
    assert main(["explain", str(image), "-o", str(out)], backend=backend) == 2
    assert "is the input image" in capsys.readouterr().err
    assert backend.requests == [] and image.read_bytes() == before


def test_a_read_only_file_system_under_the_png_is_a_usage_error(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """K12: EROFS is fixed by another -o (exit 2, like EACCES), not a machine fault to retry (exit 1)."""
    monkeypatch.setattr(Image.Image, "save", _partial_save(OSError(errno.EROFS, "Read-only file system")))
    out = tmp_path / "srd.png"
    assert main(["explain", str(image), "-o", str(out)], backend=_EchoBackend()) == 2
    assert "Read-only file system" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


def test_device_reaches_the_backend(image: Path, tmp_path: Path) -> None:
    """K21: ``--device cuda`` is passed to the in-process backend (which then fails loudly without a GPU),
    not replaced by the CPU default."""
    backend = _EchoBackend()
    assert main(["explain", str(image), "-o", str(tmp_path / "o.png"), "--device", "cuda"], backend=backend) == 0
    assert backend.requests[0].device == "cuda"
    assert main(["explain", str(image), "-o", str(tmp_path / "p.png")], backend=backend) == 0
    assert backend.requests[1].device == "cpu"


class _ShortLayers(_EchoBackend):
    def layers(self, model: str, weights: str | None = None) -> list[LayerRow]:
        return [LayerRow("a", 3, 7, 7), LayerRow("bb", 64, 112, 112)]


def test_the_layer_table_is_at_least_as_wide_as_its_header(capsys) -> None:
    """K24: names shorter than the word "layer" still line up under the header (the channel counts end in
    one column)."""
    assert main(["layers", "--model", "m"], backend=_ShortLayers()) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("layer  ")
    end = lines[0].index("channels") + len("channels")
    assert [line[:end].rstrip()[-2:].strip() for line in lines[1:]] == ["3", "64"]
    assert all(line[end : end + 2] == "  " for line in lines[1:])


@pytest.mark.parametrize("command", [["models"], ["layers"]])
def test_a_blank_server_address_is_refused(command: list[str], capsys) -> None:
    """K26: ``--server "$ADDR"`` with ADDR holding only spaces is as empty as ``""``."""
    assert main(["--server", "   ", *command]) == 2
    assert "--server needs an ADDRESS" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1"])
def test_a_timeout_must_be_finite_and_positive(value: str, capsys) -> None:
    """K27: ``--timeout inf`` is no call budget at all; refused like 0, negative and NaN."""
    assert main(["--server", "127.0.0.1:1", "--timeout", value, "models"]) == 2
    assert "--timeout must be a positive number of seconds" in capsys.readouterr().err


def test_a_server_backend_the_command_opened_is_closed(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """K32: the SDK client behind ``--server`` is closed when the command ends, also after a failed call (its
    channel's threads and sockets would otherwise outlive ``main`` in a process that calls it repeatedly)."""
    from ierf.serving import remote_backend

    opened: list[remote_backend.RemoteBackend] = []

    class Recorded(remote_backend.RemoteBackend):
        def __init__(self, address: str, timeout: float = 600.0) -> None:
            super().__init__(address, timeout)
            opened.append(self)

    monkeypatch.setattr(remote_backend, "RemoteBackend", Recorded)
    assert main(["--server", "127.0.0.1:1", "--timeout", "0.5", "models"]) == 1  # nothing listens there
    assert "error" in capsys.readouterr().err
    assert len(opened) == 1
    with pytest.raises(RuntimeError, match="this Client is closed"):
        opened[0].client.models()


def test_layers_reads_the_weights_file_it_is_given(tmp_path: Path, capsys) -> None:
    """K33: ``ierf layers --weights PATH`` loads that file (a missing one is named in the error); random
    weights stand in only when no file is given."""
    import torch
    import torchvision

    missing = tmp_path / "nope.pth"
    assert main(["layers", "--model", "mobilenet_v2", "--weights", str(missing)]) == 2
    assert "nope.pth" in capsys.readouterr().err
    weights = tmp_path / "mobilenet_v2.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v2().state_dict(), weights)
    assert main(["layers", "--model", "mobilenet_v2", "--weights", str(weights)]) == 0
    with_file = capsys.readouterr().out
    assert main(["layers", "--model", "mobilenet_v2"]) == 0
    assert capsys.readouterr().out == with_file  # names and grids come from the graph alone
    assert len(with_file.splitlines()) > 10
