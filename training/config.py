"""One configuration object per training run, with the named presets it starts from."""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from model.networks import GENERATORS
from model.runtime import DEVICES, PRECISIONS


def opt(default, help: str, *, run: bool = False, switch: bool = False):
    """A TrainConfig field with its command-line help. ``run``: an option of this invocation (where the data
    is, when to stop), not of the recipe; a resumed run takes it from the command line only. ``switch``: a
    flag without a value (--resume)."""
    return field(default=default, metadata={"help": help, "run": run, "switch": switch})


@dataclass
class TrainConfig:
    """Every option of a run, the recipe and the invocation. Saved one way, ``dataclasses.asdict``, as
    RUN_DIR/config.json and inside every checkpoint; ``python -m training.fit --help`` lists the fields."""

    # the run: where the data and the run folder are, how this invocation starts and stops
    photos: str = opt("", "folder of photos (domain A); --resume reads it from the run")
    paintings: str = opt("", "folder of paintings (domain B); --resume reads it from the run")
    out: str = opt("", "run folder for config, checkpoints, samples, metrics", run=True)
    preset: str = opt("cyclegan", "starting recipe: cyclegan (paper), kaggle (tutorial U-Net), cpu (FastCUT for "
                      "2 cores, 9,000 steps), cut-cpu then cut-cpu-256 (the painter recipe's two phases on 2 "
                      "cores), cut-gpu then cut-gpu-256 (the same on a GPU)")
    resume: bool = opt(False, "continue the run in --out from its last checkpoint", run=True, switch=True)
    resume_if_present: bool = opt(False, "continue the run in --out if it has a checkpoint, else start it (for "
                                  "Jobs that may be rescheduled: the same command line starts and resumes)",
                                  run=True, switch=True)
    device: str = opt("auto", "auto | cpu | cuda (torchrun: each rank takes cuda:LOCAL_RANK)", run=True)
    stop_at_step: int = opt(0, "save a checkpoint and stop after this step (continue later with --resume)", run=True)
    max_minutes: float = opt(0.0, "stop (validate, checkpoint, exit) after this many minutes of training, "
                             "validation not counted; for comparing recipes at equal time (continue with --resume)",
                             run=True)
    no_export: bool = opt(False, "don't write RUN_DIR/photo2monet.safetensors at the end", run=True, switch=True)
    # networks
    model: str = opt("cyclegan", "objective: cyclegan (two generators, cycle loss) | cut | fastcut (one generator, "
                     "PatchNCE; roughly a third of CycleGAN's compute per step)")
    generator: str = opt("resnet", "resnet | unet")
    ngf: int = opt(64, "generator width")
    n_blocks: int = opt(9, "residual blocks (resnet)")
    upsample: str = opt("transpose", "resnet upsampling: transpose (the paper) | resize (bilinear + conv, no "
                        "checkerboard)")
    ndf: int = opt(64, "discriminator width")
    discriminator: str = opt("patch", "patch (the 70x70 PatchGAN) | projected (trainable heads on frozen ImageNet "
                             "EfficientNet-Lite0 features, training/projected.py; cut and fastcut; needs the train "
                             "extra) | both (the PatchGAN beside the projected heads)")
    init_generator: str = opt("", "start the photo->Monet generator (and its EMA) from this weight file, e.g. a "
                              "run's best.safetensors or weights/photo2monet.safetensors, to fine-tune it; its "
                              "architecture must match the recipe's; the discriminator starts fresh")
    # objective
    gan_loss: str = opt("lsgan", "lsgan (least squares) | bce (binary cross-entropy on logits)")
    pool_size: int = opt(50, "fakes kept for the discriminators (CycleGAN's image pool; 0: off)")
    lambda_cycle: float = opt(10.0, "cycle-consistency weight")
    lambda_identity: float = opt(0.5, "identity weight, multiplied by lambda_cycle as in the reference code")
    lambda_nce: float = opt(0.0, "PatchNCE weight (0: the paper's, 1 for cut, 10 for fastcut)")
    num_patches: int = opt(256, "patches per layer in PatchNCE")
    nce_t: float = opt(0.07, "PatchNCE temperature")
    nce_pixels: bool = opt(True, "PatchNCE compares the RGB input layer too (true, the paper's five layers) or only "
                           "the four feature layers (false, as DCLGAN: a looser tie to the photo's pixels)")
    # recipe tools (off in the faithful presets)
    diffaugment: str = opt("", "DiffAugment policy on everything D sees, real and fake, in D and G steps: any of "
                           "color,translation,cutout (empty: off)")
    ema: float = opt(0.0, "keep an exponential moving average of G with this decay (e.g. 0.999; 0: off); "
                     "validation, samples and export use it")
    lr_d_mult: float = opt(1.0, "discriminator learning rate = lr x this")
    photo_negatives: float = opt(0.0, "cut and fastcut: the discriminators also see photos labelled fake, with this "
                                 "weight on their loss beside the generator's fakes (0: off; Sanakoyeu et al., "
                                 "ECCV 2018), so that a palette alone cannot pass for a painting")
    negatives: str = opt("photo,colour", "what --photo-negatives shows: photo (the real photos), colour (each "
                         "photo's Reinhard colour transfer to its paired painting's Lab statistics), or both")
    lambda_texture: float = opt(0.0, "cut and fastcut: weight of a texture loss on the frozen ImageNet "
                                "EfficientNet-Lite0 (the train extra): each painting's softmax-smoothed feature "
                                "means and standard deviations matched to a random painting's, at full and half "
                                "size (0: off)")
    # optimiser and schedule
    lr: float = opt(2e-4, "Adam learning rate for a global batch of 1; scaled by sqrt(global batch), see README")
    beta1: float = opt(0.5, "Adam beta1")
    beta2: float = opt(0.999, "Adam beta2")
    decay: str = opt("linear", "linear (constant for the first half, then linearly to zero) | none")
    # data
    load_size: int = opt(286, "resize to this square before cropping (0: keep the image's own size)")
    image_size: int = opt(256, "the random crop fed to the networks")
    flip: bool = opt(True, "random horizontal flips (true/false)")
    batch_size: int = opt(1, "images per step per process")
    num_workers: int = opt(4, "data loading processes")
    data_in_memory: str = opt("auto", "decode every image once into the device's memory and crop and flip batches "
                              "there in one gather (no workers, no per-step decode or copy): auto (on CUDA, when "
                              "the images are one size after --load-size and fit in 4 GiB) | on | off. The same "
                              "batches as from disk", run=True)
    # length: `steps` wins when > 0, else epochs x steps_per_epoch (0 = one pass over the photos)
    epochs: int = opt(200, "number of epochs")
    steps_per_epoch: int = opt(0, "steps per epoch (0: one pass over the photos)")
    steps: int = opt(0, "total steps (overrides epochs)")
    seed: int = opt(0, "random seed")
    # speed
    precision: str = opt("auto", "auto (bf16 where the hardware does it natively, else fp32 on CPU, fp16 on "
                         "CUDA) | fp32 | bf16 | fp16")
    compile: bool = opt(False, "torch.compile the networks (true/false)")
    cuda_graph: bool = opt(False, "cut and fastcut on one CUDA GPU: capture the whole training step (both "
                           "updates, DiffAugment, PatchNCE, EMA) once as a CUDA graph and replay it for every batch "
                           "(true/false): one graph launch a step in place of some 1,800 operators. Not with "
                           "--precision fp16, --compile or torchrun", run=True)
    channels_last: bool = opt(True, "run the networks on NHWC tensors (true/false): oneDNN's and cuDNN's fast "
                              "layout; on a 2-core CPU the backward convolutions take about 40%% less time")
    keep_memory: bool = opt(True, "on CPU (glibc): keep freed large blocks in the process for the next step instead "
                            "of returning each to the OS and faulting it in again (true/false): the step about "
                            "1.03-1.18x faster on a 2-core EPYC for 8-14%% more peak memory", run=True)
    compile_norm: str = opt("auto", "on CPU with channels_last, run the instance norms through a torch.compile'd "
                            "kernel, the networks staying eager: forward and backward 4-6x faster than PyTorch's "
                            "NHWC group norm. auto (on for schedules of 1,000 steps or more, where the one-time "
                            "compilation, 2-5 s from the kernel cache and about 35 s on a machine's first run, "
                            "pays back) | on | off. Needs a C++ compiler; without one, PyTorch's kernel and a "
                            "one-line notice")
    # validation: KID of G(validation photos) against the paintings every eval_every steps
    eval_every: int = opt(500, "steps between validations: KID of G(validation photos) vs the paintings, logged "
                          "and used to keep RUN_DIR/best.safetensors (0: off; needs the eval extra)")
    val_photos: str = opt("", "folder of validation photos (default: hold out --val-fraction of --photos)")
    val_fraction: float = opt(0.0, "share of --photos held out for validation (0: min(200 photos, 10%%))")
    # bookkeeping
    log_every: int = opt(50, "steps between log lines")
    checkpoint_every: int = opt(1000, "steps between checkpoints")
    keep_checkpoints: int = opt(3, "checkpoints to keep")
    samples: int = opt(4, "fixed photos in the per-epoch sample grid")

    def __post_init__(self):
        if isinstance(self.compile_norm, bool):  # a config.json written while the field was a switch
            self.compile_norm = "on" if self.compile_norm else "off"
        if self.lambda_nce == 0.0 and self.model in ("cut", "fastcut"):
            self.lambda_nce = 1.0 if self.model == "cut" else 10.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """A configuration from ``asdict`` output, or from a config.json written before the run options
        joined the dataclass (its folders sat under a "folders" key)."""
        data = {**data, **data.get("folders", {})}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.steps if self.steps > 0 else self.epochs * steps_per_epoch


RUN_OPTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["run"])


_CUT = dict(model="cut", discriminator="projected", diffaugment="color,translation,cutout", ema=0.999, ngf=32,
            n_blocks=6, upsample="resize", load_size=0, image_size=128, lr=1e-4, decay="none", log_every=25)
_PHASE2 = dict(discriminator="both", image_size=256, decay="linear")

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
    # The painter recipe (docs/training.md, "The CUT recipe"): CUT in two phases, the projected discriminator on
    # 128-pixel crops at a constant lr, then the PatchGAN beside fresh projected heads on whole 256-pixel images
    # with a linear decay, starting from phase 1's generator (--init-generator). Phase 2 did most of the gain in
    # the team's GPU screen (hidden KID x1000 26.8 -> 17.3).
    "cut-cpu": dict(_CUT, batch_size=4, num_workers=1, steps=2000, checkpoint_every=250, eval_every=500),
    "cut-cpu-256": dict(_CUT | _PHASE2, batch_size=4, num_workers=1, steps=1500, checkpoint_every=50, eval_every=250),
    "cut-gpu": dict(_CUT, batch_size=8, num_workers=8, steps=2000, checkpoint_every=500, eval_every=500),
    "cut-gpu-256": dict(_CUT | _PHASE2, batch_size=8, num_workers=8, steps=1000, checkpoint_every=250, eval_every=250),
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


class ConfigError(ValueError):
    """A problem with the options or the run folder; the message says what to do."""


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """`python -m training.fit`'s options: one per TrainConfig field, with the field's help. Recipe values
    default to the preset's; every flag overrides them."""
    p = argparse.ArgumentParser(
        prog="python -m training.fit", description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every preset value can be overridden by its flag; the resolved configuration is written to "
        "RUN_DIR/config.json and stored in every checkpoint.")
    recipe = p.add_argument_group("recipe (default: the preset's)")
    for f in dataclasses.fields(TrainConfig):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        group = p if meta["run"] or f.name in ("photos", "paintings", "preset") else recipe
        if meta["switch"]:
            group.add_argument(flag, dest=f.name, action="store_true", default=None, help=meta["help"])
        elif f.name == "preset":
            group.add_argument(flag, dest=f.name, choices=list(PRESETS), default="cyclegan", help=meta["help"])
        else:
            kind = {bool: _bool, int: int, float: float, str: str}[type(f.default)]
            group.add_argument(flag, dest=f.name, type=kind, default=None, metavar=f.name.upper(), help=meta["help"],
                               required=f.name == "out")
    return p


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def config_from_args(argv: list[str] | None = None, description: str | None = None) -> TrainConfig:
    """The run's configuration: a new run's preset with the flags applied, or a resumed run's config.json
    with the flags applied (its invocation options from the flags only). Raises ConfigError."""
    from training.checkpoint import list_checkpoints

    args = vars(build_parser(description).parse_args(argv))
    given = {k: v for k, v in args.items() if v is not None and k != "preset"}
    out = Path(given["out"])
    if given.get("resume_if_present"):  # a run that never checkpointed has nothing to lose: start it again
        given["resume"] = bool(list_checkpoints(out))
    if given.get("resume"):
        config_file = out / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"nothing to resume: {out} holds no run (no config.json)")
        try:
            saved = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConfigError(f"{config_file} is damaged; restore it or start a new run with another --out") from None
        saved = {k: v for k, v in TrainConfig.from_dict(saved).__dict__.items() if k not in RUN_OPTIONS}
        for name in ("photos", "paintings"):
            if given.get(name) and saved.get(name) and Path(given[name]).resolve() != Path(saved[name]):
                print(f"note: --{name} {given[name]} differs from the run's {saved[name]}; using {given[name]}",
                      flush=True)
        cfg = TrainConfig.from_dict(saved | given)
    else:
        if not given.get("resume_if_present") and ((out / "config.json").exists() or (out / "checkpoints").exists()):
            raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        cfg = preset_config(args["preset"], **given)
    for name in ("photos", "paintings"):
        if not getattr(cfg, name):
            raise ConfigError(f"--{name} is required" + (" (the run folder does not name it)" if cfg.resume else ""))
        setattr(cfg, name, str(Path(getattr(cfg, name)).resolve()))
    check_config(cfg)
    return cfg


def check_init_generator(cfg: TrainConfig) -> None:
    """Raise ConfigError unless ``cfg.init_generator`` is a readable weight file of the recipe's generator."""
    from model.weights import WeightsError, read_info

    try:
        info, _ = read_info(cfg.init_generator, tensors=False)  # the header: training loads the tensors once
    except WeightsError as exc:
        raise ConfigError(f"--init-generator: {exc}") from None
    ours = generator_settings(cfg)
    if info.architecture != cfg.generator or any(info.settings.get(k) != v for k, v in ours.items()):
        raise ConfigError(f"--init-generator {cfg.init_generator} holds a {info.architecture} generator "
                          f"{info.settings}; the recipe trains a {cfg.generator} generator {ours}")


def check_config(cfg: TrainConfig) -> None:
    """Raise ConfigError naming the first option that cannot work."""
    from training.augment import parse_policy
    from training.objectives import OBJECTIVES

    if cfg.model not in OBJECTIVES:
        raise ConfigError(f"--model must be one of {', '.join(OBJECTIVES)}, not {cfg.model!r}")
    try:
        parse_policy(cfg.diffaugment)
    except ValueError as exc:
        raise ConfigError(f"--diffaugment: {exc}") from None
    if not 0.0 <= cfg.ema < 1.0 or cfg.lr_d_mult <= 0 or cfg.nce_t <= 0 or cfg.lambda_nce < 0:
        raise ConfigError("--ema must be in [0, 1); --lr-d-mult and --nce-t positive; --lambda-nce not negative")
    if cfg.eval_every < 0 or not 0.0 <= cfg.val_fraction <= 0.5 or cfg.num_patches < 1:
        raise ConfigError("--eval-every must not be negative, --val-fraction in [0, 0.5], --num-patches at least 1")
    if cfg.photo_negatives < 0 or cfg.lambda_texture < 0:
        raise ConfigError("--photo-negatives and --lambda-texture must not be negative")
    kinds = [k for k in cfg.negatives.split(",") if k]
    if not kinds or any(k not in ("photo", "colour") for k in kinds):
        raise ConfigError(f"--negatives must be photo, colour or photo,colour, not {cfg.negatives!r}")
    if cfg.discriminator not in ("patch", "projected", "both"):
        raise ConfigError(f"--discriminator must be patch, projected or both, not {cfg.discriminator!r}")
    OBJECTIVES[cfg.model].check(cfg)  # the objective's own rules
    if cfg.init_generator and not cfg.resume:
        check_init_generator(cfg)
    if cfg.generator not in GENERATORS:
        raise ConfigError(f"--generator must be one of {', '.join(GENERATORS)}, not {cfg.generator!r}")
    if cfg.upsample not in ("transpose", "resize"):
        raise ConfigError(f"--upsample must be transpose or resize, not {cfg.upsample!r}")
    if cfg.generator == "unet" and cfg.image_size % 256:
        raise ConfigError(f"the unet generator needs --image-size a multiple of 256, not {cfg.image_size}")
    if cfg.generator == "resnet" and cfg.image_size % 4:
        raise ConfigError(f"the resnet generator needs --image-size a multiple of 4, not {cfg.image_size}")
    if cfg.image_size < 16:
        raise ConfigError(f"--image-size must be at least 16, not {cfg.image_size}")
    if cfg.lr <= 0 or cfg.lambda_cycle < 0 or cfg.lambda_identity < 0 or cfg.pool_size < 0 or cfg.steps < 0:
        raise ConfigError("--lr must be positive; --lambda-*, --pool-size and --steps must not be negative")
    if cfg.load_size and cfg.load_size < cfg.image_size:
        raise ConfigError(f"--load-size {cfg.load_size} is smaller than --image-size {cfg.image_size}")
    if cfg.decay not in ("linear", "none") or cfg.precision not in PRECISIONS:
        raise ConfigError(f"--decay must be linear|none and --precision {'|'.join(PRECISIONS)}")
    if cfg.device not in DEVICES:
        raise ConfigError(f"--device must be {', '.join(DEVICES)}, not {cfg.device!r}")
    if cfg.cuda_graph and (cfg.precision == "fp16" or cfg.compile or cfg.device == "cpu"):
        raise ConfigError("--cuda-graph needs a CUDA device and takes neither --precision fp16 (its loss scaler "
                          "reads the device every step) nor --compile")
    if cfg.compile_norm not in ("auto", "on", "off"):
        raise ConfigError(f"--compile-norm must be auto, on or off, not {cfg.compile_norm!r}")
    for name in ("batch_size", "log_every", "checkpoint_every", "ngf", "ndf", "n_blocks", "epochs"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
