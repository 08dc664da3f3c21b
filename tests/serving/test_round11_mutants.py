"""Round 11's behaviours at the edges its first tests left open (each test kills a mutant that survived them):
the Prometheus rule's namespace pin, the corrupt-value alert and panel, the cache header's tensor bound, the
Redis URL redaction, the SDK's response checks, the plaintext-token warning, the proxy's status codes, the
CLI's WebP sniffing and the overlay loop's deadline. Fast, deterministic, no GPU, no cluster."""

from __future__ import annotations

import asyncio
import json
import struct
import time
import warnings
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from ierf_client import _core
from ierf_proto.v1 import explainer_pb2 as pb
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"


# ------------------------------------------------------------------------------------------ deploy


def test_the_exporter_rule_pins_prometheus_namespace_not_only_a_pod_label() -> None:
    """The exporter's 9121 admits Prometheus's pods by ``kubernetes.io/metadata.name`` as well as their label:
    ``namespaceSelector: {}`` plus ``app.kubernetes.io/name: prometheus`` admits any pod anyone labels so."""
    (policy,) = [
        d
        for d in yaml.safe_load_all((K8S / "networkpolicy.yaml").read_text())
        if d and d["metadata"]["name"] == "ierf-redis"
    ]
    exporter = [r for r in policy["spec"]["ingress"] if 9121 in {p["port"] for p in r.get("ports", [])}]
    assert exporter
    for rule in exporter:
        assert rule.get("from")
        for peer in rule["from"]:
            pinned = (peer.get("namespaceSelector") or {}).get("matchLabels", {})
            assert "kubernetes.io/metadata.name" in pinned, f"9121 admits a pod label from any namespace: {peer}"


def test_the_corrupt_value_alert_and_panel_select_result_corrupt_and_not_an_outage() -> None:
    """IerfCacheCorrupt is for values that fail their checks (result="corrupt"), not for Redis errors (its
    own alert), and the dashboard's Redis-trouble panel shows the corrupt series."""
    from serving.test_alert_coverage import _alert, _selected

    expr = _alert("IerfCacheCorrupt")
    series = "ray_explainer_cache_requests_total"
    corrupt = {"tier": "l2", "op": "get", "result": "corrupt"}
    assert _selected(expr, series, corrupt)
    assert not _selected(expr, series, {**corrupt, "result": "error"})

    dashboard = json.loads((ROOT / "deploy" / "grafana" / "ierf-service.json").read_text())
    panels = [*dashboard["panels"], *(q for p in dashboard["panels"] for q in p.get("panels", []))]  # rows nest
    exprs = [
        t["expr"].replace("$namespace", ".*")
        for p in panels
        for t in p.get("targets", [])
        if "result=~" in t.get("expr", "")
    ]
    redis_trouble = [e for e in exprs if _selected(e, series, {**corrupt, "result": "error"})]
    assert redis_trouble, "no panel shows the Redis errors"
    assert any(_selected(e, series, corrupt) for e in redis_trouble), "the Redis-trouble panel hides corrupt values"


# ------------------------------------------------------------------------------------------ cache


def test_a_header_one_tensor_past_the_bound_is_refused_and_one_at_it_is_not() -> None:
    from ierf.serving.cache import MAX_TENSORS, CodecError, decode_tensors

    from serving.test_security_cache import _many_tensor_value

    assert len(decode_tensors("k", _many_tensor_value("k", MAX_TENSORS))) == MAX_TENSORS
    with pytest.raises(CodecError, match=f"{MAX_TENSORS + 1} tensors"):
        decode_tensors("k", _many_tensor_value("k", MAX_TENSORS + 1))


def test_a_deeply_nested_header_is_a_codec_error() -> None:
    """JSON nested past Python's recursion limit raises RecursionError, not JSONDecodeError."""
    from ierf.serving.cache import CodecError, decode_tensors

    text = b"[" * 200_000
    with pytest.raises(CodecError, match="not JSON"):
        decode_tensors("k", struct.pack("<Q", len(text)) + text)


# ------------------------------------------------------------------------------------------ settings


def test_a_password_holding_at_is_redacted_up_to_the_last_at() -> None:
    """``redis://:abcd@wxyz1234@host`` parses (the parser splits at the last @): the whole of
    ``abcd@wxyz1234`` is the password and none of it may be shown."""
    from ierf.serving.settings import check_redis_url

    with pytest.raises(ValueError) as refused:
        check_redis_url("redis://:abcd@wxyz1234@ierf-redis:6379/x", "redis_url")
    message = str(refused.value)
    assert "ierf-redis" in message and "wxyz1234" not in message and "abcd" not in message, message


def test_redis_pys_reason_quoting_the_start_of_a_password_is_withheld() -> None:
    """redis-py says "Port could not be cast to integer value as 's3cretpart'" for ``:s3cretpart/rest@``."""
    from ierf.serving.settings import check_redis_url

    with pytest.raises(ValueError) as refused:
        check_redis_url("redis://:s3cretpart/rest@ierf-redis:6379/0", "redis_url")
    assert "s3cretpart" not in str(refused.value) and "rest" not in str(refused.value), str(refused.value)


# ------------------------------------------------------------------------------------------ SDK responses


def _png(width: int, height: int) -> bytes:
    from serving.test_security_sdk import _png_of_zeros

    return _png_of_zeros(width, height)


def _map(shape: tuple[int, ...] = (224, 224), extra: bytes = b"") -> pb.Tensor:
    return pb.Tensor(data=np.zeros(shape, np.float32).tobytes() + extra, dtype=pb.DATA_TYPE_FLOAT32, shape=list(shape))


def test_a_map_with_bytes_beyond_its_shape_is_data_loss() -> None:
    with pytest.raises(_core.DataLossError, match="response field map"):
        _core.parse_explanation(pb.ExplainResponse(map=_map(extra=b"\0\0\0\0")))


def test_a_model_input_that_is_not_rgb_is_data_loss() -> None:
    rgba = pb.Tensor(data=b"\0" * 16, dtype=pb.DATA_TYPE_UINT8, shape=[2, 2, 4])
    with pytest.raises(_core.DataLossError, match="model_input"):
        _core.parse_explanation(pb.ExplainResponse(map=_map(), model_input=rgba))
    rgb = pb.Tensor(data=b"\0" * 12, dtype=pb.DATA_TYPE_UINT8, shape=[2, 2, 3])
    assert _core.parse_explanation(pb.ExplainResponse(map=_map(), model_input=rgb)).model_input.shape == (2, 2, 3)


@pytest.mark.parametrize("size", [(224, 2000), (2000, 224)], ids=["too-tall", "too-wide"])
def test_an_overlay_too_large_in_one_dimension_is_refused(size: tuple[int, int]) -> None:
    result = _core.parse_explanation(pb.ExplainResponse(map=_map(), overlay_png=_png(*size)))
    with pytest.raises(_core.DataLossError, match=f"{size[0]}x{size[1]}"):
        result.overlay()


def test_an_ierf_overlay_is_bounded_by_its_maps_size() -> None:
    response = pb.ComputeIERFResponse(maps=_map((2, 224, 224)), overlay_png=[_png(224, 276), _png(4000, 4000)])
    result = _core.parse_ierf(response)
    assert result.overlay(0).size == (224, 276)
    with pytest.raises(_core.DataLossError, match="4000x4000"):
        result.overlay(1)


def test_a_truncated_overlay_png_is_data_loss() -> None:
    png = _png(224, 276)
    result = _core.parse_explanation(pb.ExplainResponse(map=_map(), overlay_png=png[: len(png) // 2]))
    with pytest.raises(_core.DataLossError, match="does not decode"):
        result.overlay()


class _RpcError(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DATA_LOSS

    def details(self) -> str:
        return "the stored map is damaged"

    def trailing_metadata(self) -> tuple:
        return ()


def test_a_servers_data_loss_status_is_a_data_loss_error() -> None:
    error = _core.error_from_rpc(_RpcError())
    assert isinstance(error, _core.DataLossError) and "damaged" in str(error)


# ------------------------------------------------------------------------------------------ SDK token warning


@pytest.mark.parametrize(
    "address", ["127.0.0.1:9000", "127.0.0.2:9000", "localhost:9000", "[::1]:9000", "unix:/tmp/ierf.sock"]
)
def test_no_plaintext_warning_for_a_token_that_stays_on_this_machine(address: str) -> None:
    from ierf_client import Client

    with warnings.catch_warnings():
        warnings.simplefilter("error", _core.PlaintextTokenWarning)
        Client(address, token="s3cret-token").close()


def test_no_plaintext_warning_with_tls_credentials() -> None:
    from ierf_client import Client

    with warnings.catch_warnings():
        warnings.simplefilter("error", _core.PlaintextTokenWarning)
        Client("10.20.30.40:9000", token="s3cret-token", credentials=grpc.ssl_channel_credentials()).close()


def test_the_async_client_warns_of_a_plaintext_token_to_a_remote_host() -> None:
    from ierf_client import AsyncClient

    async def make() -> None:
        await AsyncClient("10.20.30.40:9000", token="s3cret-token").close()

    with pytest.warns(_core.PlaintextTokenWarning, match="clear text"):
        asyncio.run(make())


# ------------------------------------------------------------------------------------------ serving


def test_the_proxys_status_code_is_read_as_an_integer_too() -> None:
    from ierf.serving.protocol import _status_code

    assert _status_code(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _status_code(0) == grpc.StatusCode.OK
    assert _status_code(grpc.StatusCode.NOT_FOUND) == grpc.StatusCode.NOT_FOUND
    assert _status_code(None) is None


def test_server_mode_uploads_a_webp_files_own_bytes(tmp_path: Path) -> None:
    """WebP is told by bytes 8-12 (RIFF....WEBP): sniffing fewer re-encodes it as a PNG, decoded here."""
    from ierf.cli import ExplainRequest
    from ierf.serving.remote_backend import _upload

    path = tmp_path / "photo.webp"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(path, format="WEBP")
    assert _upload(ExplainRequest(image=None, path=str(path))) == path.read_bytes()


def test_a_deadline_passing_while_overlays_render_stops_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each overlay checks the deadline itself (as well as being a checkpoint): a host used outside the
    replica's ``interruptible`` (no checkpoint checks) still stops rendering for a caller out of time."""
    import ierf.serving.overlay as overlay
    from ierf.serving.errors import DeadlineExceeded
    from ierf.serving.worker import IERFJob

    from serving.test_worker_warm_up import HASH, PIXELS, _host

    host = _host()
    layer = host.description.layers[-1]
    positions = np.array([[r % layer.height, r % layer.width] for r in range(6)])
    job = IERFJob(PIXELS, HASH, layer=layer.name, positions=positions, overlay=True)
    real = overlay.ierf_png
    rendered: list[int] = []

    def ierf_png(*args: object, **kwargs: object) -> bytes:
        rendered.append(1)
        if len(rendered) == 2:
            job.deadline = time.time() - 1.0  # the caller's time runs out during the second overlay
        return real(*args, **kwargs)

    monkeypatch.setattr(overlay, "ierf_png", ierf_png)
    with pytest.raises(DeadlineExceeded, match="rendering the overlays"):
        host.ierf(job)
    assert len(rendered) == 2
