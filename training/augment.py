"""DiffAugment (Zhao et al., 2020): differentiable augmentations applied to every image the
discriminator sees, real and fake alike, in both the D and the G step.

With only ~270 paintings the discriminator memorises the training set within a few thousand steps;
augmenting what it sees (and back-propagating through the augmentation into G) keeps it honest
without leaking the augmentation into G's outputs. Images are in [-1, 1], NCHW or channels-last.

The per-part functions below are a port of mit-han-lab/data-efficient-gans' ``DiffAugment_pytorch.py`` and
stay as the reference. ``DiffAugment`` computes the same images, from the same random draws in the same
order, in fewer and larger kernels (issue 35: a training step on a GPU is bound by its kernel launches):
the three colour parts as one affine map (two means and one fused multiply-add over the image), and
translation with cutout as one gather from the zero-padded image (a cut-out pixel reads a padding zero),
whose backward is one scatter-add instead of advanced indexing's index-put.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rand_brightness(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device) - 0.5)


def rand_saturation(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device) * 2) + mean


def rand_contrast(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device) + 0.5) + mean


def rand_translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ``ratio`` of its size, filling with zeros."""
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = torch.randint(-sh, sh + 1, size=[n, 1, 1], device=x.device)
    tx = torch.randint(-sw, sw + 1, size=[n, 1, 1], device=x.device)
    gb, gy, gx = torch.meshgrid(torch.arange(n, device=x.device), torch.arange(h, device=x.device),
                                torch.arange(w, device=x.device), indexing="ij")
    gy = torch.clamp(gy + ty + 1, 0, h + 1)
    gx = torch.clamp(gx + tx + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1])
    return padded.permute(0, 2, 3, 1)[gb, gy, gx].permute(0, 3, 1, 2)


def rand_cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Zero one square of ``ratio`` of the image's size at a random place in each image."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    oy = torch.randint(0, h + (1 - ch % 2), size=[n, 1, 1], device=x.device)
    ox = torch.randint(0, w + (1 - cw % 2), size=[n, 1, 1], device=x.device)
    gb, gy, gx = torch.meshgrid(torch.arange(n, device=x.device), torch.arange(ch, device=x.device),
                                torch.arange(cw, device=x.device), indexing="ij")
    gy = torch.clamp(gy + oy - ch // 2, min=0, max=h - 1)
    gx = torch.clamp(gx + ox - cw // 2, min=0, max=w - 1)
    mask = torch.ones(n, h, w, dtype=x.dtype, device=x.device)
    mask[gb, gy, gx] = 0
    return x * mask.unsqueeze(1)


POLICIES = {
    "color": (rand_brightness, rand_saturation, rand_contrast),
    "translation": (rand_translation,),
    "cutout": (rand_cutout,),
}


def parse_policy(policy: str) -> list[str]:
    """``"color,translation,cutout"`` -> its parts. Raises ValueError for an unknown part."""
    parts = [p.strip() for p in policy.split(",") if p.strip()]
    unknown = [p for p in parts if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown DiffAugment policy {unknown[0]!r}; use any of {', '.join(POLICIES)}")
    return parts


def reference(policy: str, x: torch.Tensor) -> torch.Tensor:
    """The port of data-efficient-gans' DiffAugment, one part after the other: what ``DiffAugment`` is checked
    and timed against."""
    for part in parse_policy(policy):
        for fn in POLICIES[part]:
            x = fn(x)
    return x


class DiffAugment:
    """``augment(x)`` applies the policy with fresh random draws per image; an empty policy is identity."""

    def __init__(self, policy: str = ""):
        self.parts = parse_policy(policy)

    def __bool__(self) -> bool:
        return bool(self.parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous() else torch.contiguous_format
        parts, i = self.parts, 0
        while i < len(parts):
            if parts[i] == "color":
                x, i = color(x), i + 1
            elif parts[i:i + 2] == ["translation", "cutout"]:
                x, i = shift_and_cut(x, translation=True, cutout=True), i + 2
            else:
                x, i = shift_and_cut(x, translation=parts[i] == "translation", cutout=parts[i] == "cutout"), i + 1
        return x.contiguous(memory_format=fmt)


def color(x: torch.Tensor) -> torch.Tensor:
    """``rand_contrast(rand_saturation(rand_brightness(x)))`` as one affine map, from the same three draws.

    With brightness b, saturation s, contrast c, the per-pixel channel mean m and the image mean M:
    brightness shifts m and M by b, saturation keeps m (and so M), so the result is
    c*s*x + (c - c*s)*m + (1 - c)*M + b."""
    n = x.size(0)
    b = torch.rand(n, 1, 1, 1, dtype=x.dtype, device=x.device) - 0.5
    s = torch.rand(n, 1, 1, 1, dtype=x.dtype, device=x.device) * 2
    c = torch.rand(n, 1, 1, 1, dtype=x.dtype, device=x.device) + 0.5
    m = x.mean(dim=1, keepdim=True)
    big_m = m.mean(dim=[2, 3], keepdim=True)  # the mean of the per-pixel means is the image's mean
    cs = c * s
    return torch.addcmul((c - cs) * m + ((1 - c) * big_m + b), cs, x)


def shift_and_cut(x: torch.Tensor, translation: bool, cutout: bool, t_ratio: float = 0.125,
                  c_ratio: float = 0.5) -> torch.Tensor:
    """``rand_cutout(rand_translation(x))`` (or either alone) as one gather from the zero-padded image, from
    the same draws: each output pixel reads its shifted source, or a padding zero where the shift leaves the
    image or the cut-out square covers it."""
    n, c, h, w = x.shape
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    if translation:
        sh, sw = int(h * t_ratio + 0.5), int(w * t_ratio + 0.5)
        ty = torch.randint(-sh, sh + 1, size=[n, 1, 1], device=x.device)
        tx = torch.randint(-sw, sw + 1, size=[n, 1, 1], device=x.device)
        index = (ys + ty + 1).clamp_(0, h + 1) * (w + 2) + (xs + tx + 1).clamp_(0, w + 1)
    else:
        index = ((ys + 1) * (w + 2) + xs + 1).expand(n, h, w)
    if cutout:
        ch, cw = int(h * c_ratio + 0.5), int(w * c_ratio + 0.5)
        oy = torch.randint(0, h + (1 - ch % 2), size=[n, 1, 1], device=x.device) - ch // 2
        ox = torch.randint(0, w + (1 - cw % 2), size=[n, 1, 1], device=x.device) - cw // 2
        # the square always meets the image (rand_cutout's clamped indices cut exactly this intersection)
        inside = (ys >= oy) & (ys < oy + ch) & (xs >= ox) & (xs < ox + cw)
        index = index.masked_fill(inside, 0)  # padded pixel (0, 0): a zero
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1).reshape(n, (h + 2) * (w + 2), c)
    out = padded.gather(1, index.reshape(n, h * w, 1).expand(n, h * w, c))
    return out.view(n, h, w, c).permute(0, 3, 1, 2)
