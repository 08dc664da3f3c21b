"""Protobuf <-> domain conversions for the ingress (the only module that touches generated classes).

Kept apart from the deployment classes so no protobuf descriptor is ever captured in a pickled
deployment (ray#47347), and so request validation is testable without Ray.
"""

from __future__ import annotations

import numpy as np
from ierf_proto.v1 import explainer_pb2 as pb

from ierf.serving.errors import InvalidArgument
from ierf.serving.images import CanonicalImage, ImageLimits, PendingImage, open_encoded, open_tensor
from ierf.serving.jobs import LayerShape, ModelDescription, Outcome, Provenance, Score, grpc_message_cap
from ierf.serving.settings import IngressConfig

_DTYPE_NAMES = {pb.DATA_TYPE_UINT8: "uint8", pb.DATA_TYPE_FLOAT16: "float16", pb.DATA_TYPE_FLOAT32: "float32"}
_MAP_DTYPES = {pb.DATA_TYPE_UNSPECIFIED: np.float32, pb.DATA_TYPE_FLOAT32: np.float32, pb.DATA_TYPE_FLOAT16: np.float16}
_CACHE_TIERS = {
    "miss": pb.CACHE_TIER_MISS,
    "l1": pb.CACHE_TIER_L1,
    "l2": pb.CACHE_TIER_L2,
    "disabled": pb.CACHE_TIER_DISABLED,
}


def decode_image(image: pb.Image, limits: ImageLimits) -> CanonicalImage:
    """Request image (encoded bytes or raw tensor) -> canonical uint8 RGB + content hash."""
    return open_image(image, limits).decode()


def open_image(image: pb.Image, limits: ImageLimits) -> PendingImage:
    """Request image checked up to its header (caps, structure, dimensions); pixels decoded later."""
    source = image.WhichOneof("source")
    if source is None:
        raise InvalidArgument("image is empty: set image.encoded (PNG/JPEG/WebP bytes) or image.tensor")
    if source == "encoded":
        return open_encoded(image.encoded, limits)
    tensor = image.tensor
    dtype = _DTYPE_NAMES.get(tensor.dtype)
    if dtype is None:
        name = pb.DataType.Name(tensor.dtype) if tensor.dtype in pb.DataType.values() else str(tensor.dtype)
        raise InvalidArgument(
            f"image.tensor.dtype {name} is not accepted; use DATA_TYPE_UINT8, DATA_TYPE_FLOAT16 or DATA_TYPE_FLOAT32"
        )
    return open_tensor(tensor.data, dtype, tensor.shape, limits)  # not list(): its length is checked first


def map_dtype(value: int) -> type:
    try:
        return _MAP_DTYPES[value]
    except KeyError:
        name = pb.DataType.Name(value) if value in pb.DataType.values() else str(value)
        raise InvalidArgument(f"map_dtype {name} is not accepted; use DATA_TYPE_FLOAT32 or DATA_TYPE_FLOAT16") from None


def tensor_message(array: np.ndarray, dtype: type) -> pb.Tensor:
    data = np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<"))
    return pb.Tensor(
        data=data.tobytes(),
        dtype=pb.DATA_TYPE_FLOAT16 if dtype == np.float16 else pb.DATA_TYPE_FLOAT32,
        shape=list(array.shape),
    )


def input_message(view: np.ndarray) -> pb.Tensor:
    view = np.ascontiguousarray(view, dtype=np.uint8)
    return pb.Tensor(data=view.tobytes(), dtype=pb.DATA_TYPE_UINT8, shape=list(view.shape))


def score_message(score: Score) -> pb.ClassScore:
    return pb.ClassScore(index=score.index, name=score.name, probability=score.probability, logit=score.logit)


def provenance_message(
    prov: Provenance, extra_timings: list[tuple[str, float]], request_id: str, server_version: str
) -> pb.Provenance:
    return pb.Provenance(
        model_id=prov.model_id,
        weights_digest=prov.weights_digest,
        method=prov.method,
        method_version=prov.method_version,
        preprocess_version=prov.preprocess_version,
        content_hash=prov.content_hash,
        cache=[pb.CacheLookup(artifact=a, tier=_CACHE_TIERS.get(t, pb.CACHE_TIER_UNSPECIFIED)) for a, t in prov.cache],
        timings=[pb.StageTiming(stage=s, seconds=v) for s, v in _sum_by_stage([*prov.timings, *extra_timings])],
        server_version=server_version,
        request_id=request_id,
    )


#: The order a request meets its stages in: the ingress decodes, hands the job over (dispatch), the job
#: waits for the worker's compute thread (queue) and runs; the ingress encodes the response.
STAGE_ORDER = (
    "admission",
    "decode",
    "dispatch",
    "queue",
    "cache_get",
    "preprocess",
    "forward",
    "cache_put",
    "explain",
    "render",
    "encode",
)


def _sum_by_stage(timings: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """One entry per stage, in STAGE_ORDER (others after, then "total"): a caller reads timings as a
    mapping, and a stage can run more than once in a request (the worker's "preprocess" times the crop
    and the normalisation)."""
    totals: dict[str, float] = {}
    for stage, seconds in timings:
        totals[stage] = totals.get(stage, 0.0) + seconds
    rank = {stage: i for i, stage in enumerate(STAGE_ORDER)} | {"total": len(STAGE_ORDER) + 1}  # others between
    return sorted(totals.items(), key=lambda item: rank.get(item[0], len(STAGE_ORDER)))


def layer_message(layer: LayerShape) -> pb.LayerInfo:
    return pb.LayerInfo(name=layer.name, channels=layer.channels, height=layer.height, width=layer.width)


def positions_array(positions: list[pb.Position]) -> np.ndarray:
    return np.array([[p.row, p.col] for p in positions], dtype=np.int64).reshape(-1, 2)


def model_message(desc: ModelDescription, ingress: IngressConfig) -> pb.ModelInfo:
    """A model's description with the limits a request to it meets (so a caller finds them here rather
    than by hitting them)."""
    dtype_codes = {"uint8": pb.DATA_TYPE_UINT8, "float16": pb.DATA_TYPE_FLOAT16, "float32": pb.DATA_TYPE_FLOAT32}
    return pb.ModelInfo(
        id=desc.id,
        weights_digest=desc.weights_digest,
        input=pb.InputSpec(
            height=desc.input_height,
            width=desc.input_width,
            channels=3,
            color_space="RGB",
            preprocess_version=desc.preprocess_version,
            encodings=list(desc.encodings),
            tensor_dtypes=[dtype_codes[d] for d in desc.tensor_dtypes],
            max_image_bytes=ingress.max_image_bytes,
            max_pixels=ingress.max_pixels,
            max_side=ingress.max_side,
            max_positions=ingress.max_positions,
            max_top_k=ingress.max_top_k,
            max_message_bytes=grpc_message_cap() or 0,
            max_deadline_s=ingress.request_timeout_s,
        ),
        num_classes=len(desc.class_names),
        class_names=desc.class_names,
        layers=[layer_message(layer) for layer in desc.layers],
        methods=desc.methods,
        default_method=desc.default_method,
    )


def outcome_maps(outcome: Outcome) -> np.ndarray:
    if outcome.maps is None:
        raise RuntimeError("worker returned no maps")
    return outcome.maps
