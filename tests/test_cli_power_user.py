"""The ``ierf`` CLI as a shell-script author uses it: where the PNG goes, what a failure leaves behind,
which exit status a script sees, and what a class name selects. Fast: a fake backend, no model."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
from ierf.cli import main
from PIL import Image
from test_cli import _EchoBackend

_Backend = _EchoBackend  # records requests, answers a fixed 8x8 saliency


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    Image.fromarray(np.full((16, 16, 3), 100, np.uint8)).save(path)
    return path


def _partial_save(error: BaseException):
    """A PIL save that writes the first bytes of a PNG and then fails (full disk, Ctrl-C)."""

    def save(self, fp, format=None, **params):
        if isinstance(fp, str | Path):
            with open(fp, "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\n partial")
        else:
            fp.write(b"\x89PNG\r\n\x1a\n partial")
        raise error

    return save


def test_an_output_under_a_file_is_refused_before_the_work(image: Path, tmp_path: Path, capsys) -> None:
    """README: "The output is checked before any work". ``-o photo.png/srd.png`` (a parent that is a file)
    was only found when the PNG was written, after the whole explanation (up to --timeout 300 s on a
    server), and reported as "File exists"."""
    backend = _Backend()
    out = image / "srd.png"  # in.png is a file
    assert main(["explain", str(image), "-o", str(out)], backend=backend) == 2
    assert backend.requests == []  # refused before any work
    assert "File exists" not in capsys.readouterr().err


def test_a_png_that_cannot_be_written_for_a_full_disk_exits_1(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A full disk under the PNG exited 2 ("fix your command") while a full disk under stdout exits 1: a
    script that retries on 1 and gives up on 2 treats the same condition two ways. ENOSPC is not a usage
    error."""
    monkeypatch.setattr(Image.Image, "save", _partial_save(OSError(errno.ENOSPC, "No space left on device")))
    assert main(["explain", str(image), "-o", str(tmp_path / "srd.png")], backend=_Backend()) == 1
    assert "No space left on device" in capsys.readouterr().err


def test_ctrl_c_while_the_png_is_written_leaves_no_partial_file(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Pillow removes a file it created only on an Exception; Ctrl-C (a BaseException) in the middle of the
    save left a truncated out.png behind, which `[ -f out.png ] || ierf explain …` then takes as done."""
    out = tmp_path / "srd.png"
    monkeypatch.setattr(Image.Image, "save", _partial_save(KeyboardInterrupt()))
    assert main(["explain", str(image), "-o", str(out)], backend=_Backend()) == 130
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [image]  # no temporary file left either


def test_a_failed_overwrite_keeps_the_previous_png(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-running into an existing out.png wrote in place: a failure half-way (full disk, Ctrl-C) destroyed
    the previous good overlay and left a truncated file. Writing beside it and renaming keeps it whole."""
    out = tmp_path / "srd.png"
    Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(out)
    before = out.read_bytes()
    monkeypatch.setattr(Image.Image, "save", _partial_save(OSError(errno.ENOSPC, "No space left on device")))
    assert main(["explain", str(image), "-o", str(out)], backend=_Backend()) != 0
    assert out.read_bytes() == before


@pytest.mark.parametrize("option", ["--target", "--contrast"])
def test_an_empty_class_is_refused_not_taken_for_the_default(image: Path, tmp_path: Path, option: str, capsys) -> None:
    """``--target "$CLASS"`` with CLASS unset explained the top-1 class (and ``--contrast ""`` gave identity)
    and exited 0: the script got a map of another class than it asked for. ``--model ""`` and ``--layer ""``
    are refused, and so is an empty name in the API (class_index: "class name is empty")."""
    backend = _Backend()
    assert main(["explain", str(image), "-o", str(tmp_path / "o.png"), option, ""], backend=backend) == 2
    assert backend.requests == []
    assert "empty" in capsys.readouterr().err


def test_both_cardigans_can_be_named() -> None:
    """ImageNet has 264 'Cardigan' (the corgi) and 474 'cardigan' (the sweater). Names match
    case-insensitively, so each spelling was "ambiguous" and no name at all selected either class; the
    exact-case spelling should break the tie (the case-insensitive rule still serves every other name)."""
    from ierf.models.classes import class_index

    assert class_index("Cardigan") == 264
    assert class_index("cardigan") == 474
    assert class_index("tiger CAT") == 282  # case-insensitive matching still holds
