"""Python SDK for the ierf gRPC service (``ierf.v1.ExplainService``).

    from ierf_client import Client
    client = Client("127.0.0.1:9000", timeout=60)
    result = client.explain("photo.jpg")          # result.map, result.target, result.overlay()

Needs only grpcio, protobuf, numpy and pillow; the generated stubs ship as ``ierf_proto.v1``.
"""

from ierf_client._core import (
    ClassScore,
    DataLossError,
    DeadlineExceededError,
    Explanation,
    IerfError,
    IERFResult,
    InputSpec,
    InvalidArgumentError,
    LayerInfo,
    ModelInfo,
    ModelList,
    NotFoundError,
    PermissionDeniedError,
    PlaintextTokenWarning,
    Prediction,
    Provenance,
    ResourceExhaustedError,
    RetryPolicy,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from ierf_client.aio import AsyncClient
from ierf_client.client import Client

__all__ = [
    "AsyncClient",
    "ClassScore",
    "Client",
    "DataLossError",
    "DeadlineExceededError",
    "Explanation",
    "IERFResult",
    "IerfError",
    "InputSpec",
    "InvalidArgumentError",
    "LayerInfo",
    "ModelInfo",
    "ModelList",
    "NotFoundError",
    "PermissionDeniedError",
    "PlaintextTokenWarning",
    "Prediction",
    "Provenance",
    "ResourceExhaustedError",
    "RetryPolicy",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
]
__version__ = "0.1.0"
