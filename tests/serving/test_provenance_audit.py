"""Provenance audit: what a response (and the picture it carries) says it is must be what it is."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def host():
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ModelHost

    config = ServiceConfig.from_args(
        {"models": [{"id": "r18", "name": "resnet18", "random_init": True}], "cache": {"redis_url": None}}
    )
    return ModelHost(config.models[0], config.cache)


def test_an_overlay_of_a_contrast_map_says_what_was_subtracted(host, monkeypatch) -> None:
    """Guards against captioning a contrastive map as the plain class map: "class 5 minus its mean" and "class 5
    minus class 7" were both drawn as "SRD 5 <name>", the caption of the identity map. The overlay PNG is the
    artifact users save and share without the request beside it (the CLI already names the explained class in it
    for that reason), so it must not state a different quantity than the one it shows."""
    import ierf.viz as viz
    from ierf.serving.images import canonicalise
    from ierf.serving.worker import ExplainJob

    captions: list[str] = []
    real = viz.overlay_signed

    def spy(*args, **kwargs):
        captions.append(kwargs.get("caption") or "")
        return real(*args, **kwargs)

    monkeypatch.setattr(viz, "overlay_signed", spy)
    image = canonicalise(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    maps = []
    for contrast in ("identity", "mean", 7):
        outcome = host.explain(ExplainJob(image.pixels, image.content_hash, target=5, contrast=contrast, overlay=True))
        maps.append(outcome.maps)
    assert not np.allclose(maps[0], maps[1]) and not np.allclose(maps[0], maps[2])  # three different maps
    identity, mean, minus = captions
    assert len({identity, mean, minus}) == 3, f"three different maps, captioned {captions}"
    assert "mean" in mean.lower(), mean
    assert "7" in minus or host.model.class_names[7] in minus, minus


def test_the_documented_content_hash_recipe_reproduces_the_provenance_hash() -> None:
    """Provenance.content_hash is documented as "sha256 hex of the canonical uint8 RGB image" (the .proto, the
    cross-language contract) and the README's cache key as "<sha256 of canonical pixels>", but the service hashes
    a shape header ("uint8:HxWx3|") before the pixels. An auditor (or a client in another language checking which
    image an answer is about) who recomputes the hash as documented never gets the served value. Either the hash
    or the documentation has to change; this passes once they agree."""
    from ierf.serving.images import canonicalise

    pixels = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    served = canonicalise(pixels).content_hash
    if served == hashlib.sha256(pixels.tobytes()).hexdigest():
        return  # the documented recipe holds
    proto = (REPO / "protos/ierf_proto/v1/explainer.proto").read_text()
    provenance = proto[proto.index("message Provenance") :]  # Image.content_hash (a reference) comes earlier
    documented = next(line for line in provenance.splitlines() if "content_hash" in line and "=" in line)
    assert "uint8:" in documented or "shape" in documented.lower(), (
        f"served hash {served[:16]}… is not sha256(pixels); the proto says: {documented.strip()}"
    )
    readme = (REPO / "README.md").read_text()
    assert "<sha256 of canonical pixels>" not in readme, "README's cache key names a hash the service does not use"


def test_cached_values_are_keyed_by_the_engine_code_that_made_them(tmp_path: Path, monkeypatch) -> None:
    """SRD declared version "1.0" from its first commit through engine changes that moved maps (a oneDNN tap
    fix among them), so a shared Redis kept serving the old code's decompositions after a redeploy, under the
    same key and the same provenance. The key's version now carries a digest of the engine's source: a change
    to any engine file (not to the serving code) is another version."""
    import shutil

    import ierf
    from ierf.serving import worker

    copy = tmp_path / "ierf"
    shutil.copytree(Path(ierf.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(ierf, "__file__", str(copy / "__init__.py"))

    def digest() -> str:
        worker.engine_code_digest.cache_clear()
        return worker.engine_code_digest()

    try:
        before = digest()
        (copy / "serving" / "worker.py").write_text((copy / "serving" / "worker.py").read_text() + "\n# serving\n")
        assert digest() == before  # serving code makes no cached value
        (copy / "srd" / "ratios.py").write_text((copy / "srd" / "ratios.py").read_text() + "\n# engine\n")
        assert digest() != before
    finally:
        worker.engine_code_digest.cache_clear()
