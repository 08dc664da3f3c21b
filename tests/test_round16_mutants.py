"""Mutation round 16: tests killing mutants that survived the suite in the code of c54c7e4^..49d3ae4."""

from __future__ import annotations

import os
from pathlib import Path

import ierf
import pytest
import torch
from torch import nn


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()


# ------------------------------------------------------------------ SmoothGrad: the seed's and noise's ranges
def test_smoothgrad_takes_every_seed_torch_takes_and_no_other() -> None:
    """The seed check is torch's range [-2**63, 2**64): both ends are accepted, one past either end is not."""
    from ierf.baselines.gradient import SmoothGrad

    model = _model()
    for seed in (-(2**63), 2**64 - 1):
        assert SmoothGrad(model, seed=seed).seed == seed
        torch.Generator().manual_seed(seed)  # torch agrees
    for seed in (-(2**63) - 1, 2**64):
        with pytest.raises(ValueError, match="seed must be an integer"):
            SmoothGrad(model, seed=seed)


@pytest.mark.parametrize("level", [0.0, 1.0, 0, 1])
def test_smoothgrad_refuses_a_noise_level_at_either_end(level) -> None:
    from ierf.baselines.gradient import SmoothGrad

    with pytest.raises(ValueError, match=r"noise_level must be in \(0, 1\)"):
        SmoothGrad(_model(), noise_level=level)


# ------------------------------------------------------------------ CLI: the temporary file beside the output
@pytest.mark.timeout(20)
def test_the_cli_output_never_overwrites_a_file_that_has_the_temporary_name(tmp_path: Path, monkeypatch) -> None:
    """``_create_beside`` draws a random name and creates it exclusively; a name already taken (another
    writer's temporary file) is left alone and another name is drawn."""
    from ierf import cli
    from PIL import Image

    names = iter(["taken", "taken", "free"])
    monkeypatch.setattr(cli.secrets, "token_hex", lambda n: next(names))
    target = tmp_path / "out.png"
    other = tmp_path / ".out.png.taken.part"
    other.write_bytes(b"another writer's bytes")
    written = cli._write_png(Image.new("RGB", (4, 4), (10, 20, 30)), str(target))
    assert written == target and Image.open(target).size == (4, 4)
    assert other.read_bytes() == b"another writer's bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.png.taken.part", "out.png"]


@pytest.mark.timeout(20)
def test_two_temporary_files_beside_one_output_get_distinct_names(tmp_path: Path) -> None:
    """Two writers of one output (two threads, two processes) each get their own temporary file: a fixed
    name would make the second wait forever on O_EXCL (or, without it, write into the first's file)."""
    from ierf import cli

    first = cli._create_beside(tmp_path / "x.png")
    second = cli._create_beside(tmp_path / "x.png")
    for fd, _ in (first, second):
        os.close(fd)
    assert first[1] != second[1]


def test_the_cli_temporary_file_is_created_0666_under_the_umask(tmp_path: Path) -> None:
    from ierf import cli

    old = os.umask(0o022)
    try:
        fd, name = cli._create_beside(tmp_path / "x.png")
    finally:
        os.umask(old)
    os.close(fd)
    assert Path(name).parent == tmp_path and Path(name).name.startswith(".x.png.") and name.endswith(".part")
    assert os.stat(name).st_mode & 0o777 == 0o644


# ------------------------------------------------------------------ SRD: any parameter written mid-call
@pytest.mark.parametrize("which", ["first weight", "a bias", "the last bias"])
def test_srd_refuses_a_call_during_which_any_one_parameter_was_written(which: str, monkeypatch) -> None:
    """The version check covers every parameter: one in-place write to the first weight, to a bias (a
    module's second parameter), or to the last layer's bias, made mid-call, is a ModelChangedError."""
    import ierf.srd.program as program

    model = _model()
    explainer = ierf.SRD(model)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    explainer.saliency(x, 1)
    param = {"first weight": model[0].weight, "a bias": model[2].bias, "the last bias": model[6].bias}[which]
    calls = [0]
    original = program.checkpoint

    def write_midway() -> None:
        original()
        calls[0] += 1
        if calls[0] == 2:
            with torch.no_grad():
                param.add_(0.5)

    monkeypatch.setattr(program, "checkpoint", write_midway)
    with pytest.raises(ierf.ModelChangedError):
        explainer.saliency(x, 1)
    assert calls[0] >= 2


# ------------------------------------------------------------------ random_init: the weights' fingerprint
def test_the_random_init_fingerprint_tells_a_change_in_any_floating_tensor() -> None:
    """A draw taken out of the seeded stream may change only the later tensors: the fingerprint covers all."""
    from ierf.models.registry import _state_fingerprint

    model = _model()
    before = _state_fingerprint(model)
    assert len(before) == len([t for t in model.state_dict().values() if t.is_floating_point()])
    with torch.no_grad():
        model[6].bias[0] += 1.0
    assert _state_fingerprint(model) != before


# ------------------------------------------------------------------ SRD complement: 'carries'
def test_a_residual_branch_contributing_only_positive_values_still_carries_its_bias():
    """The mirror of test_srd_complement's negative case: a branch positive in every channel (max > 0,
    min > 0) contributes, so it keeps its bias share; the reference implementation agrees."""
    from ierf.srd.reference import ReferenceSRD
    from srd_nets import assert_matches_reference, randomise_bn
    from test_srd_complement import HalfDeadBranch, _image

    model = randomise_bn(HalfDeadBranch()).double().eval()
    with torch.no_grad():
        model.conv3.weight.copy_(model.conv3.weight.abs() + 0.05)
    x = _image()
    part = model.bn3(model.conv3(model.relu_a(model.conv_a(model.relu0(model.conv0(x))))))
    shift = model.bn3.bias - model.bn3.running_mean * model.bn3.weight / (model.bn3.running_var + model.bn3.eps).sqrt()
    live = part[..., 4:] - shift[:, None, None]
    assert (live > 0).all(), "the branch's contribution is positive in every channel on the right half"
    dec = ierf.SRD(model, head="exact").decompose(x)
    ref = ReferenceSRD(model)
    assert_matches_reference(dec, ref, ref.decompose(x), targets=(0, 3), rel_tol=1e-9)
