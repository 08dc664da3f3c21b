"""The CLI's overlay caption names what the map is, contrast included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ierf.cli import ClassProbability, ExplainRequest, Explanation, main
from PIL import Image


class _ContrastBackend:
    """Answers an SRD map of 967 'espresso' with whatever contrast was asked for."""

    def __init__(self) -> None:
        self.requests: list[ExplainRequest] = []

    def explain(self, request: ExplainRequest) -> Explanation:
        self.requests.append(request)
        top = [ClassProbability(967, "espresso", 0.9), ClassProbability(968, "cup", 0.05)]
        contrast = "minus 'cup'" if request.contrast == "cup" else request.contrast
        saliency = np.linspace(-1, 1, 224 * 224, dtype=np.float32).reshape(224, 224)
        return Explanation(
            kind="saliency", model="fake", weights="none", pixels=np.full((224, 224, 3), 90, np.uint8),
            map=saliency, top=top, target=top[0], target_logit=1.0, contrast=contrast,
        )  # fmt: skip


@pytest.mark.parametrize("contrast", ["mean", "cup"])
def test_the_overlay_caption_names_the_contrast(tmp_path: Path, monkeypatch, contrast: str) -> None:
    """Guards against captioning "espresso minus cup" (or minus its mean) as "SRD 967 espresso", the caption of the
    plain espresso map: the PNG is read without the terminal output (see the caption test in test_cli.py), and a
    contrastive map sums to a logit gap, not to the class's logit."""
    import ierf.viz as viz

    captions: list[str] = []
    real = viz.overlay_signed

    def spy(*args, **kwargs):
        captions.append(kwargs.get("caption") or "")
        return real(*args, **kwargs)

    monkeypatch.setattr(viz, "overlay_signed", spy)
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    out = tmp_path / "out.png"
    assert main(["explain", str(image), "-o", str(out), "--contrast", contrast], backend=_ContrastBackend()) == 0
    (caption,) = captions
    assert caption != "SRD 967 espresso", "a contrast map captioned as the plain class map"
    assert ("mean" in caption.lower()) if contrast == "mean" else ("cup" in caption or "968" in caption), caption
