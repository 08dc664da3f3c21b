"""Small random networks that together exercise every SRD rule (used by the reference tests)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters, so BN folding is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


class TinyVGG(nn.Module):
    """conv+bias / non-overlapping max-pool merged into the next conv / strided conv / GAP-linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 12, 3, padding=1),  # few input channels: the Gram path
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(12, 6, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(6, 6, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, skip_first: bool = False) -> None:
        super().__init__()
        self.skip_first = skip_first  # operand order of the residual add (paths are listed in that order)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = identity + out if self.skip_first else out + identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """BN folding, overlapping 3x3/s2 max-pool, residual with and without downsample, GAP-linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = Block(4, 8, 1, skip_first=True)  # 1x1 downsample read through the overlapping max-pool
        self.layer2 = Block(8, 8, 1)  # identity residual
        self.layer3 = Block(8, 6, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Mixed(nn.Module):
    """Dilation, groups, depthwise + ReLU6, TF-style asymmetric F.pad, linear bottleneck chain (two
    residual projections without activation), average pooling, channel concat, GELU/SiLU/Hardswish."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, stride=2, padding=(2, 3), dilation=2)  # few inputs: Gram path
        self.act0 = nn.GELU()
        self.grouped = nn.Conv2d(12, 6, 3, padding=1, groups=2, bias=False)
        self.bn_g = nn.BatchNorm2d(6)
        self.act1 = nn.SiLU()
        self.dw = nn.Conv2d(6, 6, 3, stride=2, groups=6, bias=False)  # padded by F.pad below
        self.bn_dw = nn.BatchNorm2d(6)
        self.act2 = nn.ReLU6()
        self.proj1 = nn.Conv2d(6, 4, 1, bias=False)
        self.bn_p1 = nn.BatchNorm2d(4)
        self.expand = nn.Conv2d(4, 8, 1, bias=False)
        self.bn_e = nn.BatchNorm2d(8)
        self.act3 = nn.Hardswish()
        self.proj2 = nn.Conv2d(8, 4, 1, bias=False)
        self.bn_p2 = nn.BatchNorm2d(4)
        self.pool = nn.AvgPool2d(2)
        self.side = nn.Conv2d(6, 3, 1)
        self.head_conv = nn.Conv2d(7, 8, 1)  # 1x1 after average pooling: folded by commuting
        self.act4 = nn.ReLU()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        a0 = self.act0(self.stem(x))
        a1 = self.act1(self.bn_g(self.grouped(a0)))
        a2 = self.act2(self.bn_dw(self.dw(F.pad(a1, (0, 1, 0, 1)))))
        x1 = self.bn_p1(self.proj1(a2))  # linear bottleneck: no activation
        a3 = self.act3(self.bn_e(self.expand(x1)))
        x2 = x1 + self.bn_p2(self.proj2(a3))  # residual of two projections
        pooled = self.pool(self.side(a2))  # avg-pool of a 1x1 conv
        cat = torch.cat([self.pool(x2), pooled], dim=1)  # concat of pooled maps
        a4 = self.act4(self.head_conv(cat))
        return self.fc(a4.mean((2, 3)))


class FCHead(nn.Module):
    """VGG-style head: max-pool, flatten, Linear-ReLU-Dropout-Linear (exact SRD through the head)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(4 * 4 * 5, 7), nn.ReLU(), nn.Dropout(), nn.Linear(7, 5))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class Composed(nn.Module):
    """Two spreading kernels without an activation between them (folded into one effective kernel),
    and a final conv + BN read by global average pooling without an activation (folded into the head)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2)
        self.act = nn.LeakyReLU(0.1)
        self.conv3 = nn.Conv2d(5, 6, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        a = self.act(self.conv2(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.bn3(self.conv3(a)), 1), 1))


class LinearNet(nn.Module):
    """No activation at all: SRD reduces to the exact additive decomposition of the logit."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


class SqueezeExcite(nn.Module):
    """Squeeze-excitation gates (one per channel) and a spatial gate (one per position), each computed from
    the map it gates, inside a residual block with BN: the gates are frozen at their value for the image."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(6)
        self.act0 = nn.SiLU()
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.act1 = nn.SiLU()
        self.squeeze = nn.Conv2d(6, 3, 1)
        self.act_s = nn.ReLU()
        self.excite = nn.Conv2d(3, 6, 1)
        self.gate = nn.Sigmoid()
        self.spatial = nn.Conv2d(6, 1, 3, padding=1)
        self.gate_s = nn.Hardsigmoid()
        self.proj = nn.Conv2d(6, 6, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        a = self.act0(self.bn0(self.stem(x)))
        h = self.act1(self.bn1(self.dw(a)))
        g = self.gate(self.excite(self.act_s(self.squeeze(h.mean((2, 3), keepdim=True)))))
        h = h * g
        h = self.gate_s(self.spatial(h)) * h  # a spatial gate computed from the map it gates, on the left
        out = self.act2(a + self.bn2(self.proj(h)))
        return self.fc(out.mean((2, 3)))


def _conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Inception(nn.Module):
    """GoogLeNet's block: four branches concatenated, the last max-pooling its input (3x3, stride 1)."""

    def __init__(self, cin: int, functional_pool: bool = False, pooled_kernel: int = 1) -> None:
        super().__init__()
        self.functional_pool = functional_pool
        self.branch1 = _conv_bn_relu(cin, 5, 1)
        self.branch2 = nn.Sequential(_conv_bn_relu(cin, 4, 1), _conv_bn_relu(4, 5, 3))
        self.branch3 = _conv_bn_relu(cin, 4, 3)
        self.pool = nn.MaxPool2d(3, 1, 1, ceil_mode=True)
        self.branch4 = _conv_bn_relu(cin, 4, pooled_kernel)

    def forward(self, x):
        pooled = F.max_pool2d(x, 3, 1, 1) if self.functional_pool else self.pool(x)
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(pooled)], 1)


class TinyGoogLeNet(nn.Module):
    """Max-pool of a max-pool: the first block's last branch pools the stem's pooled map, the second's pools
    a concatenation of pooled branches (paths are (first offset, second offset) pairs).

    A 3x3 stride-1 max-pool repeats its winners at neighbouring positions, and a 1x1 convolution of them
    gives equal PFVs: a later max-pool then has exact ties, which implementations may break differently
    (both answers valid). Here the first block convolves its pooled branch 3x3 so the reference comparison
    is tie-free; the second block's 1x1 after its pool is GoogLeNet's own pattern."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, 8, 3)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.block1 = Inception(8, pooled_kernel=3)
        self.pool2 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.block2 = Inception(18, functional_pool=True)
        self.fc = nn.Linear(18, 4)

    def forward(self, x):
        x = self.block1(self.pool1(self.stem(x)))
        return self.fc(self.block2(self.pool2(x)).mean((2, 3)))


class ChannelPicks(nn.Module):
    """torchvision's ``transform_input`` (each input channel picked, unsqueezed back, rescaled, and the three
    concatenated; here also reordered), and channel ranges of a PFV map feeding a convolution and the head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(5)
        self.fc = nn.Linear(7, 4)

    def forward(self, x):
        picks = [torch.unsqueeze(x[:, k], 1) * s for k, s in ((2, 0.5), (0, 1.5), (-2, -0.7))]
        h = self.act(self.conv1(torch.cat(picks, 1)))
        a = self.act(self.bn(self.conv2(h[:, 1:5])))
        return self.fc(torch.cat([a, h[:, -2:]], 1).mean((2, 3)))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's ShuffleNetV2 channel shuffle, op for op."""
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batch, channels, height, width)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's stride-1 unit: half the channels pass, the other half go through 1x1, depthwise 3x3 (no
    activation after it) and 1x1; both halves are concatenated and shuffled."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            _conv_bn_relu(half, half, 1),
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False),
            nn.BatchNorm2d(half),
            _conv_bn_relu(half, half, 1),
        )

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((x1, self.branch(x2)), 1), 2)


class TinyShuffleNet(nn.Module):
    """Channel chunks and shuffles: each path's channels move, its contribution must not. The last shuffle
    acts on a convolution's output before its activation (kernel taps, folded batch norm and biases move)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, 16, 3)
        self.unit1 = ShuffleUnit(16)
        self.unit2 = ShuffleUnit(16)
        self.mix = nn.Conv2d(16, 12, 3, padding=1)
        self.mix_bn = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        y = self.unit2(self.unit1(self.stem(x)))
        return self.fc(torch.relu(channel_shuffle(self.mix_bn(self.mix(y)), 4)).mean((2, 3)))


class BiasFork(nn.Module):
    """A biased map without an activation read by a spreading convolution, a 1x1 convolution and a skip,
    added, and by a side convolution concatenated to that sum, all before the next activation: its bias
    reaches the stage as four images, one per branch, which are one layer's bias shared among the paths
    of all four branches."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 5, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(5)
        self.act0 = nn.ReLU()
        self.mix = nn.Conv2d(5, 6, 1)
        self.bn_mix = nn.BatchNorm2d(6)
        self.spread = nn.Conv2d(6, 6, 3, padding=1)
        self.point = nn.Conv2d(6, 6, 1, bias=False)
        self.bn_point = nn.BatchNorm2d(6)
        self.side = nn.Conv2d(6, 2, (1, 3), padding=(0, 1))
        self.act1 = nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.bn_mix(self.mix(self.act0(self.bn0(self.stem(x)))))
        added = self.spread(y) + self.bn_point(self.point(y)) + y
        return self.fc(self.act1(torch.cat([added, self.side(y)], 1)).mean((2, 3)))


class SignedScaled(nn.Module):
    """The linear arithmetic written with operators rather than modules: an input normalisation
    ``(x - mean) / std``, a difference of two maps before an activation, a negated map, a learnt scale per
    channel (``y * gamma``, a layer scale) and a division by a number."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.a = nn.Conv2d(6, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(6)
        self.gamma = nn.Parameter(torch.linspace(-1.5, 2.0, 6).view(1, 6, 1, 1))
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = torch.relu(self.stem((x - self.mean) / self.std))
        y = torch.relu(self.a(y) - self.bn_b(self.b(y)) + y * self.gamma)
        return self.fc((-y / 2).mean((2, 3)))


def all_nets() -> dict[str, tuple[nn.Module, tuple[int, int]]]:
    """Name -> (float64 model in eval mode, input size (H, W)); sizes are non-square on purpose."""
    torch.manual_seed(0)
    nets = {
        "tiny_vgg": (TinyVGG(), (26, 30)),
        "tiny_resnet": (TinyResNet(), (11, 14)),
        "mixed": (Mixed(), (23, 30)),
        "fc_head": (FCHead(), (8, 10)),
        "composed": (Composed(), (11, 9)),
        "linear": (LinearNet(), (7, 9)),
        "squeeze_excite": (SqueezeExcite(), (9, 11)),
        "tiny_googlenet": (TinyGoogLeNet(), (12, 9)),
        "channel_picks": (ChannelPicks(), (7, 8)),
        "tiny_shufflenet": (TinyShuffleNet(), (6, 7)),
        "bias_fork": (BiasFork(), (7, 9)),
        "signed_scaled": (SignedScaled(), (8, 11)),
    }
    return {k: (randomise_bn(m).double(), hw) for k, (m, hw) in nets.items()}


class _WithModule(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.block = nn.Sequential(inner)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.block(self.act(self.conv(x))).mean((2, 3)))


class _Functional(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.fn = fn
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.fn(self.act(self.conv(x))).mean((2, 3)))


class _TwoSpreading(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.act(self.conv2(self.conv1(x))).mean((2, 3)))


class ConvHead(nn.Module):
    """The smallest net with one PFV boundary: conv, ReLU, pooled linear head; tests subclass it to vary the
    forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


class _TupleOut(ConvHead):
    def forward(self, x):
        a = self.act(self.conv(x)).mean((2, 3))
        return self.fc(a), a


NETS_FOR_ERRORS: dict[str, tuple[nn.Module, str]] = {
    # a product of a map with itself: no operand is a gate computed from the other
    "squared": (_Functional(lambda a: a * a).eval(), "product of two feature maps that is not a gate"),
    "pool_of_bias": (_Functional(lambda a: F.max_pool2d(F.avg_pool2d(a, 2), 2)).eval(), "an average pooling's"),
    "layernorm": (_WithModule(nn.LayerNorm([4, 14, 14])).eval(), r"no SRD rule for LayerNorm at module 'block\.0'"),
    "upsample": (_WithModule(nn.Upsample(scale_factor=2)).eval(), r"no SRD rule for Upsample at module 'block\.0'"),
    "softmax": (_Functional(lambda a: torch.softmax(a, 1)).eval(), r"no SRD rule for function softmax"),
    "slicing": (_Functional(lambda a: a[:, :, 1:]).eval(), r"indexing a feature map \(supported: a channel range"),
    "channel_groups_scaled": (
        _Functional(lambda a: a.view(a.shape[0], 2, 2, a.shape[2], a.shape[3]) * 2.0).eval(),
        r"viewed as \(B, groups, C/groups, H, W\) is only transposed",
    ),
    "recombined_biased_slices": (
        _Functional(lambda a: (lambda y: torch.cat([y[:, 2:], y[:, :2]], 1))(a + 1.0)).eval(),
        r"channel slices of one convolution's output, with its bias",
    ),
    "unsqueezed_range": (
        _Functional(lambda a: torch.cat([a[:, 0:2].unsqueeze(1).flatten(1, 2), a[:, 2:4]], 1)).eval(),
        r"unsqueeze\(1\) of a feature map",
    ),
    "channel_kept_3d": (_Functional(lambda a: a[:, 1] + a[:, 2]).eval(), r"removes the channel dimension"),
    "two_spreading": (_TwoSpreading().eval(), r"padded \(3, 3\) convolution directly after a \(3, 3\)"),
    "tuple_output": (_TupleOut().eval(), r"one logits tensor"),
}


def reference_relevance(ref, dec_ref: dict, target: int) -> torch.Tensor:
    """The reference's pixel relevance for one class, started from its exact head decomposition."""
    items = dec_ref["head_items"]
    n_taps = sum(c.shape[0] for _, _, c in items)
    seeds: dict[int, torch.Tensor] = {}
    for _, src, c in items:
        acc = seeds.setdefault(ref._sid(src), torch.zeros(c.shape[0], dtype=torch.float64))
        acc += c[:, target, 0] + dec_ref["head_bias"][target] / n_taps
    return ref.propagate(dec_ref, seeds)[0]


def assert_matches_reference(dec, ref, dec_ref: dict, targets, rel_tol: float, image: int = 0) -> None:
    """The fast pixel relevance of ``image`` for each target equals the reference's (``dec_ref`` decomposes
    that image alone), to ``rel_tol`` of the reference map's largest value; a float32 map is compared in float64."""
    for target in targets:
        fast = dec.relevance(target)[image].double()
        slow = reference_relevance(ref, dec_ref, target).view(fast.shape)
        torch.testing.assert_close(fast, slow, atol=rel_tol * slow.abs().max(), rtol=0)


def directional_derivatives(loss_at, x: torch.Tensor, direction: torch.Tensor, eps: float) -> tuple[float, float]:
    """d loss(x) / d x along ``direction`` twice: from autograd, and as a central difference of step ``eps``."""
    probe = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_at(probe), probe)
    with torch.no_grad():
        numeric = (loss_at(x + eps * direction) - loss_at(x - eps * direction)) / (2 * eps)
    return (grad * direction).sum().item(), numeric.item()


def positive_copy(model: nn.Module, swaps: dict[type | tuple[type, ...], type[nn.Module]]) -> nn.Module:
    """A float64 copy on which no path can cancel or switch off (for a theoretical receptive field): positive
    weights, zero biases and batch-norm means, average- instead of max-pooling, and each module of a type in
    ``swaps`` replaced by a new module of the mapped type."""
    pos_model = copy.deepcopy(model).double()
    for m in list(pos_model.modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.MaxPool2d):
                pool = nn.AvgPool2d(child.kernel_size, child.stride, child.padding, ceil_mode=child.ceil_mode)
                setattr(m, child_name, pool)
                continue
            for kinds, new in swaps.items():
                if isinstance(child, kinds):
                    setattr(m, child_name, new())
                    break
        if isinstance(m, nn.Conv2d | nn.Linear):
            m.weight.data = m.weight.data.abs() + 0.01
            if m.bias is not None:
                m.bias.data.zero_()
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.zero_()
            m.weight.data = m.weight.data.abs() + 0.01
            m.bias.data.zero_()
    return pos_model
