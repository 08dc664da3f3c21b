from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    DATA_TYPE_UINT8: _ClassVar[DataType]
    DATA_TYPE_FLOAT16: _ClassVar[DataType]
    DATA_TYPE_FLOAT32: _ClassVar[DataType]

class CacheTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CACHE_TIER_UNSPECIFIED: _ClassVar[CacheTier]
    CACHE_TIER_MISS: _ClassVar[CacheTier]
    CACHE_TIER_L1: _ClassVar[CacheTier]
    CACHE_TIER_L2: _ClassVar[CacheTier]
    CACHE_TIER_DISABLED: _ClassVar[CacheTier]
DATA_TYPE_UNSPECIFIED: DataType
DATA_TYPE_UINT8: DataType
DATA_TYPE_FLOAT16: DataType
DATA_TYPE_FLOAT32: DataType
CACHE_TIER_UNSPECIFIED: CacheTier
CACHE_TIER_MISS: CacheTier
CACHE_TIER_L1: CacheTier
CACHE_TIER_L2: CacheTier
CACHE_TIER_DISABLED: CacheTier

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "tensor", "content_hash")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    tensor: Tensor
    content_hash: str
    def __init__(self, encoded: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., content_hash: _Optional[str] = ...) -> None: ...

class Position(_message.Message):
    __slots__ = ("row", "col")
    ROW_FIELD_NUMBER: _ClassVar[int]
    COL_FIELD_NUMBER: _ClassVar[int]
    row: int
    col: int
    def __init__(self, row: _Optional[int] = ..., col: _Optional[int] = ...) -> None: ...

class CacheLookup(_message.Message):
    __slots__ = ("artifact", "tier")
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    artifact: str
    tier: CacheTier
    def __init__(self, artifact: _Optional[str] = ..., tier: _Optional[_Union[CacheTier, str]] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage", "seconds")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    seconds: float
    def __init__(self, stage: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class Provenance(_message.Message):
    __slots__ = ("model_id", "weights_digest", "method", "method_version", "preprocess_version", "content_hash", "cache", "timings", "server_version", "request_id")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    METHOD_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    weights_digest: str
    method: str
    method_version: str
    preprocess_version: str
    content_hash: str
    cache: _containers.RepeatedCompositeFieldContainer[CacheLookup]
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    server_version: str
    request_id: str
    def __init__(self, model_id: _Optional[str] = ..., weights_digest: _Optional[str] = ..., method: _Optional[str] = ..., method_version: _Optional[str] = ..., preprocess_version: _Optional[str] = ..., content_hash: _Optional[str] = ..., cache: _Optional[_Iterable[_Union[CacheLookup, _Mapping]]] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ..., server_version: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("index", "name", "probability", "logit")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    probability: float
    logit: float
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., probability: _Optional[float] = ..., logit: _Optional[float] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("model_id", "image", "target", "method", "contrast", "contrast_class", "map_dtype", "overlay", "return_input")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CONTRAST_FIELD_NUMBER: _ClassVar[int]
    CONTRAST_CLASS_FIELD_NUMBER: _ClassVar[int]
    MAP_DTYPE_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_FIELD_NUMBER: _ClassVar[int]
    RETURN_INPUT_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    image: Image
    target: int
    method: str
    contrast: str
    contrast_class: int
    map_dtype: DataType
    overlay: bool
    return_input: bool
    def __init__(self, model_id: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., target: _Optional[int] = ..., method: _Optional[str] = ..., contrast: _Optional[str] = ..., contrast_class: _Optional[int] = ..., map_dtype: _Optional[_Union[DataType, str]] = ..., overlay: _Optional[bool] = ..., return_input: _Optional[bool] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("map", "target", "overlay_png", "provenance", "model_input")
    MAP_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_INPUT_FIELD_NUMBER: _ClassVar[int]
    map: Tensor
    target: ClassScore
    overlay_png: bytes
    provenance: Provenance
    model_input: Tensor
    def __init__(self, map: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[ClassScore, _Mapping]] = ..., overlay_png: _Optional[bytes] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ..., model_input: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ComputeIERFRequest(_message.Message):
    __slots__ = ("model_id", "image", "layer", "positions", "map_dtype", "overlay", "return_input")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    MAP_DTYPE_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_FIELD_NUMBER: _ClassVar[int]
    RETURN_INPUT_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    image: Image
    layer: str
    positions: _containers.RepeatedCompositeFieldContainer[Position]
    map_dtype: DataType
    overlay: bool
    return_input: bool
    def __init__(self, model_id: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., layer: _Optional[str] = ..., positions: _Optional[_Iterable[_Union[Position, _Mapping]]] = ..., map_dtype: _Optional[_Union[DataType, str]] = ..., overlay: _Optional[bool] = ..., return_input: _Optional[bool] = ...) -> None: ...

class ComputeIERFResponse(_message.Message):
    __slots__ = ("maps", "layer", "overlay_png", "provenance", "model_input")
    MAPS_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_INPUT_FIELD_NUMBER: _ClassVar[int]
    maps: Tensor
    layer: LayerInfo
    overlay_png: _containers.RepeatedScalarFieldContainer[bytes]
    provenance: Provenance
    model_input: Tensor
    def __init__(self, maps: _Optional[_Union[Tensor, _Mapping]] = ..., layer: _Optional[_Union[LayerInfo, _Mapping]] = ..., overlay_png: _Optional[_Iterable[bytes]] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ..., model_input: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model_id", "image", "top_k")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    image: Image
    top_k: int
    def __init__(self, model_id: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., top_k: _Optional[int] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("top_classes", "provenance")
    TOP_CLASSES_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    top_classes: _containers.RepeatedCompositeFieldContainer[ClassScore]
    provenance: Provenance
    def __init__(self, top_classes: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model_id")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model_id: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model_id: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("height", "width", "channels", "color_space", "preprocess_version", "encodings", "tensor_dtypes", "max_image_bytes", "max_pixels", "max_side", "max_positions", "max_top_k", "max_message_bytes", "max_deadline_s")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    COLOR_SPACE_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_DTYPES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    channels: int
    color_space: str
    preprocess_version: str
    encodings: _containers.RepeatedScalarFieldContainer[str]
    tensor_dtypes: _containers.RepeatedScalarFieldContainer[DataType]
    max_image_bytes: int
    max_pixels: int
    max_side: int
    max_positions: int
    max_top_k: int
    max_message_bytes: int
    max_deadline_s: float
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ..., color_space: _Optional[str] = ..., preprocess_version: _Optional[str] = ..., encodings: _Optional[_Iterable[str]] = ..., tensor_dtypes: _Optional[_Iterable[_Union[DataType, str]]] = ..., max_image_bytes: _Optional[int] = ..., max_pixels: _Optional[int] = ..., max_side: _Optional[int] = ..., max_positions: _Optional[int] = ..., max_top_k: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_deadline_s: _Optional[float] = ...) -> None: ...

class LayerInfo(_message.Message):
    __slots__ = ("name", "channels", "height", "width")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    channels: int
    height: int
    width: int
    def __init__(self, name: _Optional[str] = ..., channels: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("id", "weights_digest", "input", "num_classes", "class_names", "layers", "methods", "default_method")
    ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_METHOD_FIELD_NUMBER: _ClassVar[int]
    id: str
    weights_digest: str
    input: InputSpec
    num_classes: int
    class_names: _containers.RepeatedScalarFieldContainer[str]
    layers: _containers.RepeatedCompositeFieldContainer[LayerInfo]
    methods: _containers.RepeatedScalarFieldContainer[str]
    default_method: str
    def __init__(self, id: _Optional[str] = ..., weights_digest: _Optional[str] = ..., input: _Optional[_Union[InputSpec, _Mapping]] = ..., num_classes: _Optional[int] = ..., class_names: _Optional[_Iterable[str]] = ..., layers: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ..., methods: _Optional[_Iterable[str]] = ..., default_method: _Optional[str] = ...) -> None: ...
