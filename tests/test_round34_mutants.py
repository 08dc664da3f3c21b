"""Mutation round 34 on ``ierf.fidelity``: the synthetic localisation set, the committed TinyResNet's geometry
and training record, the grid pointing game's photo selection, APOP's frozen pattern, and train's helpers.

Each test fails on a plausible slip that the suite let through. The synthetic set is pinned to the data the
committed checkpoint was trained and evaluated on (a changed generator silently invalidates the checkpoint and
every published fidelity number while the model stays above chance); APOP must replay exactly the recorded
states, refuse patterns that do not fit, and leave no hooks behind; the TinyResNet must keep the geometry its
record and docstring state.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch
from ierf.errors import UnsupportedModelError
from ierf.fidelity import grid, synthetic
from ierf.fidelity.apop import APOP, apop_agreement, uninformative
from ierf.fidelity.tiny_resnet import STRIDES, WIDTHS, TinyResNet, load_tiny_resnet, training_record
from torch import nn


def _digest(array: np.ndarray | torch.Tensor) -> str:
    if isinstance(array, torch.Tensor):
        array = array.numpy()
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


@pytest.fixture(scope="module")
def test_set() -> synthetic.SyntheticSet:
    return synthetic.generate("test", 64)


# -- synthetic set -----------------------------------------------------------------------------------------------
def test_glyph_split_is_the_one_the_checkpoint_was_trained_with() -> None:
    """F01, F29: the split is fixed for all time (GLYPH_SPLIT_SEED, sorted indices). An unseeded split changes
    every process, so test glyphs leak into training; the record only stores the split's size."""
    split = synthetic.glyph_split()
    assert split["test"][:10].tolist() == [1, 11, 18, 19, 20, 21, 23, 25, 26, 29]
    assert _digest(split["test"]) == "75c0de4e48eff3c3"


def test_test_set_is_the_data_the_checkpoint_was_evaluated_on(test_set: synthetic.SyntheticSet) -> None:
    """F04-F11, F15, F17-F19, F21-F26, F35-F40 and any other change to the generator: the committed checkpoint,
    its record and the published fidelity numbers are bound to these exact images, yet the model stays above
    the suite's accuracy floor on most altered data. Pinned here: the first draws listed for a readable failure,
    digests over every box, mask and pixel of 64 images (16 were too few to meet a distractor placed in the gap
    round the glyph). A library upgrade that changes resampling changes the data too: re-pin only after checking
    the checkpoint's accuracy against its record."""
    assert test_set.labels[:16].tolist() == [7, 4, 8, 6, 9, 1, 0, 8, 8, 2, 8, 3, 2, 7, 3, 2]
    assert test_set.glyph_ids[:8].tolist() == [438, 790, 955, 1115, 621, 1227, 1425, 482]
    assert test_set.background_ids[:16].tolist() == [8, 0, 17, 15, 13, 15, 4, 16, 4, 17, 11, 2, 11, 0, 14, 11]
    assert test_set.boxes[:4].tolist() == [[47, 46, 70, 63], [78, 9, 95, 22], [35, 8, 58, 24], [47, 76, 69, 95]]
    assert _digest(test_set.boxes) == "b087980c0b6cc39e"
    assert _digest(test_set.masks) == "bd477bd7019422c7"
    assert _digest(test_set.images) == "6eddf0f8d4afc332"


def test_glyphs_have_luminance_contrast_with_their_surroundings(test_set: synthetic.SyntheticSet) -> None:
    """F16, F17: the glyph's colour is about 0.4 in luminance away from its local background (the documented
    rule that keeps its shape visible). Inverted or narrowed, some glyphs sink into their background."""
    luma = torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]
    lum = ((test_set.images.float() / 255) * luma).sum(1)
    for i in range(len(test_set)):
        y0, x0, y1, x1 = test_set.boxes[i].tolist()
        mask = test_set.masks[i]
        ring = torch.zeros_like(mask)
        ring[max(y0 - 3, 0) : y1 + 3, max(x0 - 3, 0) : x1 + 3] = True
        ring &= ~mask
        assert abs(float(lum[i][mask].mean() - lum[i][ring].mean())) > 0.1, i


def test_backgrounds_are_the_eighteen_without_text_digits_or_clocks() -> None:
    """F20: images showing text, digits or clock faces are left out (they would carry class evidence)."""
    names = synthetic.BACKGROUND_NAMES
    assert len(names) == len(set(names)) == 18
    assert not {"text", "clock", "page", "horse", "cat", "logo"} & set(names)


def test_config_and_generate_arguments_at_their_edges() -> None:
    """F30, F32: a fixed glyph size (lo == hi) is a valid config; ``n=True`` is refused, not one image."""
    config = synthetic.SyntheticConfig(object_size=(16, 16), max_distractors=0)
    data = synthetic.generate("test", 2, config=config)
    heights = data.boxes[:, 2] - data.boxes[:, 0]
    assert data.images.shape == (2, 3, 96, 96) and bool((heights <= 16).all())
    with pytest.raises(ValueError, match="positive int"):
        synthetic.generate("test", True)


def test_subset_keeps_every_field_aligned(test_set: synthetic.SyntheticSet) -> None:
    """F33: a subset's boxes, masks and ids belong to its own images (accuracy() only reads labels)."""
    index = torch.tensor([3, 0, 7])
    sub = test_set.subset(index)
    for field in ("images", "labels", "boxes", "masks", "glyph_ids", "background_ids"):
        assert torch.equal(getattr(sub, field), getattr(test_set, field)[index]), field
    assert (sub.split, sub.seed, len(sub)) == (test_set.split, test_set.seed, 3)


# -- grid --------------------------------------------------------------------------------------------------------
class _LogitsFromPixel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :4]


def test_confident_images_come_sorted_by_name_and_four_orders_are_allowed() -> None:
    """G03, G06: the kept photos are listed by name whatever the order they were offered in (the grids, and so
    the benchmark's case order, follow it); ``orders`` may be 1..4 as documented."""
    photos = {
        "zeta": np.array([5.0, 0.0, 0.0, 0.0]),
        "alpha": np.array([0.0, 5.0, 0.0, 0.0]),
        "mid": np.array([0.0, 0.0, 5.0, 0.0]),
        "beta": np.array([0.0, 0.0, 0.0, 5.0]),
    }
    kept = grid.confident_images(_LogitsFromPixel(), lambda a: torch.tensor(a, dtype=torch.float32), photos)
    assert [image.name for image in kept] == ["alpha", "beta", "mid", "zeta"]
    images = [grid.GridImage(f"img{i}", torch.full((3, 4, 4), float(i)), label=i, prob=0.9) for i in range(4)]
    cases = grid.build_grids(images, orders=4)
    assert len(set(cases.names)) == 4 and len(cases) == 16


# -- APOP --------------------------------------------------------------------------------------------------------
def _identity_linear(bias: tuple[float, ...] = (0.0,), weight: list[list[float]] | None = None) -> nn.Linear:
    weight = weight or [[1.0]]
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


def test_apop_replays_the_recorded_max_pool_winner() -> None:
    """A04: a MaxPool2d's winner is part of the pattern. Left live, the replay takes the new input's maximum (3)
    instead of the recorded winner's position (which holds 1 in the new input)."""
    apop = APOP(nn.Sequential(nn.ReLU(), nn.MaxPool2d((1, 2)), nn.Flatten()))
    _, pattern = apop.record(torch.tensor([[[[2.0, 1.0]]]]))
    assert apop.replay(pattern, torch.tensor([[[[1.0, 3.0]]]])).item() == 1.0


def test_apop_replay_of_an_in_place_relu_passes_the_pre_activation() -> None:
    """A06: the TinyResNet's ReLUs are in place, so the replay must keep the input z before the module
    overwrites it: a frozen "on" unit passes z = -1, not relu(z) = 0."""
    apop = APOP(nn.Sequential(_identity_linear(), nn.ReLU(inplace=True), _identity_linear()))
    _, pattern = apop.record(torch.tensor([[2.0]]))
    assert apop.replay(pattern, torch.tensor([[-1.0]])).item() == -1.0


def test_apop_refuses_patterns_with_too_few_or_too_many_calls_and_mismatched_pools() -> None:
    """A07, A08, A09: a pattern that does not fit the replay is a ValueError naming the problem, not an
    IndexError, a silent success, or a gather error."""
    apop = APOP(TinyResNet().eval())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _, pattern = apop.record(x)
    short = dict(pattern.states)
    short["layer1.0.relu"] = pattern.states["layer1.0.relu"][:1]
    with pytest.raises(ValueError, match="replay made more"):
        apop.replay(type(pattern)(states=short), x)
    extra = dict(pattern.states)
    extra["relu"] = pattern.states["relu"] * 2
    with pytest.raises(ValueError, match="replay called 'relu' 1 times"):
        apop.replay(type(pattern)(states=extra), x)
    pool_first = APOP(nn.Sequential(nn.MaxPool2d(2), nn.ReLU()))
    _, pattern = pool_first.record(torch.randn(2, 1, 4, 4))
    with pytest.raises(ValueError, match="max-pool pattern"):
        pool_first.replay(pattern, torch.randn(1, 1, 4, 4))


def test_apop_removes_its_hooks_when_the_forward_fails() -> None:
    """A11, A12: a record or replay that raises (here a wrong channel count) leaves no hook on the private copy,
    so the next call is not run through a stale recorder."""
    apop = APOP(TinyResNet().eval())
    x = torch.randn(1, 3, 32, 32)
    _, pattern = apop.record(x)
    for call in (
        lambda: apop.record(torch.randn(1, 4, 32, 32)),
        lambda: apop.replay(pattern, torch.randn(1, 4, 32, 32)),
    ):
        with pytest.raises(RuntimeError):
            call()
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in apop.model.modules())
    torch.testing.assert_close(apop.replay(pattern, x), apop.record(x)[0])


def test_apop_runs_a_training_mode_model_in_eval_mode_and_leaves_it_training() -> None:
    """A13, A14, A25: batch norm runs in eval mode (the module docstring) whatever mode the caller's model is in,
    the controls use the same eval copy, and the caller's model keeps its own mode."""
    torch.manual_seed(0)
    model = TinyResNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    logits, _ = APOP(model).record(x)
    assert model.training
    scores = apop_agreement(model, x)
    assert model.training
    reference = model.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(x))
    assert scores == apop_agreement(reference, x)


def test_apop_refuses_a_model_whose_only_gates_are_max_pools() -> None:
    """A17: with no ReLU / ReLU6 hooked there is no activation pattern to speak of (functional activations are
    invisible to hooks); a max-pool alone must not pass as one."""
    with pytest.raises(UnsupportedModelError, match=r"no nn\.ReLU"):
        APOP(nn.Sequential(nn.Conv2d(1, 1, 1), nn.MaxPool2d(2), nn.Flatten()))


def test_uninformative_inputs_are_zeros_and_seeded_noise() -> None:
    """A18, A28: "zeros" is the normalised zero (the mean colour), "noise" a draw that follows its seed."""
    x = torch.rand(2, 3, 4, 4) + 1.0
    assert torch.equal(uninformative(x, "zeros"), torch.zeros_like(x))
    a, b, c = (uninformative(x, "noise", seed) for seed in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))


def test_apop_zero_controls_use_a_zero_input() -> None:
    """A19: relu(diag(1, 3) x + (1, 0.5)): the zero input is class 0, the ones input class 1. Three of the four
    images are class 0, so plain_zeros is 3/4 (a ones input would give 1/4)."""
    net = nn.Sequential(_identity_linear((1.0, 0.5), [[1.0, 0.0], [0.0, 3.0]]), nn.ReLU())
    x = torch.tensor([[2.0, -2.0], [3.0, -3.0], [-2.0, 2.0], [4.0, -4.0]])  # classes 0, 0, 1, 0
    scores = apop_agreement(net, x)
    assert scores["plain_zeros"] == 0.75 and scores["pattern_zeros"] == 1.0


# -- TinyResNet and training -------------------------------------------------------------------------------------
def test_tiny_resnet_geometry_is_the_documented_one() -> None:
    """T01-T04, T08: stem /2 -> 48, max-pool /2 -> 24, layer2 12, layer3 6, layer4 6 (16 px cells for CAMs).
    Strides of parameter-free modules (and layer4's, whose 1x1 downsample exists either way) do not show in the
    checkpoint, so a changed geometry loads cleanly and changes every map. The record names the same
    widths and strides, and a net of other than four stages is refused when built, not at its first forward."""
    model = load_tiny_resnet()
    sizes: dict[str, tuple[int, ...]] = {}
    handles = [
        getattr(model, name).register_forward_hook(
            lambda m, a, o, name=name: sizes.__setitem__(name, tuple(o.shape[1:]))
        )
        for name in ("conv1", "maxpool", "layer1", "layer2", "layer3", "layer4")
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, 96, 96))
    finally:
        for handle in handles:
            handle.remove()
    assert sizes == {
        "conv1": (16, 48, 48),
        "maxpool": (16, 24, 24),
        "layer1": (16, 24, 24),
        "layer2": (32, 12, 12),
        "layer3": (64, 6, 6),
        "layer4": (128, 6, 6),
    }
    assert training_record()["architecture"] == {"name": "TinyResNet", "widths": list(WIDTHS), "strides": list(STRIDES)}
    with pytest.raises(ValueError, match="exactly four stages"):
        TinyResNet(widths=(8, 16, 32), strides=(1, 2, 2))


def test_train_defaults_are_the_committed_records() -> None:
    """R04, R09: ``python -m ierf.fidelity.train`` must reproduce the committed checkpoint; its curriculum and
    hyper-parameters are the ones the record says the checkpoint was trained with."""
    import inspect

    from ierf.fidelity.train import DEFAULT_STAGES, train

    record = training_record()["training"]
    assert record["stages"] == [dataclasses.asdict(stage) for stage in DEFAULT_STAGES]
    defaults = {k: p.default for k, p in inspect.signature(train).parameters.items()}
    assert (defaults["batch_size"], defaults["seed"], defaults["threads"]) == (
        record["batch_size"],
        record["seed"],
        record["threads"],
    )
    assert record["optimiser"].startswith(f"AdamW(lr={defaults['lr']}, weight_decay={defaults['weight_decay']})")


def test_accuracy_scores_a_training_mode_model_in_eval_mode(test_set: synthetic.SyntheticSet) -> None:
    """R03: batch statistics of a 16-image batch are not the model's; accuracy() evaluates in eval mode."""
    from ierf.fidelity.train import accuracy

    model = load_tiny_resnet()
    expected = accuracy(model, test_set)
    model.train()
    assert accuracy(model, test_set, batch_size=16) == expected
    assert not model.training


def test_training_is_reproducible_from_its_seed() -> None:
    """R05, R06: the seed decides the initial weights too (not only the batch order): two runs with one seed give
    the same weights whatever the global RNG held before. A stage's ``max_distractors`` reaches its data: the
    same run with distractors allowed trains on other images and ends elsewhere."""
    from ierf.fidelity.train import Stage, train

    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    try:
        torch.manual_seed(11)
        a, _ = train(stages=(Stage(96, 8, 1, 0),), n_test=4, batch_size=4, seed=3, log=False)
        torch.manual_seed(12)
        b, _ = train(stages=(Stage(96, 8, 1, 0),), n_test=4, batch_size=4, seed=3, log=False)
        c, _ = train(stages=(Stage(96, 8, 1, 2),), n_test=4, batch_size=4, seed=3, log=False)
    finally:
        torch.set_num_threads(threads)
        torch.random.set_rng_state(rng)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_training_fits_its_own_labels() -> None:
    """R10: each step's loss pairs every image with its own label. Eight images are learned in 15 steps (training
    accuracy 1.0 when measured; 0.375 with the labels shuffled against the batch), which the 3-step loss check,
    sitting at chance either way, cannot tell apart."""
    from ierf.fidelity.train import Stage, train

    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    try:
        _, record = train(stages=(Stage(96, 8, 15, 0),), n_test=8, batch_size=8, threads=1, log=False)
    finally:
        torch.set_num_threads(threads)
        torch.random.set_rng_state(rng)
    assert record["train_accuracy_96px"] >= 0.75
