"""``ierf --server`` with an image file whose header declares more pixels than Pillow opens.

The README promises that with ``--server`` the CLI "uploads the image file's own bytes when the server
reads its format (PNG, JPEG, WebP)", that bad arguments and a server's refusals print a short message
(exit 2) and that a server that cannot answer exits 1. ``remote_backend._upload`` sniffs the format with
``Image.open``, which raises ``DecompressionBombError`` (not an ``OSError``) past 2 x 89.5 Mpx and warns
past 89.5 Mpx: the CLI then dies with a traceback instead of letting the server refuse the file by its
pixel cap (RESOURCE_EXHAUSTED), and prints a Pillow warning for files between the two.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from ierf.cli import ExplainRequest, main
from PIL import Image


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose IHDR declares width x height (what a server's header check sees)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )
    return path


def test_server_mode_uploads_the_bytes_of_a_png_over_pillows_bomb_limit(tmp_path: Path) -> None:
    """A 200 Mpx PNG is the server's to refuse (its pixel cap, from the header): ``_upload`` must send the
    file's own bytes, not raise Pillow's DecompressionBombError on the caller's machine."""
    from ierf.serving.remote_backend import _upload

    big = _png_header_only(tmp_path / "big.png", 20000, 10000)
    assert _upload(ExplainRequest(image=None, path=str(big))) == big.read_bytes()


def test_server_mode_sniffing_a_large_png_prints_no_pillow_warning(tmp_path: Path) -> None:
    """Between 89.5 and 179 Mpx Pillow only warns; ``ierf --server explain`` printed that
    DecompressionBombWarning (with its source line) above the server's one-line refusal."""
    from ierf.serving.remote_backend import _upload

    big = _png_header_only(tmp_path / "big.png", 12000, 9000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _upload(ExplainRequest(image=None, path=str(big))) == big.read_bytes()
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_server_mode_huge_png_is_the_servers_refusal_not_a_traceback(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end through ``main`` against a server (stubbed at the SDK) that answers GetModel and refuses
    the upload by its pixel cap, as the real one does (RESOURCE_EXHAUSTED, no retry trailer): the README
    says that exits 2 with one line. Before the fix ``main`` raised DecompressionBombError (a traceback,
    status 1 from the interpreter) before anything was sent."""
    import grpc
    import ierf_client
    from ierf.serving.local import free_port

    info = SimpleNamespace(id="efficientnet_lite0", weights_digest="0" * 16, class_names=[f"c{i}" for i in range(10)])
    sent: list[object] = []

    def refuse(self, image, *args, **kwargs):
        sent.append(image)
        raise ierf_client.ResourceExhaustedError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, "PNG image is 20000 wide x 10000 high = 200000000 pixels, over the cap"
        )

    monkeypatch.setattr(ierf_client.Client, "model", lambda self, model_id="", **kw: info)
    monkeypatch.setattr(ierf_client.Client, "predict", refuse)
    big = _png_header_only(tmp_path / "big.png", 20000, 10000)
    argv = ["--server", f"127.0.0.1:{free_port()}", "explain", str(big), "-o", str(tmp_path / "out.png")]
    try:
        status = main(argv)
    except Image.DecompressionBombError as exc:  # the defect
        pytest.fail(f"ierf --server explain raised {type(exc).__name__}: {exc}")
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert sent == [big.read_bytes()]  # the file's own bytes went to the server
    assert status == 2, captured.err
    assert "RESOURCE_EXHAUSTED" in captured.err.strip().splitlines()[-1]
