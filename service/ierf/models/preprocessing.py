"""Resize, centre-crop and normalise: the exact pixels a model and its explanation refer to.

Explanations are drawn on the cropped image, and cache keys include :attr:`Preprocessing.version`,
so every change to the pixel pipeline below must bump :data:`PIPELINE_VERSION`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ierf.images import PIPELINE_VERSION, ImageLike, resize_crop  # the version: beside the arithmetic it names


@dataclass(frozen=True)
class Preprocessing:
    """Short side resized to ``resize`` (PIL bilinear, antialiased), centre crop ``crop``² and
    ``(x_uint8 - mean) / std`` per channel, with mean/std in 0..255 pixel units.

    ImageNet mean/std (0.485, …)/(0.229, …) are stored multiplied by 255, which is the same affine map
    as torchvision's ``ToTensor`` followed by ``Normalize``.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tag: str  # names the normalisation in :attr:`version`

    @property
    def version(self) -> str:
        """Changes whenever the pixels handed to the model could change; part of cache keys."""
        return f"v{PIPELINE_VERSION}-r{self.resize}-c{self.crop}-{self.tag}"

    def resize_crop(self, image: ImageLike) -> np.ndarray:
        """uint8 (crop, crop, 3): the image the model sees, before normalisation.

        torchvision's ``Resize(resize)`` then ``CenterCrop(crop)`` on a PIL image. Portrait images are
        resized whole and then cropped: exactly torchvision's pixels. For landscape ones only the cropped
        columns are resampled (wide panoramas cost no memory), whose box's float offset rounds differently
        on under 0.5 % of pixels, by one intensity level; small images upscaled for 299² inputs by up to two
        levels (logits move by far less than the models' own float noise across devices).
        """
        return resize_crop(image, self.resize, self.crop)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) or (3, H, W) -> float32 model input on the same device; no resize/crop."""
        if not isinstance(pixels, torch.Tensor):
            raise TypeError(f"normalize expects a uint8 torch.Tensor, got {type(pixels).__name__}")
        if pixels.dtype != torch.uint8:
            raise TypeError(f"normalize expects dtype torch.uint8 (0..255 pixels), got {pixels.dtype}")
        if pixels.dim() not in (3, 4) or pixels.shape[-3] != 3:
            raise ValueError(f"normalize expects (B, 3, H, W) or (3, H, W), got {tuple(pixels.shape)}")
        mean = torch.tensor(self.mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
        return (pixels.to(torch.float32) - mean) / std

    def __call__(self, image: ImageLike) -> torch.Tensor:
        """PIL image or uint8 HxWx3 array -> float32 (3, crop, crop) on the CPU."""
        pixels = torch.from_numpy(self.resize_crop(image)).permute(2, 0, 1)
        return self.normalize(pixels).contiguous()


# EfficientNet-Lite (TF-Lite lineage): (x - 127) / 128, which scored better than ImageNet mean/std.
TF_LITE = Preprocessing(resize=256, crop=224, mean=(127.0,) * 3, std=(128.0,) * 3, tag="tf127")
IMAGENET = Preprocessing(
    resize=256,
    crop=224,
    mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
    std=(0.229 * 255, 0.224 * 255, 0.225 * 255),
    tag="imagenet",
)
IMAGENET_299 = Preprocessing(resize=342, crop=299, mean=IMAGENET.mean, std=IMAGENET.std, tag="imagenet")
# torchvision's second-generation ImageNet weights (IMAGENET1K_V2) were trained and evaluated at resize 232.
IMAGENET_V2 = Preprocessing(resize=232, crop=224, mean=IMAGENET.mean, std=IMAGENET.std, tag="imagenet")
