import pytest
import torch

from model.networks import (PatchDiscriminator, PhaseConvTanh, ResnetGenerator, UnetGenerator, build_generator,
                            for_inference, init_weights)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_resnet_generator_matches_the_reference_size_and_shape():
    g = ResnetGenerator()
    assert count(g) == 11_378_179
    with torch.no_grad():
        assert g(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_resnet_generator_is_configurable():
    assert count(ResnetGenerator(ngf=32, n_blocks=6)) < count(ResnetGenerator())
    assert count(ResnetGenerator(ngf=64, n_blocks=12)) > count(ResnetGenerator())


def test_patch_discriminator_size_and_30x30_output():
    d = PatchDiscriminator()
    assert count(d) == 2_764_737
    with torch.no_grad():
        assert d(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)


def test_unet_generator_shape_and_output_range():
    g = init_weights(UnetGenerator()).eval()
    with torch.no_grad():
        y = g(torch.rand(1, 3, 256, 256) * 2 - 1)
    assert y.shape == (1, 3, 256, 256)
    assert y.abs().max() <= 1.0
    # 8 downsamplings, 7 upsamplings + the output layer
    assert len(g.down) == 8 and len(g.up) == 7


def test_init_weights_uses_small_normal():
    g = init_weights(ResnetGenerator(ngf=8, n_blocks=1))
    w = g.model[1].weight
    assert abs(w.mean().item()) < 0.01 and 0.01 < w.std().item() < 0.03


def test_build_generator_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown generator architecture"):
        build_generator("transformer")
    with pytest.raises(ValueError, match="bad settings"):
        build_generator("resnet", depth=3)


def test_resize_upsampling_keeps_the_parameter_count_and_shape():
    resize = ResnetGenerator(upsample="resize")
    assert count(resize) == count(ResnetGenerator())
    assert resize.settings["upsample"] == "resize"
    with torch.no_grad():
        assert resize(torch.zeros(1, 3, 36, 44)).shape == (1, 3, 36, 44)
    with pytest.raises(ValueError, match="upsample"):
        ResnetGenerator(upsample="pixelshuffle")


@pytest.mark.parametrize("upsample", ["transpose", "resize"])
def test_for_inference_computes_the_same_function(upsample):
    torch.manual_seed(0)
    g = init_weights(ResnetGenerator(ngf=8, n_blocks=2, upsample=upsample), gain=0.2).eval()
    fast = for_inference(g)
    assert isinstance(fast[-1], PhaseConvTanh) and fast.size_multiple == g.size_multiple
    assert fast.settings == g.settings
    with torch.no_grad():
        for h, w in ((64, 64), (40, 56), (16, 100)):
            x = torch.rand(2, 3, h, w) * 2 - 1
            expected, got = g(x), fast(x)
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_for_inference_leaves_other_generators_and_rejects_other_convolutions():
    unet = UnetGenerator(ngf=8)
    assert for_inference(unet) is unet
    with pytest.raises(ValueError, match="stride-1"):
        PhaseConvTanh(torch.nn.Conv2d(8, 3, 3, stride=2))


@pytest.mark.parametrize("affine", [False, True])
def test_in_eval_a_channels_last_instance_norm_is_pytorchs_layer_in_place(affine):
    """In eval, on an NHWC input, the layer computes PyTorch's instance norm (as a group norm, one group per
    channel) without leaving channels-last; in bf16 it is no further from the fp32 result than PyTorch's layer."""
    from model.networks import InstanceNorm2d

    norm = InstanceNorm2d(16, affine=affine).eval()
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(3, 16, 20, 12) * 3 + 2).contiguous(memory_format=torch.channels_last)
    expected = torch.nn.InstanceNorm2d.forward(norm, x.contiguous())
    with torch.no_grad():
        y = norm(x)
        y16 = norm.to(torch.bfloat16)(x.to(torch.bfloat16))
        theirs16 = torch.nn.InstanceNorm2d.forward(norm, x.to(torch.bfloat16))
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert y16.is_contiguous(memory_format=torch.channels_last) and y16.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    ours_err = (y16.float() - expected).abs().mean()
    assert ours_err <= (theirs16.float() - expected).abs().mean() * 1.05 and ours_err < 0.01
