"""One configuration object per training run, with the named presets it starts from."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


@dataclass
class TrainConfig:
    """Every knob of a run. Saved as RUN_DIR/config.json and inside every checkpoint."""

    preset: str = "cyclegan"
    model: str = "cyclegan"  # cyclegan | cut | fastcut: the objective (training.cyclegan / training.cut)
    # networks
    generator: str = "resnet"  # resnet | unet
    ngf: int = 64
    n_blocks: int = 9  # resnet only
    upsample: str = "transpose"  # resnet only: transpose (the paper) | resize (bilinear + conv, no checkerboard)
    ndf: int = 64
    # objective
    gan_loss: str = "lsgan"  # lsgan (least squares) | bce (binary cross-entropy on logits)
    pool_size: int = 50  # fakes kept for the discriminators; 0 disables the pool
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.5  # multiplied by lambda_cycle, as in the reference code
    lambda_nce: float = 0.0  # CUT's PatchNCE weight; 0 picks the paper's: 1 for cut, 10 for fastcut
    num_patches: int = 256  # patches per layer in PatchNCE
    nce_t: float = 0.07  # PatchNCE temperature
    # recipe tools (off in the faithful presets)
    diffaugment: str = ""  # DiffAugment policy for everything D sees, e.g. "color,translation,cutout"
    ema: float = 0.0  # decay of an EMA copy of G used for validation and export (0: off), e.g. 0.999
    lr_d_mult: float = 1.0  # discriminator learning rate = lr x this
    # optimiser and schedule
    lr: float = 2e-4  # for a global batch of 1; scaled by sqrt(global batch), see README
    beta1: float = 0.5
    beta2: float = 0.999
    decay: str = "linear"  # linear: constant for the first half, then linearly to zero | none
    # data
    load_size: int = 286  # resize to this square before cropping; 0 keeps the image's own size
    image_size: int = 256  # the random crop fed to the networks
    flip: bool = True
    batch_size: int = 1  # per process
    num_workers: int = 4
    # length: `steps` wins when > 0, else epochs x steps_per_epoch (0 = one pass over the photos)
    epochs: int = 200
    steps_per_epoch: int = 0
    steps: int = 0
    seed: int = 0
    # speed
    precision: str = "auto"  # auto (bf16 where the hardware does it natively) | fp32 | bf16 | fp16
    compile: bool = False
    # validation: KID of G(validation photos) against the paintings every eval_every steps
    eval_every: int = 500  # 0: no validation
    val_photos: str = ""  # folder of validation photos; empty: hold out val_fraction of --photos
    val_fraction: float = 0.0  # 0: hold out min(200, 10%) of the photos
    # bookkeeping
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    samples: int = 4  # fixed photos in the per-epoch sample grid

    def __post_init__(self):
        if self.lambda_nce == 0.0 and self.model in ("cut", "fastcut"):
            self.lambda_nce = 1.0 if self.model == "cut" else 10.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


PRESETS: dict[str, dict] = {
    # The CycleGAN paper's recipe as its reference code runs it (100 + 100 epochs of the larger set).
    "cyclegan": {},
    # The Kaggle "Monet CycleGAN tutorial": U-Net generator, BCE loss, no pool, no decay, 25 x 300 steps.
    "kaggle": dict(
        generator="unet", gan_loss="bce", pool_size=0, decay="none", load_size=0, flip=False,
        epochs=25, steps_per_epoch=300,
    ),
    # Our recipe for 2 CPU cores, about an hour of training; chosen by equal-time screening
    # (docs/experiments.md): FastCUT with DiffAugment and an EMA generator, small ResNet on 128-pixel crops.
    "cpu": dict(
        model="fastcut", diffaugment="color,translation,cutout", ema=0.999,
        ngf=32, n_blocks=6, upsample="resize", load_size=0, image_size=128, batch_size=4, lr=1e-4, num_workers=1,
        epochs=18, steps_per_epoch=500, log_every=25, checkpoint_every=500, eval_every=1000,
    ),
}


def preset_config(name: str, **overrides) -> TrainConfig:
    """The named preset's configuration with ``overrides`` applied. Raises ValueError on a bad name."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}, "preset": name}
    return TrainConfig.from_dict(values)


def generator_settings(cfg: TrainConfig) -> dict:
    """The generator's constructor settings in a run's configuration."""
    if cfg.generator == "resnet":
        return {"ngf": cfg.ngf, "n_blocks": cfg.n_blocks, "upsample": cfg.upsample}
    return {"ngf": cfg.ngf}
