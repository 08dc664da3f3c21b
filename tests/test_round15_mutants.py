"""Round 15 mutation testing of 7634b69..HEAD (engine, CLI): each test pins a behaviour that a mutant of the
new code broke while every existing test still passed. Small CPU models or none; each test < 10 s."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn


# ------------------------------------------------------------------------------ resize_crop, tall images
def test_the_whole_resize_stops_exactly_past_16_times_a_256_view(monkeypatch: pytest.MonkeyPatch) -> None:
    """PIPELINE_VERSION 3 names the pixels of "not strips over 16:1": a 120x1920 strip (resized to 256x4096,
    the cap exactly) is resized whole, and one only 8 rows taller (256x4113) takes the box of rows. A larger
    cap would change the pixels of such strips without a version bump (cached views of the old arithmetic)."""
    from ierf.images import WHOLE_RESIZE_MAX_PIXELS, resize_crop
    from PIL import Image

    assert WHOLE_RESIZE_MAX_PIXELS == 16 * 256 * 256
    asked: list[tuple[int, int]] = []
    resize = Image.Image.resize

    def spy(self: Any, size: Any, *args: Any, **kwargs: Any) -> Any:
        asked.append((int(size[0]), int(size[1])))
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    rng = np.random.default_rng(0)
    resize_crop(rng.integers(0, 256, (1920, 120, 3), dtype=np.uint8), 256, 224)
    assert asked == [(256, 4096)]
    asked.clear()
    resize_crop(rng.integers(0, 256, (1928, 120, 3), dtype=np.uint8), 256, 224)
    assert asked == [(224, 224)]


# ----------------------------------------------------------------------------------------------- the CLI
@pytest.fixture()
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "in.png"
    Image.fromarray(np.full((16, 16, 3), 100, np.uint8)).save(path)
    return path


def test_the_png_gets_the_usual_permissions_not_the_temporary_files(image, tmp_path) -> None:
    """The PNG is written to a mkstemp file (mode 0600) and renamed: the output must still get the mode any
    new file gets under the caller's umask (0644 under 022), not stay private to its owner."""
    import os

    from ierf.cli import main
    from test_cli import _EchoBackend

    out = tmp_path / "srd.png"
    mask = os.umask(0o022)
    try:
        assert main(["explain", str(image), "-o", str(out)], backend=_EchoBackend()) == 0
    finally:
        os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o644


def test_an_unwritable_output_folder_is_refused_before_the_work(image, tmp_path, monkeypatch, capsys) -> None:
    """README: the output is checked before any work. A folder the user cannot write is refused at once (exit
    2), not after the whole explanation. (Root writes anywhere, so the permission is faked for the folder.)"""
    import os

    from ierf.cli import main
    from test_cli import _EchoBackend

    folder = tmp_path / "locked"
    folder.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(folder) else access(p, mode, **kw))
    backend = _EchoBackend()
    assert main(["explain", str(image), "-o", str(folder / "sub" / "srd.png")], backend=backend) == 2
    assert backend.requests == []
    assert "not writable" in capsys.readouterr().err


def test_an_output_under_a_file_says_the_file_is_not_a_folder(image, tmp_path, capsys) -> None:
    """``-o photo.png/srd.png`` (a parent that is a file): the refusal names the cause, a file where a folder
    should be, not a folder "not writable" (which sends the user to chmod)."""
    from ierf.cli import main
    from test_cli import _EchoBackend

    assert main(["explain", str(image), "-o", str(image / "deeper" / "srd.png")], backend=_EchoBackend()) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "not writable" not in err, err


# ------------------------------------------------------------------- SRD follows running statistics
def _train_forward(model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def test_maps_follow_a_batch_norm_1d_head_updated_by_a_train_mode_forward() -> None:
    """Every batch norm's running statistics are followed, a BatchNorm1d in the head too (an MLP head over
    pooled features): after a train-mode forward the map still sums to the model's current logit."""
    import ierf

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5),
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 12, 12)
    explainer = ierf.SRD(model, head="exact")  # the default head of an MLP is not conservative
    explainer.saliency(x, 1)
    _train_forward(model, torch.randn(8, 3, 12, 12) * 4 + 2)
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(explainer.saliency(x, 1).sum((1, 2)), logits[:, 1], rtol=1e-4, atol=1e-5)


def test_maps_follow_a_running_variance_that_moved_while_the_mean_did_not() -> None:
    """A train-mode forward on a batch whose per-channel mean is exactly the running mean (0 here: the batch
    holds x and -x, integer arithmetic) moves only ``running_var``: it must be followed as well."""
    import ierf

    conv = nn.Conv2d(3, 8, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randint(-2, 3, conv.weight.shape, generator=torch.Generator().manual_seed(0)))
    bn = nn.BatchNorm2d(8)
    model = nn.Sequential(conv, bn, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    x = torch.randn(2, 3, 8, 8)
    explainer = ierf.SRD(model)
    explainer.saliency(x, 1)
    half = torch.randint(-3, 4, (4, 3, 8, 8), generator=torch.Generator().manual_seed(1)).float()
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    _train_forward(model, torch.cat([half, -half]))
    assert torch.equal(bn.running_mean, mean) and not torch.equal(bn.running_var, var)
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(explainer.saliency(x, 1).sum((1, 2)), logits[:, 1], rtol=1e-4, atol=1e-5)


def test_a_second_call_on_an_unchanged_model_reuses_its_folds() -> None:
    """Running statistics are compared by value once per call and the folds dropped only when they moved: a
    model whose statistics did not move keeps its folded batch norms (one concatenation and one comparison,
    not a re-fold of every batch norm per call)."""
    import ierf
    from ierf.srd.derived import DERIVED

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()  # fmt: skip
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    explainer, x = ierf.SRD(model), torch.randn(1, 3, 8, 8)
    explainer.saliency(x, 1)
    sources = {id(bn.running_mean), id(bn.running_var)}

    def folds() -> dict:
        return {k: v[2] for k, v in DERIVED._entries.items() if not sources.isdisjoint(k[1:])}

    first = folds()
    assert first, "no fold built from the batch norm's statistics"
    explainer.saliency(x, 1)
    second = folds()
    assert second.keys() == first.keys() and all(second[k] is first[k] for k in first), "the folds were rebuilt"


# ------------------------------------------------------------------------------ SRD's early target check
def test_a_target_of_exactly_the_class_count_is_refused_before_the_decomposition(monkeypatch) -> None:
    """Once a call has seen the class count k (parameters unchanged), target k and contrast k are refused before
    the decomposition (seconds on a large batch), with the decomposition's own message: k is the first class
    out of range (0..k-1)."""
    import ierf

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    explainer, x = ierf.SRD(model.eval()), torch.rand(1, 3, 12, 12)
    explainer.saliency(x, 4)  # the last class is fine

    def decompose(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("decomposed before refusing an out-of-range class")

    monkeypatch.setattr(explainer, "decompose", decompose)
    with pytest.raises(ValueError, match=r"target out of range: the model has 5 classes \(0\.\.4\), got 5"):
        explainer.saliency(x, 5)
    with pytest.raises(ValueError, match=r"contrast class out of range: the model has 5 classes \(0\.\.4\), got 5"):
        explainer.saliency(x, 0, contrast=5)


# ------------------------------------------------------------------------------------- BrokenModelError
def test_a_model_with_many_broken_tensors_names_four_and_counts_them_all() -> None:
    """check_model_finite names the first four non-finite tensors and the total count, so a diverged
    fine-tune (every tensor NaN) gives a short message that still says how much is broken."""
    import ierf
    from ierf.errors import BrokenModelError

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    with pytest.raises(BrokenModelError) as info:
        ierf.SRD(model).saliency(torch.rand(1, 3, 12, 12), 0)
    message = str(info.value)
    assert "0.weight, 0.bias, 2.weight, 2.bias, … (6 tensors)" in message, message
    assert "6.weight" not in message


# ------------------------------------------------------------------------------------ SmoothGrad settings
@pytest.mark.parametrize("level", [0.0, 1.0, -0.1])
def test_smoothgrad_noise_level_is_an_open_interval(level: float) -> None:
    """noise_level is a fraction of the image's range in (0, 1): 0 adds no noise (plain gradients) and 1 is
    noise as large as the image itself; both bounds are refused when built, as the message says."""
    from ierf.baselines.gradient import SmoothGrad

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"noise_level must be in \(0, 1\)"):
        SmoothGrad(model.eval(), noise_level=level)
    SmoothGrad(model.eval(), noise_level=0.999)


def test_smoothgrad_refuses_a_bool_seed() -> None:
    """``seed=True`` is a bool, not a seed (it would silently be seed 1): refused like ``n_samples=True``."""
    from ierf.baselines.gradient import SmoothGrad

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="seed must be an integer"):
        SmoothGrad(model.eval(), seed=True)


# --------------------------------------------------------------------------- squared norms' float range
def test_a_float64_model_is_held_to_float64s_range_not_float32s() -> None:
    """The out-of-range check reads each stage's squared norms against their own dtype's smallest normal: a
    float64 model whose pre-activations are ~1e-20 (squares ~1e-40, subnormal in float32 but ordinary in
    float64) is explained, not refused."""
    import ierf

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3, bias=False)
    ).double().eval()  # fmt: skip
    x = torch.rand(1, 3, 10, 10, dtype=torch.float64) * 1e-20
    maps = ierf.SRD(model).saliency(x, 0)
    with torch.no_grad():
        logit = model(x)[0, 0]
    torch.testing.assert_close(maps.sum().double(), logit, rtol=1e-4, atol=0)
