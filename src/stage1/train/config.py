"""A training run's configuration: typed sections, composed by hydra from `configs/`, checked once.

    RunConfig                                       the hydra tree (configs/train.yaml and its groups)
        model: VQRAEConfig                          encoder/ quantizer/ decoder/ groups, noise_tau,
                                                    normalization_stat_path, normalization_eps and
                                                    pretrained_decoder_path at the top level (as in config.json)
        loss: LossConfig                            loss/
        data: DataConfig                            data/
        codebook_fit: CodebookFitConfig             codebook_fit:
        train: TrainConfig                          train:
        init: InitConfig                            init:
        results_dir, seed, device, precision, ...   the top level

The defaults live in the dataclasses, and only there: hydra composes `configs/train.yaml` on top of them (the
node `run_defaults`, generated from the dataclasses), so every YAML file states only what it changes. The one step
from the composed tree to the typed config is `run_config`: every value checked by the section that owns it, types
first, an unknown key (`+train.stepz=3` too) refused.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from ..base.atomic import read_yaml
from ..base.codebook_start import CodebookFitConfig
from ..base.config_section import ConfigError, ConfigSection, choice
from ..base.limits import MAX_IMAGE_SIDE, MAX_THREADS, MAX_WORKERS
from ..base.precision import PRECISIONS
from ..model.config import VQRAEConfig
from ..model.presets import ASSETS_DIR, CONFIG_DIR
from ..model.tiny import TinyEncoderConfig
from .losses import LossConfig

OmegaConf.register_new_resolver("assets_dir", lambda: ASSETS_DIR, replace=True)  # the photos shipped in the package
__all__ = ["CONFIG_DIR", "RunConfig", "TrainConfig", "DataConfig", "CodebookFitConfig", "InitConfig",
           "check_files", "compose_tree", "load_run_config", "run_config"]
MODEL_KEYS = ("encoder", "quantizer", "decoder", "noise_tau", "normalization_stat_path", "normalization_eps",
              "pretrained_decoder_path")  # the model in the tree


@dataclass
class TrainConfig(ConfigSection):
    section = "train"
    steps: int = 200000  # optimizer steps
    batch_size: int = 32  # per rank and micro-batch
    grad_accum: int = 1
    lr: float = 2e-4
    min_lr: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 2000
    grad_clip: float | None = 1.0  # null: no clipping
    max_nonfinite_steps: int = 20  # NaN/Inf steps are skipped; this many in a row stop the run
    ema_decay: float | None = 0.9999  # EMA of the decoder weights (null: none)
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile the encoder and decoder forward (pays off on a GPU)
    cpu_threads: int | None = None  # CPU runs: intra-op threads per process (null: the idle cores; base/cpu_threads.py)
    ckpt_every: int = 5000
    keep_last: int | None = 3  # checkpoints kept (null: all)
    log_every: int = 50
    sample_every: int | None = 2500  # null: no sample grids during training
    num_samples: int = 8  # images in the sample grid and the final report
    resume: str | None = "auto"  # auto (newest checkpoint in results_dir) | null | a checkpoint directory
    stop_at: int | None = None  # stop after checkpointing at this step (fit a job time limit); resume later
    report_reconstructions: bool = True  # at the end: reconstruct num_samples images, print PSNR, save a grid

    def check(self):
        self.require_positive("steps", "batch_size", "grad_accum", "lr", "max_nonfinite_steps", "ckpt_every",
                              "log_every", "num_samples")
        self.require(0 <= self.min_lr <= self.lr, "min_lr", f"in [0, train.lr = {self.lr}]")
        self.require(all(0 <= b < 1 for b in self.betas), "betas", "two numbers in [0, 1)")
        self.require(self.weight_decay >= 0, "weight_decay", ">= 0")
        self.require(self.warmup_steps >= 0, "warmup_steps", ">= 0")
        self.require(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "> 0 or null")
        self.require(self.ema_decay is None or 0 <= self.ema_decay < 1, "ema_decay", "in [0, 1) or null")
        self.require(self.keep_last is None or self.keep_last >= 1, "keep_last", ">= 1 or null")
        self.require(self.cpu_threads is None or 1 <= self.cpu_threads <= MAX_THREADS, "cpu_threads",
                     f"from 1 to {MAX_THREADS} or null (auto)")
        self.require(self.sample_every is None or self.sample_every > 0, "sample_every", "> 0 or null")
        self.require(self.stop_at is None or 0 < self.stop_at <= self.steps, "stop_at",
                     f"in [1, train.steps = {self.steps}] or null")


@dataclass
class DataConfig(ConfigSection):
    section = "data"
    path: str  # an ImageFolder tree, a flat folder of images, or tar shards ('x/{000000..000099}.tar')
    augment: str = choice("random_resized_crop", "resize_random_crop", "center_crop")
    min_scale: float = 0.8  # random_resized_crop: the smallest area kept
    resize: int | None = None  # resize_random_crop: the shorter side before the random crop (RAE: 384 -> 256)
    hflip: bool = True
    num_workers: int = 8
    tar_cache: str | None = None  # tar shards given as URLs (pipe:, https://, ...) are copied here once

    def check(self):
        self.require(0 < self.min_scale <= 1, "min_scale", "in (0, 1]")
        self.require(self.resize is None or 0 < self.resize <= MAX_IMAGE_SIDE, "resize",
                     f"null or from 1 to {MAX_IMAGE_SIDE}")
        self.require(0 <= self.num_workers <= MAX_WORKERS, "num_workers", f"from 0 to {MAX_WORKERS}")


@dataclass
class InitConfig(ConfigSection):
    """Where weights start from (a resumed run takes its checkpoint's instead)."""

    section = "init"
    tiny_encoder: TinyEncoderConfig | None = None  # a stand-in encoder's recipe: built at encoder.path first


@dataclass
class RunConfig(ConfigSection):
    model: VQRAEConfig
    data: DataConfig
    loss: LossConfig = field(default_factory=LossConfig)
    codebook_fit: CodebookFitConfig = field(default_factory=CodebookFitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    init: InitConfig = field(default_factory=InitConfig)
    results_dir: str = "results/run"
    seed: int = 0
    device: str = choice("auto", "cuda", "cpu")  # auto: cuda if available
    precision: str = choice(*PRECISIONS)  # auto: bf16 autocast on CUDA, fp32 on CPU
    dist_timeout_minutes: float = 30.0  # bound on every collective: a dead rank fails the job instead of hanging
    logger: str = choice("tensorboard", "wandb")  # wandb: Weights & Biases beside TensorBoard (pip install wandb)
    wandb_project: str = "vqrae"  # with logger=wandb; the run's name is the results_dir's
    image_size: int = 256  # training crops

    def check(self):
        self.require(1 / 60 <= self.dist_timeout_minutes <= 7 * 24 * 60, "dist_timeout_minutes",
                     "from 1/60 (a second) to 10080 (a week)")
        self.require(-(2**63) <= self.seed < 2**63, "seed", "a 64-bit integer")
        self.require_at_most(MAX_IMAGE_SIDE, "image_size")
        self.require(self.logger != "wandb" or importlib.util.find_spec("wandb") is not None, "logger",
                     "tensorboard, or wandb with the wandb package installed (pip install wandb)")
        if self.data.augment == "resize_random_crop" and (self.data.resize or 0) < self.image_size:
            raise ConfigError(f"data.resize must be >= image_size ({self.image_size}) with "
                              f"data.augment=resize_random_crop, got {self.data.resize!r}")

    def to_tree(self) -> dict:
        """The hydra tree of this config (what a run's train_config.yaml holds)."""
        return flat_tree(self.to_dict())


def flat_tree(values: dict) -> dict:
    """RunConfig's values with the model's keys at the top level, as the hydra tree and config.json have them."""
    values = dict(values)
    model = values.pop("model")
    return {**{k: model[k] for k in MODEL_KEYS}, **values}


def run_config(tree: DictConfig | dict) -> RunConfig:
    """The one step from a composed hydra tree to the typed config."""
    if isinstance(tree, DictConfig):
        try:
            tree = OmegaConf.to_container(tree, resolve=True, throw_on_missing=True)
        except MissingMandatoryValue as err:
            raise ConfigError(f"config value missing: {err.full_key} (pass it on the command line, e.g. "
                              f"{err.full_key}=...)") from None
    values = dict(tree)
    model = {k: values.pop(k) for k in MODEL_KEYS if k in values}
    if "model" in values:
        raise ConfigError(f"unknown config key 'model': the model's values are {', '.join(MODEL_KEYS)} (encoder, "
                          f"quantizer and decoder with their keys)")
    return RunConfig.from_dict({**values, "model": model})


def compose_tree(overrides: list[str] | None = None, config_dir: str = CONFIG_DIR) -> DictConfig:
    """`configs/train.yaml` composed with hydra overrides such as `experiment=quickstart data.path=/data`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    defaults = OmegaConf.create(flat_tree(RunConfig.default_tree()))
    # encoder.params is the encoder class's own options, which EncoderConfig checks: hydra's struct mode would refuse
    # every key of it (`encoder.params.normalize=false`) as unknown to the tree.
    OmegaConf.set_struct(defaults.encoder.params, False)
    ConfigStore.instance().store(name="run_defaults", node=defaults)
    check_config_files(config_dir, list(overrides or []))
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides or []))


def check_config_files(config_dir: str, overrides: list[str]) -> None:
    """Every YAML file hydra may compose from (the config folder, and the folders `hydra.searchpath` names, file://
    or pkg://, their linked folders included) is read through base.atomic.read_yaml first: its size and alias
    expansion bounded (OmegaConf expanded a 400-byte file of nested aliases until the process hung or crashed). A
    group's choice may not climb out of its folder (experiment=../../x would read a file no walk saw)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    folders, choices = [config_dir], []
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.key_or_group == "hydra.searchpath" and isinstance(override.value(), list):
            for entry in map(str, override.value()):
                if entry.startswith("file://"):
                    folders.append(entry[len("file://"):])
                elif entry.startswith("pkg://"):
                    folders += _package_folders(entry[len("pkg://"):])
        elif isinstance(override.value(), str):
            choices.append((override.key_or_group, override.value()))
    groups = {name for folder in folders if os.path.isdir(folder) for name in os.listdir(folder)}
    for key, value in choices:
        if key in groups and ".." in re.split(r"[/\\]", value):
            raise ConfigError(f"{key}={value} climbs out of the {key} folder: expected a name of a file in it "
                              f"(hydra.searchpath adds folders)")
    seen = set()
    for folder in folders:
        for root, subfolders, names in os.walk(folder, followlinks=True):
            real = os.path.realpath(root)
            if real in seen:  # a link back up the tree: walked once
                subfolders.clear()
                continue
            seen.add(real)
            for name in sorted(names):
                if name.endswith((".yaml", ".yml")):
                    read_yaml(os.path.join(root, name))


def _package_folders(name: str) -> list[str]:
    """The folders of a searchpath's pkg://a.b (or a/b) as hydra finds them: a package's, or every part of a
    namespace package's; none for a package that cannot be found (hydra skips it)."""
    try:
        spec = importlib.util.find_spec(name.replace("/", ".").rstrip("."))
    except (ImportError, ValueError):
        return []
    return list(spec.submodule_search_locations or []) if spec is not None else []


def load_run_config(overrides: list[str] | None = None, config_dir: str = CONFIG_DIR) -> RunConfig:
    return run_config(compose_tree(overrides, config_dir))


def check_files(run: RunConfig) -> None:
    """The files a run reads exist: checked before the data folder is scanned."""
    files = {"pretrained_decoder_path": run.model.pretrained_decoder_path,
             "normalization_stat_path": run.model.normalization_stat_path}
    if run.loss.disc == "dino" and run.loss.disc_weight > 0:
        files["loss.dino_path"] = run.loss.dino_path
    for key, path in files.items():
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{key} must be an existing file or null, got {path!r}")
