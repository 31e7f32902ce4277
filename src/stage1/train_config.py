"""Training configuration: the hydra tree under `configs/`, composed with command-line overrides.

The model's groups (encoder, quantizer, decoder, and `model:`) become a VQRAEConfig and the `loss` group a
LossConfig, each checking its own values; `validate_train_config` checks what no constructor sees, and that the
files the run reads exist, before the data folder is scanned.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from .losses import LossConfig
from .model_config import CONFIG_DIR, REPO_ROOT, VQRAEConfig
from .precision import PRECISIONS
from .train_log import LOGGERS

OmegaConf.register_new_resolver("repo_root", lambda: REPO_ROOT, replace=True)
__all__ = ["CONFIG_DIR", "REPO_ROOT", "load_train_config", "validate_train_config", "model_config", "loss_config"]


def load_train_config(overrides: list[str] | None = None, config_dir: str = CONFIG_DIR) -> DictConfig:
    """Compose `train.yaml` with hydra overrides such as `experiment=quickstart data.path=/data`."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides or []))


def model_config(cfg: DictConfig) -> VQRAEConfig:
    """The model's config from the encoder, quantizer, decoder groups and `model:` (the same field names)."""
    values = OmegaConf.to_container(cfg, resolve=True)
    # encoder.tiny is no model value: it asks train() to build the stand-in checkpoint at encoder.path first.
    encoder = {k: v for k, v in values["encoder"].items() if k != "tiny"}
    return VQRAEConfig.from_dict(
        {"encoder": encoder, "quantizer": values["quantizer"], "decoder": values["decoder"], **values["model"]}
    )


def loss_config(cfg: DictConfig) -> LossConfig:
    return LossConfig.from_dict(OmegaConf.to_container(cfg.loss, resolve=True))


def validate_train_config(cfg: DictConfig) -> None:
    """One ValueError listing every bad training value, raised before any model is built or data is read."""
    problems = []

    def need(condition: bool, key: str, expected: str) -> None:
        if not condition:
            problems.append(f"{key} must be {expected}, got {OmegaConf.select(cfg, key)!r}")

    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ValueError(f"config value missing: {err.full_key} (pass it on the command line, e.g. "
                         f"{err.full_key}=...)") from None
    t = cfg.train
    need(cfg.image_size > 0, "image_size", "> 0")
    need(cfg.precision in PRECISIONS, "precision", f"one of {PRECISIONS}")
    need(cfg.logger in LOGGERS, "logger", f"one of {LOGGERS}")
    if cfg.logger == "wandb":
        import importlib.util

        need(importlib.util.find_spec("wandb") is not None, "logger", "tensorboard, or wandb with the wandb package "
             "installed (pip install wandb)")
    need(t.steps > 0, "train.steps", "> 0")
    need(t.batch_size > 0, "train.batch_size", "> 0")
    need(t.grad_accum >= 1, "train.grad_accum", ">= 1")
    need(t.lr > 0, "train.lr", "> 0")
    need(0 <= t.min_lr <= t.lr, "train.min_lr", "between 0 and train.lr")
    need(t.weight_decay >= 0, "train.weight_decay", ">= 0")
    need(t.warmup_steps >= 0, "train.warmup_steps", ">= 0")
    need(t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", "> 0 or null")
    need(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", ">= 1")
    need(t.ema_decay is None or 0 <= t.ema_decay < 1, "train.ema_decay", "in [0, 1) or null")
    need(t.ckpt_every > 0, "train.ckpt_every", "> 0")
    need(t.keep_last is None or t.keep_last >= 1, "train.keep_last", ">= 1 or null")
    need(t.log_every > 0, "train.log_every", "> 0")
    need(t.sample_every is None or t.sample_every > 0, "train.sample_every", "> 0 or null")
    need(t.stop_at is None or 0 < t.stop_at <= t.steps, "train.stop_at", "in [1, train.steps] or null")
    need(cfg.data.num_workers >= 0, "data.num_workers", ">= 0")
    need(cfg.codebook_fit.images >= 0, "codebook_fit.images", ">= 0")
    need(cfg.codebook_fit.tokens_per_image >= 1, "codebook_fit.tokens_per_image", ">= 1")
    need(cfg.codebook_fit.iters >= 0, "codebook_fit.iters", ">= 0")
    # Files the run reads, checked before the data folder is scanned (README, Start from RAE, names them).
    files = ["init.decoder", "model.normalization_stat_path"]
    files += ["loss.dino_path"] if cfg.loss.disc == "dino" and cfg.loss.disc_weight > 0 else []
    for key in files:
        path = OmegaConf.select(cfg, key)
        need(path is None or os.path.isfile(path), key, "an existing file or null")
    if problems:
        raise ValueError("invalid training config:\n  - " + "\n  - ".join(problems))
