"""The CUT / FastCUT objective (Park et al., 2020, "Contrastive Learning for Unpaired Image-to-Image
Translation"): one generator, one discriminator, and a PatchNCE loss in place of the cycle.

A patch of the painting G(x) should be closer, in G's own encoder features passed through small MLP
heads, to the patch of the photo x at the same place than to other patches of x. Features come from
five layers of the ResNet generator, as in the paper: the RGB pixels, the first and second
downsampling convolutions, and the first and fifth residual blocks.

- CUT:     lambda_NCE 1, plus the identity NCE on G(painting) vs painting.
- FastCUT: lambda_NCE 10, no identity term: about a third of CycleGAN's compute per step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.networks import PatchDiscriminator, ResnetGenerator, build_generator, init_weights
from training.augment import DiffAugment
from training.config import ConfigError, TrainConfig, generator_settings
from training.parts import GANLoss, Networks, sample_grid


def nce_layers(generator: ResnetGenerator, pixels: bool = True) -> list[int]:
    """Indices into ``generator.model`` whose outputs PatchNCE compares: the paper's five layers, or without
    the first (the padded RGB input) when not ``pixels``."""
    n_blocks = generator.settings["n_blocks"]
    first_block = 10  # pad, conv, norm, relu, (conv, norm, relu) x 2 downsamplings
    return [0, 4, 7, first_block, first_block + min(4, n_blocks - 1)][0 if pixels else 1 :]


class PatchSampleF(nn.Module):
    """Samples the same ``num_patches`` places from query and key features and projects each layer's
    patches with its own 2-layer MLP (256 units) to unit vectors."""

    def __init__(self, channels: list[int], nc: int = 256):
        super().__init__()
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(c, nc), nn.ReLU(), nn.Linear(nc, nc)) for c in channels)
        for mlp in self.mlps:
            for m in mlp:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0.0, 0.02)
                    nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor], num_patches: int, patch_ids: list[torch.Tensor] | None = None):
        out, ids = [], []
        for i, (feat, mlp) in enumerate(zip(feats, self.mlps)):
            flat = feat.flatten(2).transpose(1, 2)  # B, HW, C
            if patch_ids is None:  # a random subset of places; a sort of random keys (randperm is not captured
                # in a CUDA graph everywhere; this is, and the same draw on every device)
                idx = torch.rand(flat.shape[1], device=feat.device).argsort()[: min(num_patches, flat.shape[1])]
            else:
                idx = patch_ids[i]
            sample = mlp(flat[:, idx, :].flatten(0, 1).float())  # B*P, nc
            out.append(F.normalize(sample, dim=1))
            ids.append(idx)
        return out, ids


def patch_nce_loss(q: torch.Tensor, k: torch.Tensor, batch: int, temperature: float) -> torch.Tensor:
    """InfoNCE over patches: each query's positive is the key at its place; negatives are the other
    patches of the same image. ``q``, ``k``: (batch * patches, dim). Returns the mean loss."""
    k = k.detach()
    dim = q.shape[1]
    l_pos = (q * k).sum(dim=1, keepdim=True)
    qb, kb = q.view(batch, -1, dim), k.view(batch, -1, dim)
    p = qb.shape[1]
    l_neg = torch.bmm(qb, kb.transpose(1, 2))  # B, P, P
    eye = torch.eye(p, dtype=torch.bool, device=q.device)[None]
    l_neg = l_neg.masked_fill(eye, -10.0).view(-1, p)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=q.device))


def layers_nce_loss(q: list[torch.Tensor], k: list[torch.Tensor], batch: int, temperature: float) -> torch.Tensor:
    """The mean over layers of ``patch_nce_loss``, the layers with as many patches computed as one (issue 35:
    one batched product and one cross-entropy for the five layers instead of five of each; the same patches
    per image, so the mean over them all is the mean of the layers' means)."""
    groups: dict[int, list[int]] = {}
    for i, qq in enumerate(q):
        groups.setdefault(qq.shape[0], []).append(i)
    total = sum(patch_nce_loss(torch.cat([q[i] for i in ids]), torch.cat([k[i] for i in ids]), batch * len(ids),
                               temperature) * len(ids) for ids in groups.values())
    return total / len(q)


class CUTGenerator(nn.Module):
    """G and the MLP heads H, run together so one forward call does all of the generator step's work."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        if cfg.generator != "resnet":
            raise ValueError("CUT and FastCUT take their features from the ResNet generator; use --generator resnet")
        self.G = init_weights(build_generator("resnet", **generator_settings(cfg)))
        self.layers = nce_layers(self.G, cfg.nce_pixels)
        with torch.no_grad():
            channels = [f.shape[1] for f in self.encode(torch.zeros(1, 3, 32, 32))]
        self.H = PatchSampleF(channels)
        self.num_patches, self.temperature = cfg.num_patches, cfg.nce_t
        self.nce_idt = cfg.model == "cut"  # FastCUT drops the identity term

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, layer in enumerate(self.G.model[: self.layers[-1] + 1]):
            x = layer(x)
            if i in self.layers:
                feats.append(x)
        return feats

    def forward(self, photo: torch.Tensor, monet: torch.Tensor) -> dict[str, torch.Tensor]:
        n = photo.shape[0]
        x = torch.cat([photo, monet]) if self.nce_idt else photo
        feats_k, h = [], x  # G's forward, keeping the key features on the way
        for i, layer in enumerate(self.G.model):
            h = layer(h)
            if i in self.layers:
                feats_k.append(h)
        out = h
        feats_q = self.encode(out)
        k, ids = self.H(feats_k, self.num_patches)
        q, _ = self.H(feats_q, self.num_patches, ids)
        # with identity, the batch holds photos then paintings; the mean over both is (NCE + NCE_Y) / 2
        return {"fake_monet": out[:n], "idt_monet": out[n:] if self.nce_idt else None,
                "nce": layers_nce_loss(q, k, len(x), self.temperature)}


def discriminator(cfg: TrainConfig) -> nn.Module:
    """The 70x70 PatchGAN (``patch``), heads on frozen pretrained features (``projected``), or both side by
    side (``both``)."""
    if cfg.discriminator == "patch":
        return init_weights(PatchDiscriminator(ndf=cfg.ndf))
    from training.projected import PixelAndFeatureDiscriminator, ProjectedDiscriminator

    projected = ProjectedDiscriminator(ndf=cfg.ndf, seed=cfg.seed)
    if cfg.discriminator == "projected":
        return projected
    return PixelAndFeatureDiscriminator(init_weights(PatchDiscriminator(ndf=cfg.ndf)), projected)


class CUT:
    """One generator, one discriminator, PatchNCE. ``step`` does one CUT/FastCUT update.

    Two tools, off by default: ``photo_negatives`` shows the discriminator real photos (and their colour
    transfer to the paired painting) labelled fake, and ``lambda_texture`` adds a texture loss on frozen
    ImageNet features (training/texture.py)."""

    loss_names: tuple[str, ...] = ("G_gan", "nce", "D_monet")
    d_loss_names: tuple[str, ...] = ("D_monet",)  # the discriminator's losses (the log's D figure sums them)

    @staticmethod
    def check(cfg: TrainConfig) -> None:
        """Raise ConfigError for an option this objective cannot take."""
        if cfg.generator != "resnet":
            raise ConfigError(f"--model {cfg.model} takes its features from the resnet generator; use --generator resnet")

    def __init__(self, cfg: TrainConfig, device: torch.device, total_steps: int, world_size: int = 1):
        self.cfg = cfg
        self.nets = Networks(CUTGenerator(cfg), discriminator(cfg), cfg, device, total_steps, world_size)
        self.gan, self.augment = GANLoss(cfg.gan_loss), DiffAugment(cfg.diffaugment)
        self.negatives = [k for k in cfg.negatives.split(",") if k] if cfg.photo_negatives > 0 else []
        self.texture = None
        if cfg.lambda_texture > 0:  # not part of the networks: frozen, never checkpointed
            from training.texture import TextureLoss

            self.texture = TextureLoss().to(device, memory_format=self.nets.memory_format)
        self.loss_names = self.loss_names + (("texture",) if self.texture is not None else ()) + (
            ("D_negatives",) if self.negatives else ())
        self.d_loss_names = self.d_loss_names + (("D_negatives",) if self.negatives else ())

    def step(self, photo: torch.Tensor, monet: torch.Tensor) -> torch.Tensor:
        """One update of G (and its MLP heads), then of D. Returns the detached losses [G_gan, nce, D_monet]
        as one tensor on the device (no host sync)."""
        self.nets.begin_step()
        losses = self.device_step(photo, monet)
        self.nets.end_step()
        return losses

    def device_step(self, photo: torch.Tensor, monet: torch.Tensor) -> torch.Tensor:
        """``step``'s kernels, between the host's bookkeeping (``Networks.begin_step`` and ``end_step``): no host
        sync and, with ``cfg.cuda_graph``, no number that changes between steps, so training/graphs.py can
        capture it once and replay it."""
        nets, gan, aug = self.nets, self.gan, self.augment
        n = photo.shape[0]
        nets.discs.requires_grad_(False)  # D's weight gradients are never computed in G's update
        nets.opt_G.zero_grad(set_to_none=True)
        losses = []
        with nets.autocast():
            out = nets.gens_run(photo, monet)
            loss_gan = gan(nets.discs(aug(out["fake_monet"])), True)
            loss_nce = out["nce"] * self.cfg.lambda_nce
            loss_G = loss_gan + loss_nce
            if self.texture is not None:
                loss_texture = self.texture(out["fake_monet"], monet) * self.cfg.lambda_texture
                loss_G, losses = loss_G + loss_texture, [loss_texture]
        nets.update(loss_G, nets.opt_G)
        nets.discs.requires_grad_(True)
        nets.opt_D.zero_grad(set_to_none=True)
        negatives = self.photo_negatives(photo, monet)
        with nets.autocast():
            d = nets.discs_run(aug(torch.cat([monet, out["fake_monet"].detach().to(monet.dtype), *negatives])))
            loss_D = 0.5 * (gan(d[:n], True) + gan(d[n : 2 * n], False))
            if negatives:  # photographic texture, with or without Monet's palette, is not a painting
                loss_negatives = gan(d[2 * n :], False) * self.cfg.photo_negatives
                losses.append(loss_negatives)
        nets.update(loss_D + loss_negatives if negatives else loss_D, nets.opt_D)
        nets.device_finish()
        return torch.stack([loss_gan, loss_nce, loss_D, *losses]).detach().float()

    def photo_negatives(self, photo: torch.Tensor, monet: torch.Tensor) -> list[torch.Tensor]:
        """What the discriminator also sees as fake (``cfg.negatives``): the photos, their colour transfer to
        the paired paintings' Lab statistics; empty when ``photo_negatives`` is off."""
        from training.baselines import colour_transfer_batch

        kinds = {"photo": lambda: photo.to(monet.dtype), "colour": lambda: colour_transfer_batch(photo, monet)}
        return [kinds[k]() for k in self.negatives]

    def state_dict(self) -> dict:
        return self.nets.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.nets.load_state_dict(state)

    @torch.no_grad()
    def sample_grid(self, photos: torch.Tensor) -> torch.Tensor:
        """Rows of photo | Monet-fied, as a [0, 1] image tensor."""
        x = self.nets.to_input(photos)
        return sample_grid([x, self.nets.generator()(x)])
