"""SDK details a service integrating it relies on: flags checked as flags, every status a gateway answers typed,
and the default model named by ListModels kept. A small real gRPC server on loopback, no Ray, no torch."""

from __future__ import annotations

from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
from ierf_client import Client, ModelList, PermissionDeniedError, RetryPolicy, UnimplementedError
from ierf_proto.v1 import explainer_pb2 as pb
from ierf_proto.v1 import explainer_pb2_grpc as pb_grpc


class _Gateway(pb_grpc.ExplainServiceServicer):
    """ListModels answers two models and names the second the default; Predict is refused as a gateway does."""

    def ListModels(self, request: Any, context: Any) -> Any:
        return pb.ListModelsResponse(models=[pb.ModelInfo(id="a"), pb.ModelInfo(id="b")], default_model_id="b")

    def Predict(self, request: Any, context: Any) -> Any:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "token lacks the predict scope")


@pytest.fixture
def address() -> Any:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ExplainServiceServicer_to_server(_Gateway(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def test_models_keeps_the_servers_default_model(address: str) -> None:
    """ListModels says which model a call naming none gets (default_model_id); models() dropped it, so a
    caller could not tell which of the listed models answered its calls."""
    with Client(address, timeout=5) as client:
        models = client.models()
    assert isinstance(models, ModelList) and isinstance(models, list)
    assert [m.id for m in models] == ["a", "b"] and models.default_model_id == "b"


def test_a_gateways_permission_refusal_and_an_unknown_rpc_are_typed(address: str) -> None:
    """UNAUTHENTICATED had its class but PERMISSION_DENIED (a gateway refusing a valid token's rights) and
    UNIMPLEMENTED (an older server) came back as the bare IerfError."""
    pixels = np.zeros((8, 8, 3), np.uint8)
    with Client(address, timeout=5, retry=RetryPolicy(max_attempts=1)) as client:
        with pytest.raises(PermissionDeniedError, match="predict scope") as refused:
            client.predict(pixels)
        assert isinstance(refused.value, PermissionError)
        with pytest.raises(UnimplementedError) as missing:
            client.explain(pixels)
        assert isinstance(missing.value, NotImplementedError)


@pytest.mark.parametrize("flag", ["overlay", "return_input"])
@pytest.mark.parametrize("value", ["no", None, 1])
def test_flags_must_be_booleans(flag: str, value: object) -> None:
    """overlay="no" raised protobuf's bare "'str' object cannot be interpreted as an integer" naming no
    argument, and overlay=None was silently False: a flag is True or False, checked before any call."""
    pixels = np.zeros((8, 8, 3), np.uint8)
    with Client("127.0.0.1:1", timeout=1, retry=RetryPolicy(max_attempts=1)) as client:
        with pytest.raises(TypeError, match=rf"{flag} must be True or False"):
            client.explain(pixels, **{flag: value})
        with pytest.raises(TypeError, match=rf"{flag} must be True or False"):
            client.ierf(pixels, "layer1", [(0, 0)], **{flag: value})


def test_the_cli_marks_the_servers_default_model(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`ierf --server ADDR models` listed the models with nothing saying which one a call naming none gets."""
    from ierf.cli import main

    assert main(["--server", address, "models"]) == 0
    rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines()[1:]]
    assert [row[0] for row in rows] == ["a", "b"] and rows[1][1] == "(default)" and rows[0][1] != "(default)"
