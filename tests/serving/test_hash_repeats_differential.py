"""A seeded differential run: an ingress that sends repeats by content hash against one that always sends the
pixels, each over its own real ModelHost (randomly initialised ResNet18, no Redis), fed the same requests with
the workers' L1 cleared now and then.

Every answer must agree field by field (maps' bytes, target, top classes, layer, overlay, the model's input, or
the refusal's type and message); the stages must sum below the total; and each job must take the hops its kind
promises: by hash alone exactly when the ingress remembers the image (any kind of job, since the workers keep
the model's view), refused and sent again exactly when the worker's L1 lacks what the job reads.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import numpy as np
import pytest

from serving.test_repeats_by_hash import _host, _ingress, _Worker

pytestmark = pytest.mark.slow

SEED = 20261129
STEPS = 70
SHAPES = [(40, 50), (90, 120), (300, 400)]  # the last is cut to the model's view by the ingress


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(SEED)
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in SHAPES]


def _request(rng: random.Random, predicted: dict[int, int]) -> tuple[str, int, dict[str, Any]]:
    """(rpc, image, fields): valid requests mostly, and the caller's mistakes the worker must refuse alike."""
    from ierf_proto.v1 import explainer_pb2 as pb

    image = rng.randrange(len(SHAPES))
    common: dict[str, Any] = {"model_id": rng.choice(["", "r18"])}
    rpc = rng.choices(["Explain", "ComputeIERF", "Predict"], [6, 3, 2])[0]
    if rpc == "Predict":
        return rpc, image, {**common, "top_k": rng.choice([0, 1, 3, 1001])}
    common |= {
        "map_dtype": rng.choice([pb.DATA_TYPE_FLOAT32, pb.DATA_TYPE_FLOAT16]),
        "overlay": rng.random() < 0.15,
        "return_input": rng.random() < 0.15,
    }
    if rpc == "ComputeIERF":
        layer, grid = rng.choice([("layer3.1", 14), ("layer4", 7), ("layer4", 8), ("bogus", 1)])
        positions = [pb.Position(row=rng.randrange(grid), col=rng.randrange(min(grid, 7))) for _ in range(2)]
        return rpc, image, {**common, "layer": layer, "positions": positions}
    fields = {**common, "method": rng.choices(["srd", "", "gradient", "gradcam"], [4, 3, 1, 1])[0]}
    target = rng.choices([None, rng.randrange(10), 1000], [4, 4, 1])[0]
    if target is not None:
        fields["target"] = target
    contrast = rng.choices(["", "mean", "class", "predicted"], [4, 2, 2, 1])[0]
    if contrast == "mean":
        fields["contrast"] = "mean"
    elif contrast == "class":
        fields["contrast_class"] = rng.randrange(10)
    elif contrast == "predicted":  # equal to the automatic target: refused once the worker knows it
        fields["contrast_class"] = predicted.get(image, 0)
    return rpc, image, fields


def _answer(ingress: Any, rpc: str, pixels: np.ndarray, fields: dict[str, Any]) -> tuple[str, Any, Any]:
    from ierf_proto.v1 import explainer_pb2 as pb

    image = pb.Image(tensor=pb.Tensor(data=pixels.tobytes(), dtype=pb.DATA_TYPE_UINT8, shape=list(pixels.shape)))
    message = {"Explain": pb.ExplainRequest, "ComputeIERF": pb.ComputeIERFRequest, "Predict": pb.PredictRequest}
    try:
        response = asyncio.run(getattr(ingress, rpc)(message[rpc](image=image, **fields)))
    except Exception as refusal:
        return "refused", (type(refusal).__name__, str(refusal)), None
    stages = {t.stage: t.seconds for t in response.provenance.timings}
    total = stages.pop("total")
    assert min(stages.values()) >= 0 and sum(stages.values()) <= total, (rpc, stages, total)
    prov = response.provenance
    compared = [prov.model_id, prov.weights_digest, prov.method, prov.method_version, prov.content_hash]
    for field, value in response.ListFields():
        if field.name != "provenance":
            compared.append((field.name, value if isinstance(value, bytes) else repr(value)))
    return "answered", compared, response


def _needs(rpc: str, fields: dict[str, Any]) -> str | None:
    """The artefact besides the kept view that answers a job by hash: the decomposition or the logits; None
    for a job that reads the view itself (an overlay, the returned input, another method)."""
    if fields.get("overlay") or fields.get("return_input"):
        return None
    if rpc == "Predict":
        return "logits"
    return "decomposition" if rpc == "ComputeIERF" or fields["method"] in ("", "srd") else None


def test_repeats_by_hash_answer_exactly_as_pixels_do() -> None:
    from ierf.serving.worker import FORWARD_METHOD, VIEW_METHOD

    by_hash, always_pixels = _Worker(_host({"redis_url": None})), _Worker(_host({"redis_url": None}))
    ingress, reference = _ingress(by_hash), _ingress(always_pixels, remembered_images=0)
    rng, images = random.Random(SEED), _images()
    predicted: dict[int, int] = {}
    hashes: dict[int, str] = {}
    hops = {"by hash": 0, "refused": 0}
    for step in range(STEPS):
        if rng.random() < 0.08:
            by_hash.host.cache.l1.clear()
            always_pixels.host.cache.l1.clear()
            continue
        rpc, image, fields = _request(rng, predicted)
        needs = _needs(rpc, fields)
        remembered = image in hashes and ("r18", hashes[image]) in ingress._sent
        held = False
        if remembered:  # the kept view answers any job; else the decomposition or logits a job reads
            l1 = by_hash.host.cache.l1._items
            held = by_hash.host._key("view", VIEW_METHOD, hashes[image]) in l1
            if needs is not None and not held:
                method = FORWARD_METHOD if needs == "logits" else "srd"
                held = by_hash.host._key(needs, method, hashes[image]) in l1
        before = len(by_hash.sent)
        got, expected = _answer(ingress, rpc, images[image], fields), _answer(reference, rpc, images[image], fields)
        assert got[:2] == expected[:2], (step, rpc, fields)
        if got[0] != "answered":
            continue
        hops_taken = by_hash.sent[before:]
        if remembered:
            assert hops_taken == ([False] if held else [False, True]), (step, rpc, fields, held)
            hops["by hash" if held else "refused"] += 1
        else:
            assert hops_taken == [True], (step, rpc, fields)
        hashes[image] = got[2].provenance.content_hash
        if rpc == "Explain" and "target" not in fields:
            predicted[image] = got[2].target.index
    assert hops["by hash"] >= 5 and hops["refused"] >= 1, hops  # the run exercised both paths
