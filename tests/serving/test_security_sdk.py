"""The SDK facing a malicious or buggy server: what it does with the bytes of a response.

A caller points ``ierf_client`` at an address (a colleague's server, a port-forward, a DNS name an attacker
may control); nothing in a response is authenticated. The SDK must not hand attacker-chosen bytes to
decoders beyond the PNG it documents, nor let a response it cannot read pass as the caller's own mistake.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from ierf_client import _core
from ierf_proto.v1 import explainer_pb2 as pb
from PIL import EpsImagePlugin, Image


def _explain_response(overlay: bytes = b"", map_tensor: pb.Tensor | None = None) -> pb.ExplainResponse:
    if map_tensor is None:
        map_tensor = pb.Tensor(
            data=np.zeros((224, 224), np.float32).tobytes(), dtype=pb.DATA_TYPE_FLOAT32, shape=[224, 224]
        )
    return pb.ExplainResponse(map=map_tensor, overlay_png=overlay)


def test_an_overlay_that_is_not_a_png_is_refused_and_never_reaches_ghostscript(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``overlay()`` opened the server's bytes with ``Image.open`` and no ``formats=``: any format Pillow
    knows was decoded, EPS included, whose ``load()`` runs Ghostscript (a long record of sandbox escapes)
    on the PostScript the server sent, on the caller's machine. The field is ``overlay_png``: PNG only."""
    ran = []

    def ghostscript(*args: object, **kwargs: object) -> None:
        ran.append(args)
        raise OSError("Ghostscript would have run the server's PostScript here")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 224 276\n%%EndComments\nshowpage\n"
    result = _core.parse_explanation(_explain_response(eps))
    try:
        result.overlay()
        outcome: BaseException | None = None
    except Exception as exc:
        outcome = exc
    assert ran == [], "the SDK handed the server's PostScript to Ghostscript"
    assert isinstance(outcome, _core.DataLossError), f"a non-PNG overlay was not refused: {outcome!r}"
    assert not isinstance(outcome, ValueError)  # the server's fault, not the caller's argument

    gif = io.BytesIO()
    Image.new("RGB", (224, 276)).save(gif, format="GIF")
    with pytest.raises(_core.DataLossError):  # any non-PNG: the server only ever renders PNG
        _core.parse_explanation(_explain_response(gif.getvalue())).overlay()


def _png_of_zeros(width: int, height: int) -> bytes:
    """A valid RGBA PNG of zeros: a few hundred KB of compressed data for any size."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + 4 * width)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_an_overlay_far_larger_than_its_map_is_refused_before_it_is_decoded() -> None:
    """A 4000x4000 RGBA PNG is ~90 KB on the wire and 64 MB decoded (9000x9000, still under Pillow's
    bomb limit: 309 MB from 315 KB, measured), and a ComputeIERF response carries one per position. The
    server's overlay is the map's picture plus a caption bar (224x276 for a 224x224 map); the header
    says the size before any pixel is decoded."""
    result = _core.parse_explanation(_explain_response(_png_of_zeros(4000, 4000)))
    with pytest.raises(_core.DataLossError, match="4000x4000"):
        result.overlay()
    assert _core.parse_explanation(_explain_response(_png_of_zeros(224, 276))).overlay().size == (224, 276)


def test_model_info_with_a_tensor_dtype_this_sdk_does_not_know_still_parses() -> None:
    """proto3 enums are open: a newer server that accepts another raw dtype (bfloat16, say) sends a value
    this SDK's stubs have no name for. ``parse_model`` called ``DataType.Name(value)``, which raises
    ValueError: ``client.model()`` and ``client.models()`` then failed for every old client."""
    info = pb.ModelInfo(
        id="m",
        input=pb.InputSpec(
            height=224,
            width=224,
            tensor_dtypes=[pb.DATA_TYPE_UINT8, pb.DATA_TYPE_FLOAT32, 4],  # 4: not in v1
        ),
    )
    parsed = _core.parse_model(info)
    assert parsed.input.tensor_dtypes == ["uint8", "float32", "unknown(4)"]


@pytest.mark.parametrize(
    "tensor",
    [
        pb.Tensor(data=b"\x00" * 10, dtype=pb.DATA_TYPE_FLOAT32, shape=[224, 224]),  # bytes do not fill the shape
        pb.Tensor(data=b"\x00" * 16, dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 2, 2]),  # a saliency map is (H, W)
        pb.Tensor(data=b"\x00" * 16, dtype=pb.DATA_TYPE_FLOAT32, shape=[-1]),  # numpy infers -1: (4,)
        pb.Tensor(data=b"\x00" * 4, dtype=pb.DATA_TYPE_UINT8, shape=[2, 2]),  # maps are float16/float32
    ],
    ids=["short-data", "3d-map", "negative-dim", "uint8-map"],
)
def test_a_malformed_map_in_a_response_is_a_server_error_not_a_caller_mistake(tensor: pb.Tensor) -> None:
    """A map whose bytes do not fill its shape raised numpy's bare ValueError ("buffer size must be a
    multiple of element size"), which the README tells callers to catch as *their* bad argument
    (``InvalidArgumentError`` is a ValueError); a 3-D, 1-D or uint8 "saliency map" was handed over as
    ``Explanation.map``, documented as float (H, W). Either is the server's fault: an ``IerfError``."""
    with pytest.raises(_core.DataLossError, match="response field map") as refused:
        _core.parse_explanation(_explain_response(map_tensor=tensor))
    assert not isinstance(refused.value, ValueError)


def test_a_bearer_token_is_not_sent_in_clear_text_to_a_remote_host_without_a_word() -> None:
    """``Client(address, token=...)`` without ``credentials=`` sends ``authorization: Bearer <token>`` over
    plaintext HTTP/2 on every call, health probes included. gRPC's own call credentials refuse an insecure
    channel for this reason; the SDK bypasses them by writing the metadata itself, and says nothing. To a
    non-loopback address it should refuse, or at least warn."""
    from ierf_client import Client

    refused = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            Client("10.20.30.40:9000", token="s3cret-token").close()
        except ValueError:
            refused = True
    assert refused or any("token" in str(w.message).lower() for w in caught), (
        "a bearer token goes to a remote host in clear text without a warning"
    )


@pytest.mark.parametrize(
    ("address", "local"),
    [
        ("dns://8.8.8.8/localhost:9000", True),  # the authority names the resolver, not the destination
        ("dns://8.8.8.8:53/127.0.0.1:9000", True),
        ("dns:///localhost:9000", True),
        ("dns:localhost:9000", True),
        ("localhost", True),  # no port: grpc's default
        ("::1", True),  # a bare IPv6 address
        ("dns://127.0.0.1/10.20.30.40:9000", False),  # a local resolver does not make the host local
        ("dns:///10.20.30.40:9000", False),
        ("10.20.30.40", False),
        ("2001:db8::1", False),
    ],
)
def test_the_clear_text_warning_reads_the_host_the_call_goes_to(address: str, local: bool) -> None:
    """A ``dns://resolver/host:port`` target goes to ``host``: a loopback host is not warned about whatever
    resolver is named, and a remote one is warned about even with a loopback resolver."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _core.check_token("s3cret", address, secure=False) == "s3cret"
    said = [w for w in caught if issubclass(w.category, _core.PlaintextTokenWarning)]
    assert (not said) is local, f"{address}: {[str(w.message) for w in said]}"
