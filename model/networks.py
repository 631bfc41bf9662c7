"""CycleGAN networks: the ResNet and U-Net generators and the 70x70 PatchGAN discriminator.

Names and layer layout follow the reference CycleGAN code (junyanz/pytorch-CycleGAN-and-pix2pix)
and the Kaggle "Monet CycleGAN tutorial", so parameter counts match theirs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

@dataclass(frozen=True)
class GeneratorSpec:
    """What a generator is: its architecture, its constructor settings (what a weight file stores), and the
    multiple its input height and width must be (the translator pads to it)."""

    architecture: str
    settings: dict = field(default_factory=dict)
    size_multiple: int = 4


class _Described:
    """``architecture``, ``settings`` and ``size_multiple`` read from the module's ``spec``."""

    spec: GeneratorSpec

    @property
    def architecture(self) -> str:
        return self.spec.architecture

    @property
    def settings(self) -> dict:
        return self.spec.settings

    @property
    def size_multiple(self) -> int:
        return self.spec.size_multiple


class InstanceNorm2d(nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` (no running statistics) that keeps a channels-last input channels-last.

    PyTorch's instance norm reshapes its input to one batch-norm "batch" of N*C channels, which for an NHWC
    tensor means two full copies per layer, forward and backward (and the next convolution copies the NCHW
    result back to NHWC). On such an input this computes the same statistics with ``group_norm`` (one group per
    channel), whose CPU kernel works on NHWC in place: in training (training/parts.py runs channels-last) and in
    eval, where the torch backend runs its channels-last bf16 generator (benchmarks/bench_model.py: the shipped
    generator 1.3-1.5x faster end to end on a 2-core AMD EPYC, and closer to the fp32 result, since the kernel
    accumulates in fp32). A traced graph (OpenVINO's and ONNX's exports) keeps PyTorch's own layer, so those
    exports are unchanged. Parameters and state-dict keys are nn.InstanceNorm2d's.

    ``nhwc_kernel``, when a trainer sets it (training.parts: a compiled ``instance_norm_nhwc``), takes the place
    of ``group_norm`` on that path."""

    nhwc_kernel = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and not self.track_running_stats and not x.is_contiguous() \
                and x.is_contiguous(memory_format=torch.channels_last):
            if not self.training:
                if torch.jit.is_tracing():  # an export: PyTorch's own layer (OpenVINO and ONNX read it as MVN)
                    return super().forward(x)
                return nn.functional.group_norm(x, x.shape[1], self.weight, self.bias, self.eps)
            if self.nhwc_kernel is not None:
                with torch.autocast(x.device.type, enabled=False):
                    return self.nhwc_kernel(x, self.weight, self.bias, self.eps)
            if x.dtype == torch.float32:
                return nn.functional.group_norm(x, x.shape[1], self.weight, self.bias, self.eps)
            # under bf16/fp16 autocast: in fp32. PyTorch's NHWC group-norm backward in bf16 took a third of a
            # training step on a 2-core AMX Xeon (27 ms a layer); in fp32 the step ran 1.68x faster there
            # (docs/experiments.md, "Training speed on an AMX Xeon")
            with torch.autocast(x.device.type, enabled=False):
                return nn.functional.group_norm(x.float(), x.shape[1], self.weight, self.bias, self.eps).to(x.dtype)
        return super().forward(x)


def instance_norm_nhwc(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      eps: float) -> torch.Tensor:
    """Instance norm written out in elementwise operations and one mean and variance over H and W, computed in
    fp32 and returned in ``x``'s dtype and layout. Eager, it is slower than ``group_norm``; it is written this
    way for ``torch.compile``, which fuses it, forward and backward, into a few passes over an NHWC tensor
    (training.parts, ``compile_norm``)."""
    xf = x.float()
    var, mean = torch.var_mean(xf, dim=(2, 3), keepdim=True, correction=0)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    return y.to(x.dtype)


class ReflectionPad2d(nn.ReflectionPad2d):
    """``nn.ReflectionPad2d`` that keeps a bf16 (or fp16) input in its dtype while training under autocast.

    CPU autocast runs reflection padding in fp32 (it is on autocast's fp32 list), so each pad between two bf16
    convolutions cast its input up, padded twice the bytes, and the next convolution cast it back down; the
    backward did the same: four copies a pad. Padding only copies values, so the output is the same. In eval
    mode, or without autocast, this is PyTorch's layer (inference graphs and exports are unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.dtype != torch.float32 and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return super().forward(x)
        return super().forward(x)


class ResnetBlock(nn.Module):
    """Two reflection-padded 3x3 convolutions with instance norm, added to the input."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3, bias=True),
            InstanceNorm2d(dim),
            nn.ReLU(True),
            ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3, bias=True),
            InstanceNorm2d(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(_Described, nn.Module):
    """The CycleGAN paper's generator: c7s1-ngf, d2ngf, d4ngf, n_blocks x R4ngf, u2ngf, ungf, c7s1-3.

    ``upsample="resize"`` swaps the two transposed convolutions for bilinear upsampling followed by a
    3x3 convolution (same parameter count), which avoids checkerboard artefacts in short trainings.

    Input height and width must be multiples of ``size_multiple`` (4); the translator pads for you.
    """

    def __init__(self, input_nc: int = 3, output_nc: int = 3, ngf: int = 64, n_blocks: int = 9,
                 upsample: str = "transpose"):
        super().__init__()
        if upsample not in ("transpose", "resize"):
            raise ValueError(f"upsample must be transpose or resize, not {upsample!r}")
        self.spec = GeneratorSpec("resnet", {"input_nc": input_nc, "output_nc": output_nc, "ngf": ngf,
                                             "n_blocks": n_blocks, "upsample": upsample}, 4)
        layers: list[nn.Module] = [
            ReflectionPad2d(3),
            nn.Conv2d(input_nc, ngf, 7, bias=True),
            InstanceNorm2d(ngf),
            nn.ReLU(True),
        ]
        for i in range(2):
            mult = 2**i
            layers += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=True),
                InstanceNorm2d(ngf * mult * 2),
                nn.ReLU(True),
            ]
        layers += [ResnetBlock(ngf * 4) for _ in range(n_blocks)]
        for i in range(2):
            mult = 2 ** (2 - i)
            if upsample == "transpose":  # the paper's layer
                up: nn.Module = nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1,
                                                   output_padding=1, bias=True)
            else:  # resize-convolution: same parameters, no checkerboard artefacts (Odena et al., 2016)
                up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                   ReflectionPad2d(1), nn.Conv2d(ngf * mult, ngf * mult // 2, 3, bias=True))
            layers += [
                up,
                InstanceNorm2d(ngf * mult // 2),
                nn.ReLU(True),
            ]
        layers += [ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PhaseConvTanh(nn.Module):
    """``tanh(conv(x))`` for a stride-1 k x k convolution with few output channels (the ResNet generator's
    last layer: 3), computed as one stride-s convolution with s*s times the outputs, one per output phase,
    then depth-to-space.

    The same sums (the extra kernel taps are zeros; fp32 results are identical), in about a third of
    the time on CPU: 3 output channels leave the vector units mostly idle, 12 channels at a quarter of
    the positions do not. The input is the already padded one; its height and width minus (k - 1) must be
    even (the generator's are multiples of 4).
    """

    def __init__(self, conv: nn.Conv2d, stride: int = 2):
        super().__init__()
        (k, k2), s = conv.kernel_size, stride
        if k != k2 or conv.stride != (1, 1) or conv.padding != (0, 0) or conv.dilation != (1, 1) or conv.groups != 1:
            raise ValueError("PhaseConvTanh rewrites square, unpadded, stride-1 convolutions only")
        w = conv.weight.detach()
        out_ch, in_ch = w.shape[:2]
        weight = w.new_zeros(out_ch, s, s, in_ch, k + s - 1, k + s - 1)
        for py in range(s):  # output pixel (s*i + py, s*j + px) reads input rows s*i + py .. s*i + py + k - 1
            for px in range(s):
                weight[:, py, px, :, py : py + k, px : px + k] = w
        self.stride = s
        self.weight = nn.Parameter(weight.reshape(out_ch * s * s, in_ch, k + s - 1, k + s - 1), requires_grad=False)
        bias = conv.bias.detach() if conv.bias is not None else w.new_zeros(out_ch)
        self.bias = nn.Parameter(bias.repeat_interleave(s * s), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        x = nn.functional.pad(x, (0, s - 1, 0, s - 1))  # the last phases' windows end s - 1 beyond the input
        return nn.functional.pixel_shuffle(torch.tanh(nn.functional.conv2d(x, self.weight, self.bias, stride=s)), s)


def for_inference(generator: nn.Module) -> nn.Module:
    """An equivalent generator for inference only: the ResNet generator's last convolution and tanh run as
    a ``PhaseConvTanh`` (bench_model: about 10% less time per image on a 2-core CPU with OpenVINO, 4% with
    torch eager bf16). Other generators come back as they are. The result has the same ``spec``; weights are
    shared except the rewritten layer's."""
    if not isinstance(generator, ResnetGenerator):
        return generator
    layers = list(generator.model)
    last_conv, tanh = layers[-2], layers[-1]
    if not (isinstance(last_conv, nn.Conv2d) and isinstance(tanh, nn.Tanh)):
        return generator
    return InferenceGenerator(generator.spec, *layers[:-2], PhaseConvTanh(last_conv)).train(generator.training)


class InferenceGenerator(_Described, nn.Sequential):
    """A generator's layers rewritten for inference (``for_inference``), with the original's ``spec``."""

    def __init__(self, spec: GeneratorSpec, *layers: nn.Module):
        super().__init__(*layers)
        self.spec = spec


def _down(in_ch: int, out_ch: int, norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1, bias=not norm)]
    if norm:
        layers.append(InstanceNorm2d(out_ch, affine=True))
    layers.append(nn.LeakyReLU(0.2, True))
    return nn.Sequential(*layers)


def _up(in_ch: int, out_ch: int, dropout: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1, bias=False),
        InstanceNorm2d(out_ch, affine=True),
    ]
    if dropout:
        layers.append(nn.Dropout(0.5))
    layers.append(nn.ReLU(True))
    return nn.Sequential(*layers)


class UnetGenerator(_Described, nn.Module):
    """The Kaggle tutorial's U-Net: 8 stride-2 4x4 downsamplings, 7 upsamplings with skips.

    Encoder widths 64,128,256,512,512,512,512,512 (no norm on the first; none on the 1x1
    bottleneck either, where instance norm of a single pixel is undefined), decoder widths
    512,512,512,512,256,128,64 with dropout 0.5 on the first three, tanh output.
    Input height and width must be multiples of 256; the translator pads for you.
    """

    def __init__(self, input_nc: int = 3, output_nc: int = 3, ngf: int = 64):
        super().__init__()
        self.spec = GeneratorSpec("unet", {"input_nc": input_nc, "output_nc": output_nc, "ngf": ngf}, 256)
        enc = [ngf, ngf * 2, ngf * 4] + [ngf * 8] * 5
        self.down = nn.ModuleList(
            _down(c_in, c_out, norm=0 < i < len(enc) - 1)
            for i, (c_in, c_out) in enumerate(zip([input_nc] + enc[:-1], enc))
        )
        dec = [ngf * 8] * 4 + [ngf * 4, ngf * 2, ngf]
        skips = enc[-2::-1]  # encoder outputs the decoder concatenates, deepest first
        in_chs = [enc[-1]] + [d + s for d, s in zip(dec[:-1], skips[:-1])]
        self.up = nn.ModuleList(_up(c_in, c_out, dropout=i < 3) for i, (c_in, c_out) in enumerate(zip(in_chs, dec)))
        self.last = nn.Sequential(
            nn.ConvTranspose2d(dec[-1] + skips[-1], output_nc, 4, stride=2, padding=1), nn.Tanh()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for down in self.down:
            x = down(x)
            skips.append(x)
        for up, skip in zip(self.up, reversed(skips[:-1])):
            x = torch.cat([up(x), skip], dim=1)
        return self.last(x)


class PatchDiscriminator(nn.Module):
    """The 70x70 PatchGAN: one real/fake logit per overlapping 70x70 patch (30x30 for 256x256)."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=True),
                InstanceNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def init_weights(net: nn.Module, gain: float = 0.02) -> nn.Module:
    """Initialise as the reference does: conv weights N(0, gain), norm scales N(1, gain), biases 0."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.InstanceNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)
    return net


# The generator architectures, by the name a weight file's metadata and `training.fit --generator` use: the one
# registry of this extension point (a new architecture is a class above and a line here).
GENERATORS: dict[str, type[nn.Module]] = {"resnet": ResnetGenerator, "unet": UnetGenerator}


def build_generator(architecture: str = "resnet", **settings) -> nn.Module:
    """Build a generator by name ("resnet" or "unet") with its settings (e.g. ngf, n_blocks).

    Raises ValueError for an unknown architecture or setting.
    """
    if architecture not in GENERATORS:
        raise ValueError(f"unknown generator architecture {architecture!r}; expected one of {sorted(GENERATORS)}")
    try:
        return GENERATORS[architecture](**settings)
    except TypeError as exc:
        raise ValueError(f"bad settings for {architecture} generator: {settings} ({exc})") from None
