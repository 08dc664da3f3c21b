"""The SDK sends a repeat of an image by its content hash (``Image.content_hash``) and the pixels when refused.

A loopback gRPC server plays the service's side of the protocol as the ingress implements it (tested on its own in
test_image_references.py, and end to end in test_integration.py): it answers an image named by a hash it holds,
refuses one it does not hold with FAILED_PRECONDITION, and (playing an older server) can take no references at all.
No Ray, no torch.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from ierf_client import AsyncClient, Client, NotFoundError
from ierf_proto.v1 import explainer_pb2 as pb
from ierf_proto.v1 import explainer_pb2_grpc as pb_grpc

from serving.test_round27_mutants import _serving

PHOTO = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
OTHER = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)


class _Service(pb_grpc.ExplainServiceServicer):
    """Holds the images it was sent (unless ``keeps`` is off); records how each request named its image."""

    def __init__(self, takes_references: bool = True, keeps: bool = True, refusal_s: float = 0.0) -> None:
        self.takes_references, self.keeps, self.refusal_s = takes_references, keeps, refusal_s
        self.pixels_s = 0.0  # how long a request with pixels takes
        self.held: set[str] = set()
        self.sent: list[str] = []  # "pixels" or "reference" per request
        self.lock = threading.Lock()

    def _image(self, request: Any, context: Any) -> str:
        source = request.image.WhichOneof("source")
        with self.lock:
            self.sent.append("reference" if source == "content_hash" else "pixels")
        if source == "content_hash" and not self.takes_references:  # as a server without field 3 sees it
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "image is empty: set image.encoded or image.tensor")
        if source == "content_hash":
            if request.image.content_hash not in self.held:
                time.sleep(self.refusal_s)
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "image … is not held: send its pixels")
            return request.image.content_hash
        time.sleep(self.pixels_s)
        content_hash = hashlib.sha256(request.image.SerializeToString()).hexdigest()
        self.held.add(content_hash)
        return content_hash

    def _provenance(self, content_hash: str, model: str) -> pb.Provenance:
        tier = pb.CACHE_TIER_MISS if self.keeps else pb.CACHE_TIER_DISABLED
        return pb.Provenance(
            model_id=model or "m", content_hash=content_hash, cache=[pb.CacheLookup(artifact="d", tier=tier)]
        )

    def Explain(self, request: Any, context: Any) -> Any:
        content_hash = self._image(request, context)
        saliency = np.full((2, 2), request.target, np.float32)
        return pb.ExplainResponse(
            map=pb.Tensor(data=saliency.tobytes(), dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 2]),
            target=pb.ClassScore(index=request.target),
            provenance=self._provenance(content_hash, request.model_id),
        )

    def ComputeIERF(self, request: Any, context: Any) -> Any:
        content_hash = self._image(request, context)
        maps = np.full((len(request.positions), 2, 2), 0.25, np.float32)
        return pb.ComputeIERFResponse(
            maps=pb.Tensor(data=maps.tobytes(), dtype=pb.DATA_TYPE_FLOAT32, shape=list(maps.shape)),
            layer=pb.LayerInfo(name=request.layer),
            provenance=self._provenance(content_hash, request.model_id),
        )

    def Predict(self, request: Any, context: Any) -> Any:
        content_hash = self._image(request, context)
        return pb.PredictResponse(
            top_classes=[pb.ClassScore(index=7)], provenance=self._provenance(content_hash, request.model_id)
        )


Step = tuple[str, tuple, dict] | Callable[[], None]


def _session(flavour: str, address: str, steps: list[Step], **client_kwargs: Any) -> list[Any]:
    """The results of ``steps`` made in order on one Client (or AsyncClient): calls (method, args, kwargs), and
    actions between them (a function, run on the caller's side; its result is None)."""
    options = {"timeout": 10.0, **client_kwargs}
    if flavour == "sync":
        with Client(address, **options) as client:
            return [step() if callable(step) else getattr(client, step[0])(*step[1], **step[2]) for step in steps]

    async def run() -> list[Any]:
        async with AsyncClient(address, **options) as client:
            return [step() if callable(step) else await getattr(client, step[0])(*step[1], **step[2]) for step in steps]

    return asyncio.run(run())


def _explain(image: Any, target: int, **kwargs: Any) -> tuple[str, tuple, dict]:
    return ("explain", (image, target), {"overlay": False, **kwargs})


FLAVOURS = pytest.mark.parametrize("flavour", ["sync", "asyncio"])


@FLAVOURS
def test_a_repeat_goes_by_content_hash_and_gets_its_own_answer(flavour: str) -> None:
    service = _Service()
    with _serving(service) as address:
        results = _session(
            flavour,
            address,
            [
                _explain(PHOTO, 1),
                _explain(PHOTO, 2),
                ("ierf", (PHOTO, "layer", [(0, 0), (1, 1)]), {}),
                ("predict", (PHOTO,), {}),
                _explain(OTHER, 3),
            ],
        )
    assert service.sent == ["pixels", "reference", "reference", "reference", "pixels"]
    assert results[1].target.index == 2 and float(results[1].map[0, 0]) == 2.0
    assert results[2].maps.shape == (2, 2, 2) and results[3].top_classes[0].index == 7
    assert results[1].provenance.content_hash == results[0].provenance.content_hash


@FLAVOURS
def test_a_reference_the_service_no_longer_holds_is_sent_again_with_the_pixels(flavour: str) -> None:
    service = _Service()
    with _serving(service) as address:
        steps = [_explain(PHOTO, 1), service.held.clear, _explain(PHOTO, 2), _explain(PHOTO, 3)]  # evicted
        _, _, again, third = _session(flavour, address, steps)
    assert service.sent == ["pixels", "reference", "pixels", "reference"]
    assert again.target.index == 2 and third.target.index == 3


@FLAVOURS
def test_an_older_server_that_takes_no_references_still_answers_every_repeat(flavour: str) -> None:
    service = _Service(takes_references=False)
    with _serving(service) as address:
        results = _session(flavour, address, [_explain(PHOTO, 1), _explain(PHOTO, 2), _explain(PHOTO, 3)])
    assert [r.target.index for r in results] == [1, 2, 3]
    assert service.sent == ["pixels", "reference", "pixels", "reference", "pixels"]  # forgotten after each refusal


@FLAVOURS
def test_requests_that_read_the_view_go_by_reference_too(flavour: str) -> None:
    """The service keeps the model's view of each image: overlays (``explain``'s default), the returned input
    and other methods are answered by reference like the rest."""
    service = _Service()
    with _serving(service) as address:
        _session(
            flavour,
            address,
            [
                ("explain", (PHOTO, 1), {}),  # the SDK's default overlay=True
                _explain(PHOTO, 2, return_input=True),
                _explain(PHOTO, 2, method="gradient"),
                ("ierf", (PHOTO, "layer", [(0, 0)]), {"overlay": True}),
                ("explain", (PHOTO, 4), {}),
            ],
        )
    assert service.sent == ["pixels"] + ["reference"] * 4


@FLAVOURS
def test_an_image_kept_in_no_tier_another_model_or_remembering_off_send_the_pixels(flavour: str) -> None:
    kept_nowhere = _Service(keeps=False)
    with _serving(kept_nowhere) as address:
        _session(flavour, address, [_explain(PHOTO, 1), _explain(PHOTO, 2)])
    assert kept_nowhere.sent == ["pixels", "pixels"]

    service = _Service()
    with _serving(service) as address:
        _session(flavour, address, [_explain(PHOTO, 1), _explain(PHOTO, 1, model="other")])
        _session(flavour, address, [_explain(PHOTO, 1), _explain(PHOTO, 2)], remembered_images=0)
    assert service.sent == ["pixels"] * 4


@FLAVOURS
def test_other_refusals_of_a_reference_are_the_callers_answer(flavour: str) -> None:
    """Only "not held" (FAILED_PRECONDITION) and "no references here" (INVALID_ARGUMENT) send the pixels: a
    NOT_FOUND for the model reaches the caller after one attempt."""

    class Gone(_Service):
        def Predict(self, request: Any, context: Any) -> Any:
            if request.image.WhichOneof("source") == "content_hash":
                self.sent.append("reference")
                context.abort(grpc.StatusCode.NOT_FOUND, "unknown model 'm'")
            return super().Predict(request, context)

    service = Gone()
    with _serving(service) as address, pytest.raises(NotFoundError, match="unknown model"):
        _session(flavour, address, [("predict", (PHOTO,), {}), ("predict", (PHOTO,), {})])
    assert service.sent == ["pixels", "reference"]


@FLAVOURS
def test_the_resend_shares_the_calls_deadline(flavour: str) -> None:
    """The refusal of the reference takes 0.6 s of a 0.9 s budget and the pixels take 0.5 s more: the call
    fails at its deadline instead of sending the pixels with a fresh budget (1.1 s in all)."""
    from ierf_client import DeadlineExceededError

    service = _Service(refusal_s=0.6)
    with _serving(service) as address:

        def slow_and_forgotten() -> None:
            service.held.clear()
            service.pixels_s = 0.5

        with pytest.raises(DeadlineExceededError):
            if flavour == "sync":
                with Client(address, timeout=10) as client:
                    client.explain(PHOTO, 1, overlay=False)
                    slow_and_forgotten()
                    start = time.monotonic()
                    client.explain(PHOTO, 2, overlay=False, timeout=0.9)
            else:

                async def run() -> None:
                    async with AsyncClient(address, timeout=10) as client:
                        await client.explain(PHOTO, 1, overlay=False)
                        slow_and_forgotten()
                        await client.explain(PHOTO, 2, overlay=False, timeout=0.9)

                start = time.monotonic()
                asyncio.run(run())
        assert time.monotonic() - start < 1.05
    assert service.sent == ["pixels", "reference", "pixels"]


def test_the_memory_is_bounded_and_least_recently_used_goes_first() -> None:
    service = _Service()
    images = [np.full((8, 8, 3), i, np.uint8) for i in range(3)]
    with _serving(service) as address, Client(address, timeout=10, remembered_images=2) as client:
        for i in (0, 1, 0, 2):  # 1 is the least recently used when 2 arrives
            client.predict(images[i])
        assert len(client._references) == 2
        client.predict(images[1])  # forgotten: pixels
        client.predict(images[2])  # remembered: reference
    assert service.sent == ["pixels", "pixels", "reference", "pixels", "pixels", "reference"]


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [(-1, ValueError, "between 0 and 1000000"), (10**7, ValueError, "between"), (2.0, TypeError, "an int"),
     (True, TypeError, "an int"), ("8", TypeError, "an int")],
)  # fmt: skip
def test_remembered_images_is_checked(value: object, error: type, message: str) -> None:
    for cls in (Client, AsyncClient):
        with pytest.raises(error, match=message):
            cls("127.0.0.1:1", remembered_images=value)


def test_the_async_client_hashes_a_large_image_off_its_loop_and_still_refers_to_it() -> None:
    """Over 1 MiB the request's image is hashed in a thread (as it is built), so the loop keeps running."""
    import ierf_client._core as core

    large = np.random.default_rng(2).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    assert large.nbytes > core.INLINE_ARRAY_BYTES
    service = _Service()
    threads: list[str] = []
    key = core.ImageReferences.key

    def recording_key(self: Any, request: Any) -> Any:
        threads.append(threading.current_thread().name)
        return key(self, request)

    with _serving(service) as address, pytest.MonkeyPatch.context() as patch:
        patch.setattr(core.ImageReferences, "key", recording_key)
        results = _session("asyncio", address, [_explain(large, 1), _explain(large, 2), _explain(PHOTO, 3)])
    assert service.sent == ["pixels", "reference", "pixels"] and results[1].target.index == 2
    main = threading.main_thread().name
    assert threads[0] != main and threads[1] != main and threads[2] == main


def test_the_key_tells_apart_what_could_decode_differently() -> None:
    """The key hashes the image's fields (serialising the message copied a 20 MB image first): the same bytes as
    a file or as a tensor, as a tensor of another shape or dtype, or for another model are other images."""
    from ierf_client._core import ImageReferences

    references = ImageReferences(8)
    data = bytes(range(48))

    def tensor(shape: list[int], dtype: int = pb.DATA_TYPE_UINT8, model: str = "") -> Any:
        return pb.PredictRequest(model_id=model, image=pb.Image(tensor=pb.Tensor(data=data, dtype=dtype, shape=shape)))

    keys = [
        references.key(tensor([4, 4, 3])),
        references.key(tensor([4, 12])),
        references.key(tensor([4, 4, 3], pb.DATA_TYPE_FLOAT16)),
        references.key(tensor([4, 4, 3], model="m")),
        references.key(pb.PredictRequest(image=pb.Image(encoded=data))),
        references.key(pb.PredictRequest(model_id="m", image=pb.Image(encoded=data))),
    ]
    assert len(set(keys)) == len(keys)
    assert references.key(tensor([4, 4, 3])) == keys[0]  # and the same request, the same key
    assert references.key(pb.PredictRequest(image=pb.Image(content_hash="0" * 64))) is None
