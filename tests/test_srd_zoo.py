"""Architectures and custom-CNN spellings a vision researcher brings beyond the README's tested list: every
model must give a correct map (the float64 reference agrees, the map sums to the logit) or be refused with a
ValueError that names the op; the reference must decompose what the fast path does."""

from __future__ import annotations

import ierf
import pytest
import torch
import torch.nn.functional as F
import torchvision
from ierf.errors import UnsupportedModelError
from ierf.srd.reference import ReferenceSRD
from srd_nets import assert_matches_reference, randomise_bn, reference_relevance
from torch import nn


class _Spelled(nn.Module):
    """conv -> relu -> [spelling] -> relu -> mean -> linear, with the spelling chosen by name."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.c3 = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(6, 5)
        self.fc_flat = nn.Linear(24, 5)

    def _head(self, a: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.c3(a)).mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spelling
        a = F.relu(self.c1(x))
        if s == "conv_called_twice_in_one_stage":  # one biased module, two calls summed before the activation
            return self._head(F.relu(self.c2(a) + self.c2(F.relu(self.c2(a)))))
        if s == "linear_called_twice_in_the_head":  # one classifier on two pooled maps, logits summed
            return self.fc(a.mean((2, 3))) + self.fc(F.relu(self.c3(a)).mean((2, 3)))
        if s == "functional_conv2d_with_bias":
            return self._head(F.relu(F.conv2d(a, self.c2.weight, self.c2.bias, padding=1)))
        if s == "functional_linear":
            return F.linear(F.relu(self.c3(a)).mean((2, 3)), self.fc.weight, self.fc.bias)
        if s == "functional_batch_norm":
            y = F.batch_norm(self.c2(a), self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias)
            return self._head(F.relu(y))
        if s == "functional_max_pool_ceil_mode":
            return self._head(F.max_pool2d(a, 3, 2, ceil_mode=True))
        if s == "functional_max_pool_dilation":
            return self._head(F.max_pool2d(a, 2, 1, 0, 2))
        if s == "reshape_by_the_input_batch":
            return self.fc_flat(self.pool(F.relu(self.c3(a))).reshape(x.shape[0], -1))
        raise AssertionError(s)


@pytest.mark.parametrize(
    "spelling",
    [
        "conv_called_twice_in_one_stage",
        "linear_called_twice_in_the_head",
        "functional_conv2d_with_bias",
        "functional_linear",
        "functional_batch_norm",
        "functional_max_pool_ceil_mode",
        "functional_max_pool_dilation",
        "reshape_by_the_input_batch",
    ],
)
def test_the_reference_decomposes_functional_and_reused_layers_the_fast_path_supports(spelling: str) -> None:
    """ReferenceSRD is the audit oracle, but it measures biases only on modules (F.conv2d/F.linear/F.batch_norm
    biases ride along in its 'linear' copy), switches a reused module's bias on in every call while counting it
    once per call, drops F.max_pool2d's ceil_mode and dilation, and crashes on reshape(x.shape[0], -1). The
    fast path decomposes all of these exactly (it conserves, and equals the same model written with separate
    modules); the reference's maps did not even sum to the logit (up to 160x off for F.conv2d's bias)."""
    torch.manual_seed(0)
    model = randomise_bn(_Spelled(spelling)).double().eval()
    with torch.no_grad():
        model.c1.bias.fill_(2.0)  # every PFV live: conservation is exact
    x = torch.randn(1, 3, 12, 14, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dec = ierf.SRD(model, head="exact").decompose(x)
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(dec.relevance(2)[0].sum(), logits[0, 2], atol=1e-9, rtol=1e-9)
    ref = ReferenceSRD(model)
    dec_ref = ref.decompose(x)
    torch.testing.assert_close(reference_relevance(ref, dec_ref, 2).sum(), logits[0, 2], atol=1e-9, rtol=1e-9)
    assert_matches_reference(dec, ref, dec_ref, (0, 2), 1e-9)


class _Keyword(nn.Module):
    """Legal PyTorch calls that pass the map by keyword (input=/other=) or write into out=."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spelling
        a = F.relu(self.c1(x))
        y = self.c2(a)
        if s == "add_input_other":
            y = torch.add(input=y, other=a)
        elif s == "mul_other":
            y = torch.mul(y, other=0.5)
        elif s == "method_add_other":
            y = y.add(other=a)
        elif s == "sigmoid_input":
            return self.fc(torch.sigmoid(input=y).mean((2, 3)))
        elif s == "conv2d_input":
            y = F.conv2d(input=a, weight=self.c2.weight, bias=self.c2.bias, padding=1)
        elif s == "mean_input":
            return self.fc(torch.mean(input=F.relu(y), dim=(2, 3)))
        elif s == "add_out":
            torch.add(y, a, out=y)
        elif s == "mul_out":
            torch.mul(y, 0.5, out=y)
        return self.fc(F.relu(y).mean((2, 3)))


@pytest.mark.parametrize(
    ("spelling", "op"),
    [
        ("add_input_other", "add"),
        ("mul_other", "mul"),
        ("method_add_other", "add"),
        ("sigmoid_input", "sigmoid"),
        ("conv2d_input", "conv2d"),
        ("mean_input", "mean"),
        ("add_out", "add"),
        ("mul_out", "mul"),
    ],
)
def test_keyword_arguments_are_decomposed_or_refused_by_name_not_crashed_on(spelling: str, op: str) -> None:
    """Every rule is called with the node's kwargs spliced in, so torch.add(input=y, other=a), y.mul(other=c),
    torch.sigmoid(input=y), F.conv2d(input=...) or out=y crash with 'TypeError: _add_function() got an
    unexpected keyword argument' from inside ierf/srd (at the first decomposition, after SRD() accepted the
    model). They are the model's own legal arithmetic: decompose them (normalise the arguments), or refuse
    with an UnsupportedModelError naming the op (out=)."""
    torch.manual_seed(0)
    model = _Keyword(spelling).double().eval()
    x = torch.randn(2, 3, 8, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    try:
        dec = ierf.SRD(model, head="exact").decompose(x)
    except UnsupportedModelError as e:
        assert op in str(e), str(e)
        return
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(dec.relevance(1).sum((1, 2)), logits[:, 1], atol=1e-9, rtol=1e-9)


class _GrayStem(nn.Module):
    """An RGB model that turns its input grey first (x.mean(1, keepdim=True)) and runs a 1-channel stem."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.stem(x.mean(1, keepdim=True))).mean((2, 3)))


def test_an_rgb_model_with_a_grey_stem_is_not_told_its_input_has_the_wrong_channel_count() -> None:
    """The model takes (B, 3, H, W) (it cannot take anything else), yet decompose refuses it with 'x must have 1
    channels, got 3': the input-channel check reads the first convolution's in_channels and knows only
    indexing/cat/chunk/split as channel-changing ops. A channel mean is affine (it could be decomposed); at
    least the refusal must name the op the model really uses, not blame the caller's correct input."""
    torch.manual_seed(0)
    model = _GrayStem().eval()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
    try:
        dec = ierf.SRD(model, head="exact").decompose(x)
    except ValueError as e:
        assert "channels, got 3" not in str(e), f"a correct 3-channel input was blamed: {e}"
        assert "mean" in str(e), str(e)
        return
    torch.testing.assert_close(dec.saliency(1).sum(), logits[0, 1], atol=1e-5, rtol=1e-5)


class _DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(F.relu(self.conv(x)).mean((2, 3)))}


def test_a_model_returning_a_dict_is_refused_naming_the_dict_not_an_fx_internal_type() -> None:
    """Models returning {'logits': ...} (and torchvision's segmentation models, OrderedDict) are refused with
    'the model must return one logits tensor, got immutable_dict': a torch.fx internal type name, no keys and
    no way round. Say it returned a dict, name its keys, and say to wrap the model so forward returns one."""
    model = _DictOut().eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(UnsupportedModelError) as info:
        ierf.SRD(model).decompose(x)
    msg = str(info.value)
    assert "immutable" not in msg, msg
    assert "'logits'" in msg and "wrap" in msg, msg


def test_a_vision_transformer_is_refused_for_what_it_lacks_not_for_a_permute() -> None:
    """README (Limits): attention and LayerNorm have no rules yet. A ViT is refused with 'no SRD rule for method
    .permute() in the model's top-level forward' (its patch reshaping), which sends the user to rewrite a
    permute; name the missing rule (LayerNorm / attention) as the README does for ConvNeXt."""
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=5
    ).eval()
    with pytest.raises(UnsupportedModelError, match=r"(?i)layernorm|attention"):
        ierf.SRD(model)


class _ScaledByVector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.register_buffer("gamma", torch.linspace(0.5, 2.0, 6))
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x) * self.gamma).mean((2, 3)))


def test_refusing_a_c_shaped_factor_on_a_map_does_not_recommend_that_same_shape() -> None:
    """x * gamma with gamma of shape (C,) on a (B, C, H, W) map broadcasts along the width (PyTorch aligns
    trailing dimensions), so refusing it is right; but the message then says the supported forms are 'one factor
    per channel such as (C,) or (1, C, 1, 1)', i.e. the very shape just refused. For a map, suggest
    gamma.view(1, -1, 1, 1) / (C, 1, 1)."""
    model = _ScaledByVector().eval()
    x = torch.randn(1, 3, 6, 6)  # W == C, so the model itself runs
    with pytest.raises(UnsupportedModelError) as info:
        ierf.SRD(model).decompose(x)
    msg = str(info.value)
    assert "(6,)" in msg, msg
    assert "(C,)" not in msg, f"the refused shape is offered as the supported form: {msg}"


class _LayerNormBehindPermute(nn.Module):
    """ConvNeXt's spelling: channels-last LayerNorm between two permutes (the first refused op is the permute)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(F.relu(y).mean((2, 3)))


def test_a_cnn_with_layer_norm_is_told_what_it_lacks_beside_the_op_refused_first() -> None:
    """Without attention too: a LayerNorm alone (ConvNeXt's blocks) is a layer SRD has no rule for, and the
    refusal of the permute in front of it says so."""
    with pytest.raises(UnsupportedModelError) as info:
        ierf.SRD(_LayerNormBehindPermute().eval()).decompose(torch.randn(1, 3, 8, 8))
    msg = str(info.value)
    assert "permute" in msg and "the model also has LayerNorm" in msg, msg


def test_out_is_refused_as_a_write_into_a_tensor_not_as_an_argument_to_pass_positionally() -> None:
    """torch.add(y, a, out=y) cannot be passed positionally: the refusal says to use the returned value."""
    with pytest.raises(UnsupportedModelError) as info:
        ierf.SRD(_Keyword("add_out").double().eval()).decompose(torch.randn(1, 3, 8, 9, dtype=torch.float64))
    msg = str(info.value)
    assert "out=" in msg and "returned value" in msg and "positionally" not in msg, msg
