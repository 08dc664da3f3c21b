"""The README's engine snippet runs as written (a newcomer's first code; it drifted from the API before)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_readmes_python_engine_snippet_runs_and_its_comments_hold() -> None:
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert "ierf.SRD(" in snippet and "overlay_signed(" in snippet  # the engine block, through to a picture
    scope: dict = {}
    exec(compile(snippet, "README.md (engine snippet)", "exec"), scope)
    x, explainer, view = scope["x"], scope["explainer"], scope["view"]
    logit = scope["m"].module(x)[0, 967]
    assert torch.allclose(explainer.saliency(x, 967).sum(), logit, rtol=1e-4)  # "sums to the logit"
    assert torch.allclose(scope["erfs"].sum((-2, -1)), torch.ones(1, 2), atol=1e-4)  # "each sums to 1"
    assert view.shape == (224, 224, 3) and view.dtype.name == "uint8"
    picture = scope["overlay_signed"](view, scope["maps"][0], caption="SRD 967")
    assert picture.size[0] == 224  # a PIL image
