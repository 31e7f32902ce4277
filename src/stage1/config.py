"""Training configuration: the hydra tree under `configs/`, composed with command-line overrides, and checked
before any work starts."""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from .encoders import ENCODERS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")

OmegaConf.register_new_resolver("repo_root", lambda: REPO_ROOT, replace=True)


def load_train_config(overrides: list[str] | None = None, config_dir: str = CONFIG_DIR) -> DictConfig:
    """Compose `train.yaml` with hydra overrides such as `experiment=quickstart data.path=/data`."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides or []))


def validate_train_config(cfg: DictConfig) -> None:
    """One ValueError listing every bad value, raised before any model is built or data is read."""
    problems = []

    def need(condition: bool, key: str, expected: str) -> None:
        if not condition:
            problems.append(f"{key} must be {expected}, got {OmegaConf.select(cfg, key)!r}")

    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ValueError(f"config value missing: {err.full_key} (pass it on the command line, e.g. "
                         f"{err.full_key}=...)") from None
    t, loss, q = cfg.train, cfg.loss, cfg.quantizer
    need(cfg.encoder.cls in ENCODERS, "encoder.cls", f"one of {sorted(ENCODERS)}")
    need(cfg.encoder.path is not None or cfg.encoder.tiny is not None, "encoder.path", "a Hub id or local directory")
    need(cfg.image_size > 0, "image_size", "> 0")
    need(cfg.encoder.input_size is None or cfg.encoder.input_size > 0, "encoder.input_size", "> 0 or null")
    need(cfg.precision in PRECISIONS, "precision", f"one of {PRECISIONS}")
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
    need(q.num_embeddings > 0, "quantizer.num_embeddings", "> 0")
    need(0 <= q.decay < 1, "quantizer.decay", "in [0, 1)")
    need(q.epsilon > 0, "quantizer.epsilon", "> 0")
    need(q.commitment_cost >= 0, "quantizer.commitment_cost", ">= 0")
    for key in ("recon_weight", "lpips_weight", "disc_weight"):
        need(loss[key] >= 0, f"loss.{key}", ">= 0")
    need(loss.disc_start >= 0, "loss.disc_start", ">= 0")
    need(loss.disc_lr > 0, "loss.disc_lr", "> 0")
    need(cfg.model.noise_tau >= 0, "model.noise_tau", ">= 0")
    if problems:
        raise ValueError("invalid training config:\n  - " + "\n  - ".join(problems))
