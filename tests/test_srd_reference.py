"""The fast SRD path against the brute-force float64 reference, and SRD's invariants (spec §2.6)."""

from __future__ import annotations

import copy
from pathlib import Path

import ierf
import pytest
import torch
import torchvision
from ierf.srd import fused, gemm, ratios
from ierf.srd.reference import ReferenceSRD
from ierf.srd.rules import is_activation
from srd_nets import all_nets, assert_matches_reference, positive_copy, randomise_bn, reference_relevance
from torch import nn

NETS = all_nets()


def _input(name: str, seed: int = 1) -> torch.Tensor:
    _, hw = NETS[name]
    return torch.randn(1, 3, *hw, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def references() -> dict[str, tuple[ReferenceSRD, dict]]:
    out = {}
    for name, (model, _) in NETS.items():
        ref = ReferenceSRD(model)
        out[name] = (ref, ref.decompose(_input(name)))
    return out


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("layout", ["auto", "wide", "fused"])
def test_saliency_matches_reference(name, layout, references, monkeypatch):
    if layout == "wide":  # stride-1 kernels through the wide tap layout even on these small maps
        monkeypatch.setattr(ratios, "WIDE_MAX_WASTE", float("inf"))
        monkeypatch.setattr(ratios, "WIDE_MIN_ROWS", 0)
    if layout == "fused":  # stage statistics through the compiled fusion (IERF_FUSED=1)
        if not fused._compiler_available():
            pytest.skip("no C++ compiler for Inductor")
        if name in ("tiny_googlenet", "channel_picks", "tiny_shufflenet", "bias_fork", "signed_scaled"):
            # graph-rule nets: their stages are shapes the other nets already fuse (new arities compile ~70 s);
            # a bias that is a map (bias_fork's merged images) keeps its stage on the eager path
            pytest.skip("covered by the other nets")
        monkeypatch.setenv(fused.ENV_SWITCH, "1")
    model, _ = NETS[name]
    x = _input(name)
    ref, dec_ref = references[name]
    dec = ierf.SRD(model, head="exact").decompose(x)
    for target in (0, 3):
        fast = dec.relevance(target)[0]
        slow = reference_relevance(ref, dec_ref, target).view(fast.shape)
        scale = slow.abs().max()
        torch.testing.assert_close(fast, slow, atol=1e-5 * scale, rtol=0)
        # conservation: the pixel map sums to the target logit
        torch.testing.assert_close(fast.sum(), dec.logits[0, target], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", list(NETS))
def test_ierf_matches_reference_at_every_layer(name, references):
    model, _ = NETS[name]
    x = _input(name)
    ref, dec_ref = references[name]
    srd = ierf.SRD(model)
    dec = srd.decompose(x)
    for layer in srd.layers:
        shape = dec.layer_shape(layer)
        h, w = (shape[1], shape[2]) if len(shape) == 3 else (1, 1)
        positions = torch.tensor(sorted({(0, 0), (h // 2, w // 2), (h - 1, w - 1)}))
        fast = dec.ierf(layer, positions).double()[0]
        sid = srd.program.source_id(layer)
        for i, (r, c) in enumerate(positions.tolist()):
            seed = torch.zeros(h * w, dtype=torch.float64)
            seed[r * w + c] = 1
            slow = ref.propagate(dec_ref, {sid: seed})[0].view(fast.shape[1:])
            torch.testing.assert_close(fast[i], slow, atol=1e-5 * slow.abs().max() + 1e-7, rtol=0)


def test_a_path_that_contributes_nothing_carries_no_bias():
    """Dead PFVs (all channels zero) feeding a single-path 1x1 stage with a bias: z there is the bias alone,
    nobody can carry it, so the ratio is 0 (published rule) and the fast path agrees with the reference."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, 1), nn.ReLU(),
        nn.Conv2d(6, 5, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    ).double().eval()  # fmt: skip
    with torch.no_grad():
        model[0].bias.fill_(-0.5)  # with a zero input patch, every channel of the first map is dead there
        model[2].bias.copy_(torch.linspace(0.2, 1.0, 6, dtype=torch.float64))
    x = torch.randn(1, 3, 9, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x[:, :, 2:7, 3:8] = 0
    dead = (model[1](model[0](x))[0] == 0).all(0)
    assert int(dead.sum()) >= 4
    dec = ierf.SRD(model, head="exact").decompose(x)
    second = dec.stages[1]  # conv 1x1 + bias after the first activation: one path per position
    assert second.mu.shape[1] == 1
    assert bool((second.mu[0, 0][dead] == 0).all()) and bool((second.mu[0, 0][~dead] == 1).all())
    ref = ReferenceSRD(model)
    assert_matches_reference(dec, ref, ref.decompose(x), (0, 2), 1e-5)


@pytest.mark.parametrize("name", list(NETS))
def test_reference_ratios_of_each_pfv_sum_to_one(name, references):
    _, dec_ref = references[name]
    for stage in dec_ref["stages"]:
        total = sum(mu.sum(0) for mus in stage.ratios.values() for mu in mus)
        carried = (stage.z * stage.z).sum(0) > 0
        torch.testing.assert_close(total[carried], torch.ones_like(total[carried]), atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", list(NETS))
def test_fast_ratios_of_each_pfv_sum_to_one(name):
    model, _ = NETS[name]
    dec = ierf.SRD(model).decompose(_input(name, seed=5))
    for stage in dec.stages:
        total = stage.mu.sum(1)
        ones = (total - 1).abs() < 1e-9
        zeros = total.abs() < 1e-12  # all-zero pre-activation PFVs get ratio 0 (spec §9.2)
        assert bool((ones | zeros).all()), f"stage {stage.sink}: ratios sum to {total.unique()[:5]}"
        assert ones.float().mean() > 0.5


@pytest.mark.parametrize("name", list(NETS))
def test_conservation_at_every_layer(name):
    model, _ = NETS[name]
    srd = ierf.SRD(model, head="exact")
    dec = srd.decompose(_input(name, seed=2))
    logit = dec.logits[0, 1]
    start = dec._start(dec._targets(1), "identity", "exact")
    before = {k: v.clone() for k, v in start.items()}
    for layer in srd.layers:
        # relevance on the frontier below `layer` (that map plus any maps skips reach) sums to the logit
        frontier = dec.frontier(start, srd.program.source_id(layer))
        torch.testing.assert_close(sum(r.sum() for r in frontier.values()), logit, atol=1e-9, rtol=1e-9)
    for k, v in before.items():  # a head reading two maps (channel_picks) used to get its start map added to
        torch.testing.assert_close(start[k], v, atol=0, rtol=0)


def _receptive_field(model: nn.Module, layer: str, position: tuple[int, int], x: torch.Tensor) -> torch.Tensor:
    """Theoretical receptive field: gradient support of the PFV on a copy with positive weights, identity
    activations (also after a subtraction, which can turn a positive map negative) and average- instead of
    max-pooling (so no path can cancel or switch off)."""
    # no clamp or dip on positive values
    pos_model = positive_copy(model, {(nn.ReLU6, nn.Hardswish, nn.Hardtanh): nn.ReLU})
    srd = ierf.SRD(pos_model)
    node = srd.program.node_of[srd.program.source_id(layer)]
    gm = torch.fx.GraphModule(pos_model, srd.program.graph)
    # positive input: no unit is switched off; small, so no gate's sigmoid saturates to a zero gradient
    x = torch.full_like(x, 1e-3, requires_grad=True)
    interp = torch.fx.Interpreter(gm)
    env_out = {}

    def run_node(n, orig=interp.run_node):
        module = gm.get_submodule(n.target) if n.op == "call_module" else None
        v = interp.env[n.args[0]] if is_activation(n, module) else orig(n)
        env_out[n] = v
        return v

    interp.run_node = run_node
    interp.run(x)
    out = env_out[node]
    value = out[0, :, position[0], position[1]].sum() if out.dim() == 4 else out[0].sum()
    (grad,) = torch.autograd.grad(value, x)
    return grad[0].abs().sum(0) > 0


@pytest.mark.parametrize("name", list(NETS))
def test_ierf_has_mass_one_and_stays_inside_the_receptive_field(name):
    model, _ = NETS[name]
    x = _input(name, seed=3)
    srd = ierf.SRD(model)
    dec = srd.decompose(x)
    proper = 0  # (layer, position) pairs whose receptive field leaves part of the input out
    for layer in srd.layers:
        shape = dec.layer_shape(layer)
        h, w = (shape[1], shape[2]) if len(shape) == 3 else (1, 1)
        for pos in sorted({(h // 2, w // 2), (0, 0), (h - 1, w - 1)}):
            erf = dec.ierf(layer, torch.tensor([pos])).double()[0, 0]
            assert abs(float(erf.sum()) - 1) < 1e-5
            rf = _receptive_field(model, layer, pos, x)
            assert bool((erf[~rf] == 0).all()), f"{layer} {pos}: nonzero iERF outside the receptive field"
            proper += int(rf.sum() < rf.numel())
    if name != "linear":  # a fully connected model: every PFV sees the whole input
        assert proper > 0, "no PFV here has a receptive field smaller than the input: the check tests nothing"


def test_linear_network_is_the_exact_additive_decomposition():
    model, _ = NETS["linear"]
    x = _input("linear", seed=4).requires_grad_(True)
    target = 2
    logit = model(x)[0, target]
    (grad,) = torch.autograd.grad(logit, x)
    bias_total = model(torch.zeros_like(x))[0, target]
    expected = (grad * x).sum(1)[0].detach() + bias_total.detach() / x[0, 0].numel()
    got = ierf.SRD(model).decompose(x.detach()).relevance(target)[0]
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


def test_resnet_top_map_is_cam_plus_bias_share():
    model = randomise_bn(torchvision.models.resnet18(), seed=1).double()
    x = torch.randn(1, 3, 64, 80, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    srd = ierf.SRD(model)
    dec = srd.decompose(x, keep=["layer4"])
    act = dec.activations[srd.program.source_id("layer4")][0]  # (C, h, w)
    y = 7
    cam = torch.einsum("c,chw->hw", model.fc.weight[y], act) / act[0].numel()
    expected = cam + model.fc.bias[y] / act[0].numel()
    torch.testing.assert_close(dec.layer_relevance("layer4", y)[0], expected, atol=1e-10, rtol=1e-10)


def test_contrast_rules():
    model, _ = NETS["tiny_resnet"]
    dec = ierf.SRD(model).decompose(_input("tiny_resnet", seed=6))
    mean = dec.relevance(1, contrast="mean")
    assert abs(float(mean.sum())) < 1e-9
    versus = dec.relevance(1, contrast=4)
    torch.testing.assert_close(versus, dec.relevance(1) - dec.relevance(4), atol=1e-12, rtol=0)


FIXTURE = Path(__file__).parent / "fixtures" / "official_srd_resnet50_96.pt"


def test_parity_with_the_published_code():
    """Maps of the published SRD code (run once, stored in the fixture; see its 'note') on a seeded ResNet50."""
    data = torch.load(FIXTURE, weights_only=True)
    torch.manual_seed(0)
    model = randomise_bn(torchvision.models.resnet50(), seed=3)
    dec = ierf.SRD(model).decompose(data["x"])
    torch.testing.assert_close(dec.logits, data["logits"], atol=1e-3, rtol=1e-5)
    for key, target, contrast in (
        ("srd_13", 13, "identity"),
        ("srd_500", 500, "identity"),
        ("srd_13_mean", 13, "mean"),
    ):
        ours, theirs = dec.saliency(target, contrast)[0], data[key]
        rel = float((ours - theirs).abs().max() / theirs.abs().max())
        # the issue asks for 1e-3; the maps agree to ~5e-6 (float32), so a smaller rule change would show
        assert rel < 5e-5, f"{key}: relative difference {rel:.2e}"


def test_state_dict_round_trip_gives_identical_maps():
    model, _ = NETS["mixed"]
    srd = ierf.SRD(model)
    dec = srd.decompose(_input("mixed"))
    again = srd.load_decomposition(dec.state_dict())
    torch.testing.assert_close(again.relevance(3), dec.relevance(3), atol=0, rtol=0)
    torch.testing.assert_close(
        again.ierf("act2", torch.tensor([[1, 2]])), dec.ierf("act2", torch.tensor([[1, 2]])), atol=0, rtol=0
    )


def test_a_state_is_checked_against_the_layout_of_another_decomposition_of_the_model():
    """The layout depends on the model and input size only: one decomposition describes another image's,
    and a state of another size, with a missing stage, a moved route or a NaN ratio is refused by name."""
    model, _ = NETS["mixed"]
    srd = ierf.SRD(model)
    x = _input("mixed")
    layout = ierf.StateLayout.of(srd.decompose(x))
    other = srd.decompose(torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype))
    state = other.state_dict()
    torch.testing.assert_close(srd.load_decomposition(state, like=layout).relevance(3), other.relevance(3))

    other_size = srd.decompose(torch.randn(1, 3, x.shape[2] + 4, x.shape[3], dtype=x.dtype)).state_dict()
    with pytest.raises(ValueError, match="'shapes': its structure differs"):
        layout.check(other_size)
    missing = {k: v for k, v in state.items() if k != "stage.0.mu"}
    with pytest.raises(ValueError, match=r"missing \['stage.0.mu'\]"):
        srd.load_decomposition(missing, like=layout)
    moved = dict(state)
    moved["stage.1.routes"] = state["stage.1.routes"].clone()
    moved["stage.1.routes"][0, 3] += 1
    with pytest.raises(ValueError, match=r"'stage\.1\.routes': its structure differs"):
        layout.check(moved)
    poisoned = dict(state)
    poisoned["head.contrib"] = state["head.contrib"].clone()
    poisoned["head.contrib"].view(-1)[0] = float("inf")
    with pytest.raises(ValueError, match=r"'head\.contrib': holds NaN or infinite"):
        layout.check(poisoned)
    with pytest.raises(ValueError, match="dict of tensors"):
        layout.check([state])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        "mobilenet_v2",
        "mobilenet_v3_small",
        "shufflenet_v2_x0_5",
        "googlenet",
        "googlenet_transform_input",
        "efficientnet_b0",
    ],
)
def test_torchvision_architectures_match_the_reference(name):
    """Whole torchvision networks (random weights, float64, 32x32: the last maps are 1x1 or 2x2) against the
    reference, so the architectures the README names are checked, not only the small nets. Their in-place
    activations (ReLU6, Hardswish, SiLU) used to overwrite the reference's pre-activations: MobileNetV2
    then differed by 23 % while both conserved. GoogLeNet's transform_input (as its ImageNet weights run)
    adds constants, which the reference used to put into every path: 84 % off."""
    torch.manual_seed(0)
    extra = {"aux_logits": False, "init_weights": True} if name.startswith("googlenet") else {}
    if name == "googlenet_transform_input":
        name, extra = "googlenet", {**extra, "transform_input": True}
    model = randomise_bn(getattr(torchvision.models, name)(num_classes=5, **extra)).double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dec = ierf.SRD(model, head="exact").decompose(x)
    ref = ReferenceSRD(model)
    assert_matches_reference(dec, ref, ref.decompose(x), (0, 3), 1e-6)


def test_the_reference_is_blind_to_in_place_activations():
    """The reference records every node's value; an in-place activation must not overwrite the one before it."""
    torch.manual_seed(0)

    def net(inplace: bool) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 6, 3, 2, 1), nn.BatchNorm2d(6), nn.ReLU6(inplace=inplace),
            nn.Conv2d(6, 6, 3, padding=1), nn.Hardswish(inplace=inplace),
            nn.Conv2d(6, 6, 1), nn.SiLU(inplace=inplace),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
        )  # fmt: skip

    plain = randomise_bn(net(False)).double().eval()
    in_place = net(True).double().eval()
    in_place.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 9, 10, dtype=torch.float64)
    maps = []
    for model in (plain, in_place):
        ref = ReferenceSRD(model)
        maps.append(reference_relevance(ref, ref.decompose(x), 2))
    torch.testing.assert_close(maps[1], maps[0], rtol=0, atol=0)
    fast = ierf.SRD(in_place, head="exact").decompose(x).relevance(2)[0]
    torch.testing.assert_close(fast, maps[0].view(fast.shape), atol=1e-6 * maps[0].abs().max(), rtol=0)


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("library", gemm.BACKENDS)
def test_float32_maps_match_reference_on_either_library(name, library, references, monkeypatch):
    """In float32 the products run in BLAS or oneDNN, whichever is faster on the host (ierf.srd.gemm):
    both give the reference's maps to float32 precision, with stride-1 kernels in the wide (BLAS) or
    shifted (oneDNN) layout even on these small maps."""
    monkeypatch.setattr(gemm, "_choice", library)
    monkeypatch.setattr(ratios, "WIDE_MAX_WASTE", float("inf"))
    monkeypatch.setattr(ratios, "WIDE_MIN_ROWS", 0)
    model, _ = NETS[name]
    ref, dec_ref = references[name]
    dec = ierf.SRD(copy.deepcopy(model).float(), head="exact").decompose(_input(name).float())
    assert_matches_reference(dec, ref, dec_ref, (0, 3), 2e-5)


@pytest.mark.parametrize("name", list(NETS))
def test_a_batch_gives_each_image_its_own_map(name):
    """Two images decomposed together, each with its own target, give the maps of each image decomposed
    alone: ratios, max-pool winners, gates and the head's bias are per image (a slip reading image 0's
    winners or its target's bias for the whole batch leaves maps that look right for the first image)."""
    model, _ = NETS[name]
    x = torch.cat([_input(name, seed=7), _input(name, seed=8)])
    dec = ierf.SRD(model, head="exact").decompose(x)
    batch = dec.relevance(torch.tensor([0, 3]))
    for i, target in enumerate((0, 3)):
        alone = ierf.SRD(model, head="exact").decompose(x[i : i + 1]).relevance(target)[0]
        torch.testing.assert_close(batch[i], alone, atol=1e-10 * float(alone.abs().max()), rtol=0)


class _TiedConv(nn.Module):
    """One convolution module applied to two maps of the same shape, each application with its own batch norm,
    the two summed: same kernel, two output scales in one stage."""

    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.stem_a = nn.Conv2d(3, 4, 3, padding=1)
        self.stem_b = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 6, kernel, padding=kernel // 2, bias=False)
        self.bn_a, self.bn_b = nn.BatchNorm2d(6), nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.relu(self.stem_a(x)), self.relu(self.stem_b(x))
        y = self.relu(self.bn_a(self.conv(a)) + self.bn_b(self.conv(b)))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("kernel", [3, 1])  # joint tap products / the shared 1x1 kernel
def test_a_kernel_shared_by_two_paths_keeps_each_path_s_output_scale(kernel: int) -> None:
    """Two paths through one convolution module whose batch norms differ: taps formed jointly for a shared
    kernel (3x3) or the shared-kernel statistics (1x1) must still scale each path by its own batch norm, not
    the first path's, or the map is silently wrong."""
    torch.manual_seed(0)
    model = randomise_bn(_TiedConv(kernel), seed=2).double().eval()
    x = torch.randn(1, 3, 8, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    dec = ierf.SRD(model, head="exact").decompose(x)
    ref = ReferenceSRD(model)
    assert_matches_reference(dec, ref, ref.decompose(x), (0, 2), 1e-6)


@pytest.mark.parametrize("name", list(NETS))
def test_stages_split_by_the_tap_budget_give_the_same_maps(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch over TAP_BUDGET_BYTES is decomposed a few images at a time: each slice must be a bundle of its
    own batch size (stages assembled from channel slices, e.g. torch.cat, size z by it), and the maps equal
    the unsplit batch's on every architecture, not only plain residual stages."""
    model, hw = NETS[name]
    x = torch.randn(3, 3, *hw, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    whole = ierf.SRD(model).saliency(x, 1)
    monkeypatch.setattr(ratios, "TAP_BUDGET_BYTES", 1)  # one image at a time
    split = ierf.SRD(model).saliency(x, 1)
    torch.testing.assert_close(split, whole, atol=1e-10, rtol=1e-10)


def test_readme_counts_the_small_networks_compared_with_the_reference() -> None:
    """README (Correctness) says the fast path is compared with the reference "on eleven small networks
    covering every rule"; ``all_nets()`` holds twelve since ``signed_scaled`` joined. A reader counting the
    guarantee should get the number the suite runs."""
    import re

    words = {"ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15}
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    found = re.search(r"compare the fast path with it on (\w+) small networks", readme)
    assert found, "README no longer states how many small networks are compared with the reference"
    stated = words.get(found.group(1)) or int(found.group(1))
    assert stated == len(NETS), f"README says {found.group(1)}, all_nets() has {len(NETS)}: {sorted(NETS)}"
