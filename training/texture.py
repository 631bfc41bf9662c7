"""A texture loss on the frozen ImageNet EfficientNet-Lite0 that the projected discriminator uses (the train extra):
each painting G(x) should have the feature statistics of a painting, not only its colours.

For every image, at full and half size, the four feature stages of the network are smoothed with a softmax
over channels at each position (after Wang, Li and Vasconcelos, "Rethinking and Improving the Robustness of
Image Style Transfer", CVPR 2021: without it, a network other than VGG stylises poorly, its activations being
too peaky), then summarised by each channel's mean and standard deviation over the image. The loss is the mean
absolute difference of those statistics between G(x) and a randomly drawn painting per sample (the batch's
paintings, which the loader draws at random). The network stays frozen: the gradient reaches G alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.projected import FrozenFeatures

TEXTURE_SCALES = (1.0, 0.5)


class TextureLoss(nn.Module):
    """``loss(fakes, paintings)``: images in [-1, 1], (N, 3, H, W) both, paired sample by sample."""

    def __init__(self, features: FrozenFeatures | None = None, scales: tuple[float, ...] = TEXTURE_SCALES,
                 temperature: float = 1.0):
        super().__init__()
        self.features = features if features is not None else FrozenFeatures()
        self.scales, self.temperature = scales, temperature

    def statistics(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per stage and scale, each channel's mean and standard deviation of the smoothed features: (N, 2C)."""
        out = []
        for scale in self.scales:
            # the antialiased resize has no bf16 kernel on CPU: under autocast, the fakes arrive in bf16
            y = x if scale == 1.0 else F.interpolate(x.float(), scale_factor=scale, mode="bilinear", align_corners=False,
                                                      antialias=True)
            for f in self.features(y):
                c = f.shape[1]
                smooth = torch.softmax(f.float() / self.temperature, dim=1) * c  # 1 where all channels are equal
                out.append(torch.cat([smooth.mean((2, 3)), smooth.std((2, 3), correction=0)], dim=1))
        return out

    def forward(self, fakes: torch.Tensor, paintings: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.statistics(paintings)
        return torch.stack([F.l1_loss(got, want) for got, want in zip(self.statistics(fakes), target)]).mean()
