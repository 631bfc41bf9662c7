"""The CycleGAN objective: the two generators, the two discriminators, the image pool and the losses.

G maps photos to Monet paintings, F maps paintings back to photos; D_monet judges paintings and
D_photo judges photos. Each pair is one module so that one forward call per optimiser step does all of
its work (the shape DistributedDataParallel wants), and same-network calls are batched together.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F_
from torch import nn

from model.networks import PatchDiscriminator, build_generator, init_weights
from training.config import TrainConfig, generator_settings


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


class GANLoss(nn.Module):
    """Least-squares (lsgan) or binary cross-entropy on logits (bce) against a constant target."""

    def __init__(self, kind: str):
        super().__init__()
        if kind not in ("lsgan", "bce"):
            raise ValueError(f"unknown gan_loss {kind!r}; use lsgan or bce")
        self.kind = kind

    def forward(self, logits: torch.Tensor, real: bool) -> torch.Tensor:
        logits = logits.float()
        target = torch.full_like(logits, 1.0 if real else 0.0)
        if self.kind == "lsgan":
            return F_.mse_loss(logits, target)
        return F_.binary_cross_entropy_with_logits(logits, target)


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
