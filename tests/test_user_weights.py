"""A data scientist's own weights and models: training checkpoints, fine-tuned heads, output activations.

Each test here is a defect found by loading self-trained files the way the README says (``weights=PATH``,
``$IERF_WEIGHTS_DIR``, the torch hub cache) and by handing ``ierf.SRD`` a model of one's own."""

from __future__ import annotations

import argparse
from pathlib import Path

import ierf
import pytest
import torch
import torchvision.models
from ierf.models import load_model
from torch import nn


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(11)
    return torchvision.models.resnet18(weights=None).state_dict()


@pytest.fixture
def no_weight_dirs(tmp_path, monkeypatch):
    weights_dir, torch_home = tmp_path / "weights", tmp_path / "torch_home"
    weights_dir.mkdir()
    monkeypatch.setenv("IERF_WEIGHTS_DIR", str(weights_dir))
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return weights_dir, torch_home / "hub" / "checkpoints"


# --- SRD on the user's own module -------------------------------------------------------------------


class _TinyNet(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _proportional(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a / a.sum(), b / b.sum(), rtol=1e-4, atol=1e-6)


def test_a_model_ending_in_sigmoid_is_not_silently_explained_class_agnostically() -> None:
    """A multi-label classifier is a CNN + global pool + Linear with an ``nn.Sigmoid`` appended. ierf takes that
    Sigmoid for a PFV boundary, so the global-pool + Linear head (the published ResNet start, class-specific,
    "sums to the logit") becomes a one-position "fully connected" stage: head="auto" silently switches to
    Grad-CAM, and head="exact" returns the same map, up to scale, for every class (class 1's map is class 2's
    map times a number). Nothing in the README says that an output activation does this. Either explain the
    logit under the output activation (class-specific maps, as without it), or refuse the model and name the
    activation, so that the user passes ``model[0]``."""
    torch.manual_seed(0)
    body = _TinyNet().eval()
    model = nn.Sequential(body, nn.Sigmoid()).eval()
    x = torch.randn(1, 3, 16, 16)
    without = ierf.SRD(body).decompose(x)
    assert not _proportional(without.saliency(1)[0], without.saliency(2)[0])  # class-specific without it
    try:
        dec = ierf.SRD(model, head="exact").decompose(x)
    except ValueError as exc:  # refused: fine, as long as the user learns why
        assert "Sigmoid" in str(exc), str(exc)
        return
    assert not _proportional(dec.saliency(1)[0], dec.saliency(2)[0]), (
        "head='exact' on a model ending in Sigmoid gives every class the same map"
    )


# --- loading a checkpoint of one's own --------------------------------------------------------------


def test_a_torch_compiled_models_state_dict_loads_like_a_data_parallel_one(tmp_path: Path, resnet18_state) -> None:
    """``torch.compile(model).state_dict()`` prefixes every key with ``_orig_mod.`` as DataParallel does with
    ``module.``; the loader strips ``module.`` (and the README tells SRD users about ``._orig_mod``), but refuses
    a compiled model's file with 122 "unexpected _orig_mod.*" keys."""
    path = tmp_path / "finetuned.pth"
    torch.save({"state_dict": {f"_orig_mod.{k}": v for k, v in resnet18_state.items()}, "epoch": 9}, path)
    loaded = load_model("resnet18", weights=path)
    torch.testing.assert_close(loaded.module.fc.bias, resnet18_state["fc.bias"], rtol=0, atol=0)


def test_a_training_checkpoint_with_pickled_args_names_what_torch_refused(tmp_path: Path, resnet18_state) -> None:
    """torchvision's own reference training script (references/classification/train.py) saves
    ``{"model": ..., "optimizer": ..., "epoch": ..., "args": argparse.Namespace}``; timm saves ``args`` too.
    ``torch.load(weights_only=True)`` refuses it and torch's message names the class (``argparse.Namespace``),
    but ierf replaces that with "not a tensor file, or it holds arbitrary objects", so the user cannot tell
    a corrupt file from a checkpoint whose extra entry they only need to drop (``torch.save(ckpt["model"], ...)``).
    The refusal itself is right (security); the message should keep the class torch names."""
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": resnet18_state, "epoch": 5, "args": argparse.Namespace(lr=0.1, model="resnet18")}, path)
    with pytest.raises(ValueError, match=r"argparse\.Namespace"):
        load_model("resnet18", weights=path)


def test_a_checkpoint_under_another_key_is_refused_naming_its_keys(tmp_path: Path, resnet18_state) -> None:
    """PyTorch's own tutorial ("Saving and loading a general checkpoint") stores weights under
    ``model_state_dict``: that file was refused with "does not hold a state_dict (a mapping of names to
    tensors)", which is false for the user and gives no lead. It is now unwrapped like ``state_dict`` and
    ``model``; a checkpoint under a key the loader does not know is refused listing the file's top-level keys."""
    path = tmp_path / "tutorial_ckpt.pth"
    torch.save({"epoch": 3, "model_state_dict": resnet18_state, "loss": 0.25}, path)
    loaded = load_model("resnet18", weights=path)
    torch.testing.assert_close(loaded.module.fc.bias, resnet18_state["fc.bias"], rtol=0, atol=0)
    path = tmp_path / "own_ckpt.pth"
    torch.save({"epoch": 3, "net": resnet18_state}, path)
    with pytest.raises(ValueError, match=r"top-level keys: 'epoch', 'net'"):
        load_model("resnet18", weights=path)


def test_weights_dir_set_to_the_file_itself_says_it_is_not_a_directory(
    no_weight_dirs, tmp_path, resnet18_state, monkeypatch
) -> None:
    """A common slip: ``IERF_WEIGHTS_DIR=/data/resnet18-f37072fd.pth`` (the file, not its folder), or a folder
    that does not exist. The FileNotFoundError says it "looked for resnet18-f37072fd.pth in $IERF_WEIGHTS_DIR
    (/data/resnet18-f37072fd.pth)", reading as if the file were missing; it should say that the setting is not
    a directory (or does not exist)."""
    weights_dir, _ = no_weight_dirs
    file = weights_dir / "resnet18-f37072fd.pth"
    torch.save(resnet18_state, file)
    monkeypatch.setenv("IERF_WEIGHTS_DIR", str(file))
    with pytest.raises(FileNotFoundError, match=r"not a directory"):
        load_model("resnet18")
    monkeypatch.setenv("IERF_WEIGHTS_DIR", str(tmp_path / "no_such_dir"))
    with pytest.raises(FileNotFoundError, match=r"does not exist|no such directory"):
        load_model("resnet18")


def test_a_hub_cache_from_older_torchvision_is_not_reported_as_empty(no_weight_dirs, resnet18_state) -> None:
    """torchvision before 0.13 cached its ImageNet ResNets as ``resnet18-5c106cde.pth``, ``resnet50-19c8e357.pth``,
    ``resnet101-5d3b4d8f.pth`` (and Inception-v3 as ``inception_v3_google-1a9a5a14.pth``); the registry knows only
    today's names, so a hub cache holding the old file gets "no weights for resnet18: looked for
    resnet18-f37072fd.pth in ... the torch hub cache": the user is told the cache lacks what is right there.
    Either accept torchvision's earlier file names, or name the candidate found (``resnet18-*.pth``) so the user
    knows to pass it as ``weights=PATH``."""
    _, hub_dir = no_weight_dirs
    hub_dir.mkdir(parents=True)
    torch.save(resnet18_state, hub_dir / "resnet18-5c106cde.pth")
    try:
        loaded = load_model("resnet18")
    except FileNotFoundError as exc:
        assert "resnet18-5c106cde.pth" in str(exc), str(exc)
    else:
        torch.testing.assert_close(loaded.module.fc.bias, resnet18_state["fc.bias"], rtol=0, atol=0)
