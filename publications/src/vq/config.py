"""Experiment configuration: YAML -> typed dataclasses, `--set` overrides, validation.

A YAML file fully determines a run. Defaults live here, once, and they are the paper's
config (tests/test_recipe_options.py pins that vqseq2seq_brats_2d_missing_3_256.yaml loads to
exactly them). Unknown or mistyped keys are errors that name the key and list the valid ones.
The config that ran is saved into the run folder by the training script.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vq.sequences import NAMINGS, SEQUENCES

REPO_ROOT = Path(__file__).resolve().parents[3]
"""The repository root; relative paths in configs are resolved against it."""


AMP_MODES = ("auto", "bf16", "fp16", "none")


class ConfigError(ValueError):
    """A config problem a user can fix, with the offending key in the message."""


@dataclass
class DataConfig:
    root: str = "data/BraTS2021"
    """BraTS-layout folder: <root>/<ID>/<ID>_{t1,t1ce,t2,flair,seg}.nii.gz."""
    naming: str = "brats2021"
    """File names in each subject folder: `brats2021` (<ID>_t1.nii.gz ...) or `brasyn` (BraTS-GLI 2023:
    <ID>-{t1n,t1c,t2w,t2f,seg}.nii.gz, t1n = t1, t1c = t1ce, t2w = t2, t2f = flair)."""
    lists: str | None = None
    """Folder with train.csv/valid.csv/test.csv; defaults to `root`."""
    missing: bool = True
    """Training subjects keep only the neighbouring pair chosen by n mod 3 (docs/method.md)."""
    n_slices: int = 128
    """Central axial slices used per volume."""
    crop: int = 192
    """Training random crop and valid/test centre crop (pixels)."""
    train_crop: int | None = None
    """Training crop when smaller than `crop` (None, or not smaller: `crop`, as the reference): drawn
    inside the centred `crop` window, so that a short CPU run sees mostly brain (the model is
    convolutional and is validated and tested on `crop`)."""
    percentile: float = 99.0
    """Normalisation: clip to [0, 2 x this percentile], map to [-1, 1]."""
    slices_per_subject: int = 4
    """Training pairs drawn per subject per epoch (an epoch = this x subjects pairs); the reference's `rep_step`."""
    group_by_subject: bool = True
    """The `slices_per_subject` pairs of a subject are consecutive items of the epoch and share one
    left-right flip, as in the reference, which loads a subject once and draws its pairs from it.
    False: every item is shuffled and flipped on its own."""
    offsets: str = "reference"
    """Random slice and crop offsets: `reference` draws 0..n-size-1 (the reference's randint, which
    never draws the last offset: slices 0..126 of 128, crop offsets 0..47 of 0..48); `full` draws 0..n-size."""
    augment: bool = True
    """Intensity augmentation of the inputs (docs/method.md, step 1)."""
    augment_mode: str = "reference"
    """`reference`: the whole image, background included, no clamp, the reference's bias field
    (9 monomials x^i y^j, i, j <= 2, of raw pixel coordinates with N(0, 1) coefficients);
    `foreground`: background stays -1, the result is clamped to [-1, 1], a field of 5 monomials
    on coordinates in [-1, 1]."""
    flip: bool = True
    """Random left-right flip in training."""
    cache_dir: str = "outputs/cache"
    """Preprocessed slice cache (memory maps)."""
    cache_dtype: str = "float16"
    """Cached slices in float16 (half the disk; within 2.4e-4 of the reference's float32 values) or float32."""
    num_workers: int = -1
    """DataLoader workers; -1 = sized to the machine."""
    skip_bad: bool = False
    """Train without subjects whose files are missing or broken (default: such a subject stops the
    run before its first step, naming it)."""

    @property
    def training_crop(self) -> int:
        """The side of a training crop: `train_crop` when smaller than `crop`, else `crop`."""
        return min(self.train_crop or self.crop, self.crop)


@dataclass
class ModelConfig:
    quantize: bool = True
    """False gives the Seq2Seq ablation: no quantizer."""
    base_channels: int = 64
    n_down: int = 2
    n_res: int = 6
    embed_dim: int = 3
    """D: codebook vector size."""
    n_embed: int = 256
    """K: codebook size."""
    beta: float = 0.25
    legacy_beta: bool = True
    """True: beta weights the codebook term ||z_q - sg[z_e]||^2 (the reference's form)."""
    restart_after: int = 0
    """Move a code unused for this many training steps onto a random z_e; 0 = never (the paper)."""
    codebook_init: str = "uniform"
    """`uniform`: U(-1/K, 1/K), the paper's; `kmeans`: k-means of the first training batch's z_e
    (a data-dependent init, not in the paper)."""
    code_dim: int = 64
    """c_s: length of the target-sequence code."""
    n_kernels: int = 16
    """c_w: kernels in each hyper-conv bank."""
    hyper_bias: str = "own"
    """Hyper-conv bias = bank x mixing coefficients: `own` gives the bias its own mixing Linear (the
    reference); `shared` reuses the kernel's coefficients (checkpoints made before this switch)."""
    source_code: bool = False
    """The encoder is told which sequence it reads: its first conv is a hyper-conv of the source sequence's
    code (as the encoder of the authors' later nnSeq2Seq). Not the paper's network (false): there a T1 and a
    T2 crop, close to each other's negatives after the first InstanceNorm, are told apart by the image alone.
    A domain-augmented source is read with the code it was translated to."""
    init: str = "reference"
    """`reference`: Conv2d weights Kaiming-normal (fan_in, a=0), every Conv2d/Linear bias 0, hyper-conv
    banks Kaiming-normal over (in x k x k x n_kernels); `pytorch`: PyTorch's default inits."""


@dataclass
class TrainConfig:
    epochs: int = 1000
    max_steps: int = 1_000_001
    """The reference counts a step, then stops once the count exceeds 1e6: 1,000,001 steps."""
    batch_size: int = 1
    lr: float = 1e-4
    min_lr: float = 1e-6
    lr_power: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.05
    warmup_steps: int = 0
    """Linear learning-rate warm-up over the first steps, times the poly schedule (0 = none, the paper)."""
    code_lr_scale: float = 1.0
    """The lr of the target code's path into the decoder (its embedding and the hyper-convs' mixing
    Linears) times this (1 = one lr for all, the paper). The mixers start small under the reference
    init and move slowly, so the decoder first learns the mean of the four targets."""
    ema_decay: float = 0.0
    """Exponential moving average of the weights (decay per step, e.g. 0.99): validation, sample grids
    and the checkpoints' inference weights use the average (0 = off, the paper). nnSeq2Seq keeps one."""
    quantizer_warmup: int = 0
    """Training steps in which the latent bypasses the quantizer's lookup (z_e decodes directly, no
    VQ loss); the codebook starts (k-means with model.codebook_init) on the first quantized step and
    only a quantized model can become ckpt_best (0 = quantized from the first step, the paper)."""
    pretrain_epochs_contrast: int = 100
    """The contrastive term joins the consistency loss once the 0-based epoch is greater than this."""
    pretrain_epochs_rand: int = 200
    """VQC sampling and domain augmentation start once the 0-based epoch is greater than this."""
    consistency: bool = True
    sampling: bool = True
    domain_aug: bool = True
    lambda_l1: float = 10.0
    lambda_ssim: float = 1.0
    lambda_per: float = 0.1
    lambda_vq: float = 10.0
    lambda_con: float = 10.0
    temperature: float = 0.07
    contrast_keep: float = 0.125
    """Share of positions (lowest density) used by the contrastive term."""
    con_mse: str = "all"
    """Consistency MSE: `all` averages the masked squared difference over all latent positions (the
    reference; background counts as 0); `foreground` averages over foreground positions only."""
    contrast: str = "reference"
    """Contrastive term: `reference` (density of the masked source latent over all positions, lowest
    share of all positions, SupCon both ways and summed, / batch^2); `text` (the paper text's reading:
    density of both latents over foreground positions at the temperature, one symmetric InfoNCE)."""
    random_code: str = "reference"
    """Domain augmentation's uniform code: `reference` draws U(0, 1) on all code_dim positions;
    `sequences` only on the N_SEQ sequence positions (the others' embedding columns never see a target)."""
    skip_degenerate: bool = True
    """Skip a step whose augmented input is empty or constant (mean == -1 or std < 1e-8), as the reference."""
    vgg_weights: str | None = None
    """Local VGG19 ImageNet weights file; None = torchvision's cache."""
    amp: str = "auto"
    """Mixed precision: auto (bf16 on CUDA, fp16 where CUDA lacks bf16; bf16 on CPUs with bf16 units, else fp32), bf16, fp16 (CUDA), none."""
    channels_last: bool = False
    checkpointing: bool = False
    """Activation checkpointing of encoder, decoder and VGG blocks: far less memory, about 1/3 more compute."""
    compile: bool = False
    """torch.compile the training step's forward and loss (one graph; docs/speed.md: off where it does not pay)."""
    sync_free: bool | None = None
    """True: the step never waits for the device, a batch of mixed target codes decodes as one
    grouped convolution; False: the decoder groups the batch by code on the host first (1.5x faster
    decoding on a CPU, where the read costs nothing); None: True except eager on a CPU."""
    cuda_graph: bool = False
    """Capture the whole training step as a CUDA graph per phase and replay it (CUDA, one process,
    no compile, no checkpointing): for small batches, where the GPU waits on kernel launches."""
    val_slices: int = 16
    """Central slices per volume used by validation."""
    val_identity: bool = True
    """Validation PSNR also averages the source == target reconstructions (the reference's ckpt_best)."""
    val_every: int = 1
    """Validate every this many epochs."""
    val_at_end: bool = True
    """Also validate (and maybe keep as ckpt_best) the model where max_steps ends a run mid-epoch;
    the reference returns there without validating (false)."""
    log_every: int = 50
    """Steps between log.csv / TensorBoard rows; the statistics are read from the device only then."""
    dist_timeout_s: int = 1800
    """Under torchrun: how long a collective waits for the other processes (seconds)."""
    ckpt_every_steps: int = 0
    """Also save ckpt_last.pth every this many steps (0 = once per epoch)."""
    keep_every_epochs: int = 0
    """Also keep the weights every this many epochs as ckpt_epoch_NNNN.pth, for a quality-against-steps
    curve (tools/demo_curve.py --snapshots); 0 = none."""


@dataclass
class TestConfig:
    batch_size: int = 16
    """Slices per inference batch."""
    amp: str = "none"
    """Precision of validation, evaluation and synthesis: `none` = fp32 (the reference; paper tables),
    or auto / bf16 / fp16 as train.amp, an explicit choice."""
    lpips_weights: str | None = None
    """Local AlexNet ImageNet weights for LPIPS; None = torchvision's cache."""
    multi_step: list[list[str]] = field(default_factory=lambda: [
        ["t1", "t1ce", "t2"], ["t1", "t1ce", "t2", "flair"]])
    """Multi-step translation paths evaluated beside the single-step rows."""
    save_nifti: bool = True
    n_slices: int | None = None
    """Central slices evaluated per volume (None, or not fewer: all `data.n_slices`, the paper's
    protocol). Fewer only to make a CPU demo quicker: its numbers are then not the protocol's."""
    compile: bool = False
    """torch.compile inference (encode and decode, one graph each) in evaluation, the claim scripts,
    synthesis and BraSyn completion: a compilation per run, repaid only on long runs (docs/speed.md)."""


@dataclass
class Config:
    name: str = "vqseq2seq_brats_2d_missing_3_256"
    out_dir: str = "outputs/ckpt/vqseq2seq/brats/2d"
    """The run folder: config copy, logs, images, checkpoints."""
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: TestConfig = field(default_factory=TestConfig)

    @property
    def lists_dir(self) -> Path:
        return resolve_path(self.data.lists or self.data.root)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_path(path: str | Path) -> Path:
    """A config path: absolute, `~`-expanded, or relative to the repository root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def _keys(cls, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            out += _keys(hint, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def valid_keys() -> list[str]:
    return _keys(Config)


def _coerce(value, hint, key: str):
    """Check/convert one value against its type hint; raise ConfigError naming the key."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: None is not allowed")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {hint} for {key}")


def _build(cls, raw: dict, prefix: str = ""):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in names]
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!r}; valid keys: "
                          + ", ".join(k for k in valid_keys() if k.startswith(prefix)))
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    checks = [
        (cfg.train.amp in AMP_MODES, "train.amp must be auto, bf16, fp16 or none"),
        (cfg.test.amp in AMP_MODES, "test.amp must be none, auto, bf16 or fp16"),
        (cfg.data.offsets in ("reference", "full"), "data.offsets must be reference or full"),
        (cfg.data.naming in NAMINGS, f"data.naming must be {' or '.join(NAMINGS)}, got {cfg.data.naming!r}"),
        (cfg.data.cache_dtype in ("float16", "float32"), "data.cache_dtype must be float16 or float32"),
        (cfg.data.augment_mode in ("reference", "foreground"), "data.augment_mode must be reference or foreground"),
        (cfg.data.slices_per_subject >= 1, "data.slices_per_subject must be >= 1"),
        (cfg.model.codebook_init in ("uniform", "kmeans"), "model.codebook_init must be uniform or kmeans"),
        (cfg.model.hyper_bias in ("own", "shared"), "model.hyper_bias must be own or shared"),
        (cfg.model.init in ("reference", "pytorch"), "model.init must be reference or pytorch"),
        (cfg.train.con_mse in ("all", "foreground"), "train.con_mse must be all or foreground"),
        (cfg.train.contrast in ("reference", "text"), "train.contrast must be reference or text"),
        (cfg.train.random_code in ("reference", "sequences"), "train.random_code must be reference or sequences"),
        (cfg.data.crop % (2 ** cfg.model.n_down) == 0, "data.crop must be divisible by 2**model.n_down"),
        (cfg.data.train_crop is None or (cfg.data.train_crop > 0 and cfg.data.train_crop % (2 ** cfg.model.n_down) == 0),
         "data.train_crop must be positive and divisible by 2**model.n_down (or null)"),
        (cfg.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (cfg.train.code_lr_scale > 0, "train.code_lr_scale must be > 0 (1 = one lr for all)"),
        (cfg.train.warmup_steps >= 0, "train.warmup_steps must be >= 0 (0 = no warm-up)"),
        (0 <= cfg.train.ema_decay < 1, "train.ema_decay must be in [0, 1) (0 = no weight average)"),
        (cfg.train.quantizer_warmup >= 0, "train.quantizer_warmup must be >= 0 (0 = quantized from the start)"),
        (cfg.model.restart_after >= 0, "model.restart_after must be >= 0 (0 = no codebook restarts)"),
        (cfg.data.n_slices >= 1, "data.n_slices must be >= 1"),
        (cfg.test.n_slices is None or cfg.test.n_slices >= 7,
         "test.n_slices must be at least 7 (the 3D SSIM window), or null (all)"),
        (0 < cfg.train.contrast_keep <= 1, "train.contrast_keep must be in (0, 1]"),
        (len(cfg.train.betas) == 2, "train.betas must have two values"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _validate_paths(cfg.test.multi_step)


def _validate_paths(paths: list[list[str]]) -> None:
    """test.multi_step: known sequences, 3 or more per path, and one path per (first, last) pair,
    since the summary keys its rows by source and target."""
    ends = {}
    for path in paths:
        unknown = [name for name in path if name not in SEQUENCES]
        if unknown:
            raise ConfigError(f"test.multi_step: unknown sequence {unknown[0]!r} in {path}; "
                              f"valid: {', '.join(SEQUENCES)}")
        if len(path) < 3 or any(a == b for a, b in zip(path, path[1:])):
            raise ConfigError(f"test.multi_step: {path} is not a multi-step path "
                              "(3 or more sequences, no sequence twice in a row)")
        if (path[0], path[-1]) in ends:
            raise ConfigError(f"test.multi_step: {ends[path[0], path[-1]]} and {path} both go from "
                              f"{path[0]} to {path[-1]}; the summary has one row per source and target")
        ends[path[0], path[-1]] = path


def parse_overrides(items: list[str] | None) -> dict:
    """`--set a.b=value` items -> nested dict; values parsed as YAML scalars."""
    nested: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=10")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in valid_keys():
            raise ConfigError(f"--set: unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(text) if text.strip() else None
    return nested


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file's mapping with its `base:` chain merged in (the file's own keys win).

    `base: other.yaml` is resolved against the file's folder, so an ablation file holds only
    what it changes; the run folder still gets the fully resolved config.
    """
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: base: chain loops back to this file")
    if not path.is_file():
        raise ConfigError(f"config file {path} not found" + (f" (base: of {seen[-1]})" if seen else ""))
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file name, got {base!r}")
    return _merge(_read_yaml(path.parent / base, (*seen, path)), raw)


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Load a YAML config (or only defaults when `path` is None), its `base:` chain, and overrides."""
    raw = _read_yaml(Path(path)) if path is not None else {}
    over = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    cfg = _build(Config, _merge(raw, over))
    _validate(cfg)
    return cfg


def missing_keys(path: str | Path) -> list[str]:
    """The config keys that a config file (with its `base:` chain) does not set: a run saved before
    those settings existed takes today's defaults for them."""
    raw = _read_yaml(Path(path))

    def has(key: str) -> bool:
        node = raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    return [key for key in valid_keys() if not has(key)]


def get_key(cfg: Config, key: str):
    """The value of a dotted config key, e.g. get_key(cfg, "train.lr")."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
