"""TinyResNet: a 0.3 M-parameter torchvision-style ResNet for the synthetic localisation set.

Built only from what real ResNets use (Conv2d, BatchNorm2d, ReLU, MaxPool2d, torchvision's
BasicBlock with its residual add, AdaptiveAvgPool2d, Linear) and with torchvision's module names
(``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1.0.conv1`` … ``fc``), so every explainer that
handles a torchvision ResNet handles it unchanged, and layer names read the same.

Geometry at the 96 px canvas: stem conv 3x3/2 -> 48, max-pool 3x3/2 -> 24, layer1 24, layer2 12,
layer3 6, layer4 6 (stride 1, so class-activation maps keep 16 px cells), GAP, fc.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

ASSETS = Path(__file__).resolve().parent / "assets"
CHECKPOINT = ASSETS / "tiny_resnet_synthetic.pt"
TRAINING_RECORD = ASSETS / "tiny_resnet_synthetic.json"

WIDTHS = (16, 32, 64, 128)
STRIDES = (1, 2, 2, 1)


class TinyResNet(nn.Module):
    """ResNet with one BasicBlock per stage; ``widths``/``strides`` per stage."""

    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, ...] = WIDTHS,
        strides: tuple[int, ...] = STRIDES,
    ) -> None:
        super().__init__()
        if len(widths) != 4 or len(strides) != 4:
            raise ValueError("TinyResNet has exactly four stages (layer1..layer4)")
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_ch = widths[0]
        for index, (width, stride) in enumerate(zip(widths, strides, strict=True), start=1):
            downsample = None
            if stride != 1 or in_ch != width:
                downsample = nn.Sequential(
                    nn.Conv2d(in_ch, width, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(width)
                )
            setattr(self, f"layer{index}", nn.Sequential(BasicBlock(in_ch, width, stride, downsample)))
            in_ch = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def random_tiny_resnet(seed: int = 0) -> TinyResNet:
    """The same architecture at random initialisation (the model-randomisation control), in eval mode."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = TinyResNet()
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


def load_tiny_resnet(path: str | Path = CHECKPOINT) -> TinyResNet:
    """The committed TinyResNet trained on the synthetic set (eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"TinyResNet checkpoint not found at {path}; train one with `python -m ierf.fidelity.train`"
        )
    model = TinyResNet()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def training_record(path: str | Path = TRAINING_RECORD) -> dict:
    """Seed, accuracy, timing and configuration of the committed checkpoint."""
    return json.loads(Path(path).read_text())
