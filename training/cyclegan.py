"""The CycleGAN objective: the two generators, the two discriminators, the image pool and the losses.

G maps photos to Monet paintings, F maps paintings back to photos; D_monet judges paintings and
D_photo judges photos. Each pair is one module so that one forward call per optimiser step does all of
its work (the shape DistributedDataParallel wants), and same-network calls are batched together.
"""
from __future__ import annotations

import torch
from torch import nn

from model.networks import PatchDiscriminator, build_generator, init_weights
from training.augment import DiffAugment
from training.config import ConfigError, TrainConfig, generator_settings
from training.parts import GANLoss, Networks, sample_grid

__all__ = ["CycleGAN", "Discriminators", "GANLoss", "Generators", "ImagePool"]


class Generators(nn.Module):
    """G (photo->Monet) and F (Monet->photo), run together for one CycleGAN step."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        settings = generator_settings(cfg)
        self.G = init_weights(build_generator(cfg.generator, **settings))
        self.F = init_weights(build_generator(cfg.generator, **settings))
        self.identity = cfg.lambda_identity > 0

    def forward(self, photo: torch.Tensor, monet: torch.Tensor) -> dict[str, torch.Tensor]:
        n = photo.shape[0]
        if self.identity:  # G(photo) and G(monet) in one batch; instance norm keeps samples independent
            fake_monet, idt_monet = self.G(torch.cat([photo, monet])).split(n)
            fake_photo, idt_photo = self.F(torch.cat([monet, photo])).split(n)
        else:
            fake_monet, fake_photo = self.G(photo), self.F(monet)
            idt_monet = idt_photo = None
        return {
            "fake_monet": fake_monet, "fake_photo": fake_photo,
            "rec_photo": self.F(fake_monet), "rec_monet": self.G(fake_photo),
            "idt_monet": idt_monet, "idt_photo": idt_photo,
        }


class Discriminators(nn.Module):
    """D_photo and D_monet, each one 70x70 PatchGAN."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.D_photo = init_weights(PatchDiscriminator(ndf=cfg.ndf))
        self.D_monet = init_weights(PatchDiscriminator(ndf=cfg.ndf))

    def forward(self, photos: torch.Tensor, monets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.D_photo(photos), self.D_monet(monets)


class ImagePool:
    """The reference's history of generated images: with probability 1/2 a query returns an older fake
    in place of the new one (and keeps the new one), which steadies the discriminators.

    Its random choices come from its own generator, so its whole state can be checkpointed.
    """

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.images: list[torch.Tensor] = []
        self.rng = torch.Generator().manual_seed(seed)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand(1, generator=self.rng).item() > 0.5:
                j = int(torch.randint(0, self.size, (1,), generator=self.rng))
                out.append(self.images[j].clone())
                self.images[j] = image.clone()
            else:
                out.append(image)
        return torch.cat(out)

    def state_dict(self) -> dict:
        images = torch.cat(self.images).cpu() if self.images else torch.empty(0)
        return {"images": images, "rng": self.rng.get_state()}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.images = [img.unsqueeze(0).to(device) for img in state["images"]] if state["images"].numel() else []
        self.rng.set_state(state["rng"])


class CycleGAN:
    """Both generators, both discriminators and their pools; ``step`` does one CycleGAN update."""

    loss_names = ("G_gan", "cycle", "identity", "D_photo", "D_monet")
    d_loss_names = ("D_photo", "D_monet")  # the discriminators' losses (the log's D figure sums them)

    @staticmethod
    def check(cfg: TrainConfig) -> None:
        """Raise ConfigError for an option this objective cannot take."""
        if cfg.discriminator != "patch":
            raise ConfigError(f"--discriminator {cfg.discriminator} works with --model cut or fastcut")
        if cfg.photo_negatives or cfg.lambda_texture or cfg.cuda_graph:
            raise ConfigError("--photo-negatives, --lambda-texture and --cuda-graph work with --model cut or fastcut")

    def __init__(self, cfg: TrainConfig, device: torch.device, total_steps: int, world_size: int = 1):
        self.cfg = cfg
        self.nets = Networks(Generators(cfg), Discriminators(cfg), cfg, device, total_steps, world_size)
        self.gan, self.augment = GANLoss(cfg.gan_loss), DiffAugment(cfg.diffaugment)
        self.pool_photo = ImagePool(cfg.pool_size, seed=cfg.seed * 2 + 1)
        self.pool_monet = ImagePool(cfg.pool_size, seed=cfg.seed * 2 + 2)

    def step(self, photo: torch.Tensor, monet: torch.Tensor) -> torch.Tensor:
        """One update of both generators, then both discriminators. Returns the detached losses
        [G_gan, cycle, identity, D_photo, D_monet] as one tensor on the device (no host sync)."""
        cfg, nets, gan, l1, aug = self.cfg, self.nets, self.gan, torch.nn.functional.l1_loss, self.augment
        n = photo.shape[0]
        # generators: D's parameters are frozen so its weight gradients are never computed
        nets.discs.requires_grad_(False)
        nets.opt_G.zero_grad(set_to_none=True)
        with nets.autocast():
            out = nets.gens_run(photo, monet)
            d_photo, d_monet = nets.discs(aug(out["fake_photo"]), aug(out["fake_monet"]))
            loss_gan = gan(d_monet, True) + gan(d_photo, True)
            loss_cycle = (l1(out["rec_photo"].float(), photo) + l1(out["rec_monet"].float(), monet)) * cfg.lambda_cycle
            if out["idt_monet"] is not None:
                loss_idt = (l1(out["idt_monet"].float(), monet) + l1(out["idt_photo"].float(), photo)) * (
                    cfg.lambda_cycle * cfg.lambda_identity)
            else:
                loss_idt = torch.zeros((), device=nets.device)
        nets.update(loss_gan + loss_cycle + loss_idt, nets.opt_G)
        # discriminators: real against (pooled) fake, one batched forward for both
        nets.discs.requires_grad_(True)
        fake_photo = self.pool_photo.query(out["fake_photo"].detach())
        fake_monet = self.pool_monet.query(out["fake_monet"].detach())
        nets.opt_D.zero_grad(set_to_none=True)
        with nets.autocast():
            d_photo, d_monet = nets.discs_run(aug(torch.cat([photo, fake_photo.to(photo.dtype)])),
                                              aug(torch.cat([monet, fake_monet.to(monet.dtype)])))
            loss_D_photo = 0.5 * (gan(d_photo[:n], True) + gan(d_photo[n:], False))
            loss_D_monet = 0.5 * (gan(d_monet[:n], True) + gan(d_monet[n:], False))
        nets.update(loss_D_photo + loss_D_monet, nets.opt_D)
        nets.finish_step()
        return torch.stack([loss_gan, loss_cycle, loss_idt, loss_D_photo, loss_D_monet]).detach().float()

    def state_dict(self) -> dict:
        return self.nets.state_dict() | {"pool_photo": self.pool_photo.state_dict(),
                                         "pool_monet": self.pool_monet.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.nets.load_state_dict(state)
        self.pool_photo.load_state_dict(state["pool_photo"], self.nets.device)
        self.pool_monet.load_state_dict(state["pool_monet"], self.nets.device)

    @torch.no_grad()
    def sample_grid(self, photos: torch.Tensor) -> torch.Tensor:
        """Rows of photo | Monet-fied | reconstructed photo, as a [0, 1] image tensor."""
        self.nets.gens.eval()
        x = self.nets.to_input(photos)
        fake = self.nets.generator()(x)
        rec = self.nets.gens.F(fake)
        self.nets.gens.train()
        return sample_grid([x, fake, rec])
