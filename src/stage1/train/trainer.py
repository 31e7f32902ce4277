"""Decoder training: DDP over torchrun ranks, bf16 autocast on CUDA, the losses of stage1.train.losses, EMA weights,
atomic checkpoints and exact resume.

One optimizer step (Trainer._train_step):
    for each of grad_accum micro-batches:
        x_rec, quantizer_losses = model(x)            frozen encoder -> EMA quantizer -> decoder
        total = VQRAELoss.generator_loss(...)         recon + LPIPS + vq + adaptive-weighted GAN term
        backward(total / grad_accum)                  DDP syncs gradients on the last micro-batch only
    clip, step the optimizer of the decoder (and a multi-scale quantizer's phi; skipped on every rank if any rank
    saw NaN/Inf), update the EMA decoder
    from loss.disc_update_start (default loss.disc_start): the same for the discriminator on (x, x_rec.detach())

Preemption: SIGTERM or SIGUSR1 during the loop finishes the step in progress, checkpoints it and returns with
summary["preempted"] (the signal's name); ranks agree on the step through one all-reduce after each step.
"""

from __future__ import annotations

import math
import os
import signal
import time
import warnings
from contextlib import nullcontext

import torch
from torch.nn.utils import clip_grad_norm_
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from ..base import distributed
from ..base.atomic import write_yaml
from ..base.cpu_threads import USERS_CHOICE, cpu_threads
from ..base.limits import MAX_THREADS
from ..base.precision import autocast, resolve_precision
from ..base.preemption import StopSignals
from ..base.run_lock import run_lock
from ..data.datasets import ImageDataset, build_transform
from ..data.tar_shards import spread_images, training_dataset, training_loader
from ..model.tiny import write_stand_in_encoder
from ..model.vqrae import VQRAE
from . import outputs
from .checkpoint import (
    TRAIN_CONFIG_NAME,
    checkpoint_files,
    checkpoint_to_resume,
    latest_checkpoint,
    remove_stale_temporaries,
    resume_training,
    save_training,
    step_dir_name,
    write_checkpoint,
)
from .codebook_fit import encode_batches, fit_codebook
from .config import RunConfig, check_files
from .log import MetricsLog
from .losses import VQRAELoss


def train(cfg: RunConfig) -> dict:
    """Run (or resume) the training described by cfg; returns a summary on every rank. One run per results_dir:
    a second one into a running one's folder stops in one error (base/run_lock.py)."""
    check_files(cfg)
    # Data first: a wrong folder fails in a second, before any model is loaded (or results_dir made).
    transform = build_transform(cfg.image_size, cfg.data.augment, cfg.data.min_scale, cfg.data.hflip, cfg.data.resize)
    dataset = training_dataset(cfg.data.path, transform, cfg.seed, cfg.data.tar_cache)
    with run_lock(cfg.results_dir, distributed.launched_rank()):
        return _train(cfg, dataset)


def _train(cfg: RunConfig, dataset) -> dict:
    info = distributed.setup(cfg.device, cfg.dist_timeout_minutes)
    threads = torch.get_num_threads()
    try:
        auto_threads = False
        if info.device.type == "cpu":  # torch's default (a thread per core) stalls on a machine with other work
            chosen, why = cpu_threads(cfg.train.cpu_threads, cfg.data.num_workers, info.local_world_size)
            torch.set_num_threads(chosen)
            if info.is_main:
                print(f"threads: {chosen} intra-op per process ({why})")
            auto_threads = why not in USERS_CHOICE
        if cfg.init.tiny_encoder is not None:
            if info.is_main:
                write_stand_in_encoder(cfg.init.tiny_encoder, cfg.model.encoder.path, image_size=cfg.image_size,
                                       seed=cfg.seed)
            distributed.barrier()
        return Trainer(cfg, info, dataset, auto_threads=auto_threads).run()
    finally:
        torch.set_num_threads(threads)  # the caller's (a test or notebook process goes on after the run)
        distributed.teardown()


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def accumulate(logs: dict, values: dict, accum: int) -> None:
    """Add each value's share of the step's mean to logs."""
    for key, value in values.items():
        logs[key] = logs.get(key, 0.0) + value.detach().float() / accum


class Trainer:
    """The model, the loss, their optimizers, the data stream and the counters; run() is the loop."""

    def __init__(self, cfg: RunConfig, info: distributed.DistInfo, dataset: ImageDataset, auto_threads: bool = False):
        """auto_threads: the CPU threads were chosen from the machine's load, so a resumed run takes its checkpoint's
        count instead (the float sums of a step depend on it: the same count resumes bit for bit)."""
        self.cfg, self.info, self.device, self.dataset = cfg, info, info.device, dataset
        self.auto_threads = auto_threads
        self.results_dir = cfg.results_dir
        self.ckpt_root = os.path.join(self.results_dir, "checkpoints")
        self.precision = resolve_precision(cfg.precision, self.device)
        # Same seed on every rank while building, so all ranks start from identical weights and codebook, and a
        # resumed run rebuilds what checkpoints do not hold (a random LPIPS backbone) identically.
        torch.manual_seed(cfg.seed)
        self.model = VQRAE(cfg.model)
        self.model.to(self.device)
        self.model.decoder.gradient_checkpointing = cfg.train.grad_checkpointing
        self.loss = VQRAELoss(cfg.loss).to(self.device)
        self._build_optimizers()
        self.step = self.skipped_images = self.nonfinite_steps = self.nonfinite_in_a_row = 0
        self._resume()
        if self.step == 0:
            torch.manual_seed(cfg.seed + info.rank)
        if cfg.train.compile:  # after the EMA copy was made: it stays an eager module
            self.model.compile_parts()
        self.loader = training_loader(dataset, info.rank, info.world_size, cfg.train.batch_size,
                                      cfg.data.num_workers, cfg.seed, start_batches=self.step * cfg.train.grad_accum,
                                      pin_memory=self.device.type == "cuda")
        self.log = None
        if info.is_main:
            self.log = MetricsLog(self.results_dir, self.step, cfg.wandb_project if cfg.logger == "wandb" else None,
                                  cfg.to_tree())
            write_yaml(os.path.join(self.results_dir, TRAIN_CONFIG_NAME), cfg.to_tree())

    # ---- set-up ---------------------------------------------------------------------------------------------
    def _build_optimizers(self) -> None:
        t, disc = self.cfg.train, self.loss.discriminator
        self.model_ddp = distributed.wrap_ddp(self.model, self.device)
        self.disc_ddp = distributed.wrap_ddp(disc, self.device) if disc is not None else None
        fused = {"fused": True} if self.device.type == "cuda" else {}  # one kernel for the whole update
        groups = self.model.trained_parameter_groups()  # the decoder (and phi)
        self.trained = [p for group in groups for p in group["params"]]
        self.optimizer = torch.optim.AdamW(
            groups, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, **fused
        )
        schedule = warmup_cosine(t.warmup_steps, t.steps, t.min_lr / t.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.disc_optimizer = self.disc_scheduler = None
        if disc is not None:
            c = self.loss.config
            self.disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=c.disc_lr, betas=c.disc_betas,
                                                   weight_decay=c.disc_weight_decay, **fused)
            # Stepped with the decoder's every step, so its lr is the schedule's at the global step (RAE's way).
            self.disc_scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.disc_optimizer, schedule if c.disc_schedule == "cosine" else lambda step: 1.0)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.ema = (
            AveragedModel(self.model.decoder, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay))
            if t.ema_decay is not None
            else None
        )

    # ---- one step -------------------------------------------------------------------------------------------
    def _no_sync(self, module, last: bool):
        """DDP syncs gradients on the last micro-batch only."""
        return module.no_sync() if self.info.enabled and not last else nullcontext()

    def _train_step(self, batches: list[dict]) -> dict[str, torch.Tensor]:
        """One optimizer step over grad_accum micro-batches; a NaN/Inf on any rank skips it on every rank."""
        discriminator_trains = self.loss.discriminator_trains(self.step)  # self.step: steps done so far
        logs, pairs = self._generator_backward(batches)
        finite = self._generator_update(logs)
        if finite and discriminator_trains:
            self._discriminator_update(pairs, logs)
        if self.disc_scheduler is not None:  # like the decoder's: the global step's lr, skipped steps included
            with warnings.catch_warnings():  # before loss.disc_update_start its optimizer has not stepped yet
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                self.disc_scheduler.step()
        if finite:
            self.scaler.update()
        return logs

    def _generator_backward(self, batches: list[dict]) -> tuple[dict, list]:
        logs, pairs, accum = {}, [], len(batches)
        for i, batch in enumerate(batches):
            x = batch["image"].to(self.device, non_blocking=True)
            with self._no_sync(self.model_ddp, last=i == accum - 1), autocast(self.device, self.precision):
                x_rec, quantizer_losses = self.model_ddp(x, return_quantizer_losses=True)
                total, terms = self.loss.generator_loss(x, x_rec, quantizer_losses, self.step,
                                                        self.model.decoder.last_layer)
            self.scaler.scale(total / accum).backward()
            pairs.append((x, x_rec.detach()))
            accumulate(logs, {**terms, "loss": total}, accum)
        return logs, pairs

    def _generator_update(self, logs: dict) -> bool:
        """Clip and step the decoder's (and phi's) optimizer unless the loss or gradient is not finite on some rank."""
        self.scaler.unscale_(self.optimizer)
        logs["grad_norm"] = clip_grad_norm_(self.trained, self.cfg.train.grad_clip or math.inf)
        finite = distributed.all_ranks_true(torch.isfinite(logs["loss"]) & torch.isfinite(logs["grad_norm"]))
        logs["nonfinite"] = torch.tensor(float(not finite))
        if finite:
            self.scaler.step(self.optimizer)
        else:
            self.scaler.update()  # fp16: backs the loss scale off if the gradients overflowed
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # the schedule follows steps taken, skipped or not
        if finite and self.ema is not None:
            self.ema.update_parameters(self.model.decoder)
        return finite

    def _discriminator_update(self, pairs: list, logs: dict) -> None:
        disc = self.loss.discriminator
        self.disc_optimizer.zero_grad(set_to_none=True)
        for i, (x, x_rec) in enumerate(pairs):
            with self._no_sync(self.disc_ddp, last=i == len(pairs) - 1), autocast(self.device, self.precision):
                d_loss = self.loss.discriminator_loss(x, x_rec, self.disc_ddp)
            self.scaler.scale(d_loss / len(pairs)).backward()
            accumulate(logs, {"d_loss": d_loss}, len(pairs))
        self.scaler.unscale_(self.disc_optimizer)
        norm = clip_grad_norm_(disc.parameters(), self.cfg.train.grad_clip or math.inf)
        if distributed.all_ranks_true(torch.isfinite(logs["d_loss"]) & torch.isfinite(norm)):
            self.scaler.step(self.disc_optimizer)
        self.disc_optimizer.zero_grad(set_to_none=True)

    # ---- the run --------------------------------------------------------------------------------------------
    def run(self) -> dict:
        t = self.cfg.train
        stop = t.stop_at or t.steps
        data = iter(self.loader)
        if self.info.is_main:  # the same images in every sample grid and the final report
            names, fixed = outputs.sample_images(self.dataset, t.num_samples, self.cfg.image_size, self.device)
        bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step", disable=not self.info.is_main,
                   mininterval=2.0, dynamic_ncols=True)
        window_start, window_images, last_logs = time.time(), 0, {}
        first_step, stopped_by = self.step, 0
        first = [next(data) for _ in range(t.grad_accum)]
        if self.step == 0 and self.model.quantizer.fit_need == "offline":
            self._start_codebook(first)
        self.model.train()
        with StopSignals() as signals:
            while self.step < stop:
                batches, first = first or [next(data) for _ in range(t.grad_accum)], None
                if self.step == first_step:
                    self.model.check_images(batches[0]["image"])  # pixel values checked once, not synced every step
                logs = self._train_step(batches)
                self.step += 1
                self._count_nonfinite(bool(logs["nonfinite"]))
                window_images += sum(b["image"].shape[0] for b in batches) * self.info.world_size
                skipped = sum(int(b["skipped"].sum()) for b in batches)
                self.skipped_images += distributed.sum_over_ranks(skipped, self.device)
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == stop:
                    last_logs = self._log_step(logs, window_images / max(time.time() - window_start, 1e-9))
                    bar.set_postfix(loss=f"{last_logs['loss']:.4f}", img_s=f"{last_logs['images_per_sec']:.1f}",
                                    refresh=False)
                    window_start, window_images = time.time(), 0
                if self.info.is_main and t.sample_every and (self.step % t.sample_every == 0 or self.step == stop):
                    grid = outputs.save_samples(self.model, self._eval_decoder, fixed, self.precision,
                                                self.results_dir, self.step)
                    self.log.image("samples", grid, self.step)
                # A signal may reach some ranks only, or reach them in different steps: all ranks stop after the
                # first step at whose end any rank had one (SIGTERM wins over SIGUSR1 if both came).
                stopped_by = distributed.max_over_ranks(signals.received, self.device)
                if self.step % t.ckpt_every == 0 or self.step == stop or stopped_by:
                    self._checkpoint()
                if stopped_by:
                    break
        bar.close()
        summary = {"step": self.step, "results_dir": self.results_dir, "logs": last_logs}
        if stopped_by:
            summary["preempted"] = signal.Signals(stopped_by).name
            if self.info.is_main:
                print(f"stopped by {summary['preempted']} at step {self.step}: checkpoint saved to "
                      f"{os.path.join(self.ckpt_root, step_dir_name(self.step))}; resume with the same command")
        elif self.step == t.steps:
            summary["final"] = os.path.join(self.results_dir, "final")
            if self.info.is_main:
                outputs.export_final(self.model, self._eval_decoder, summary["final"])
                if t.report_reconstructions:
                    outputs.report_reconstructions(summary["final"], names, fixed, self.results_dir)
        distributed.barrier()
        if self.log is not None:
            self.log.close()
        return summary

    def _start_codebook(self, first: list[dict]) -> None:
        """Before step 0, one rule: k-means (codebook_fit.iters) of codebook_fit.tokens_per_image latent tokens of
        each of codebook_fit.images center-cropped images spread over the data (this rank's share), or, with
        images=0, of the first step's images; the EMA goes on from there."""
        c, t, info = self.cfg.codebook_fit, self.cfg.train, self.info
        if c.images > 0:
            center = self.dataset.with_transform(build_transform(self.cfg.image_size, "center_crop", hflip=False))
            loader = spread_images(center, c.images, info.rank, info.world_size, t.batch_size,
                                   self.cfg.data.num_workers, self.cfg.seed)
        else:
            loader = first
        images = (batch["image"].to(self.device) for batch in loader)
        result = fit_codebook(
            self.model, encode_batches(self.model, images, autocast(self.device, self.precision)),
            c.tokens_per_image, c.iters,
            tokens_per_update=t.batch_size * info.world_size * self.model.grid_side(self.cfg.image_size) ** 2,
            seed=self.cfg.seed, show_progress=info.is_main,
        )
        summary = {"codebook_fit": True, "tokens": result.tokens, "distortion": result.distortion,
                   "codes_used": result.codes_used, "reseeded": result.reseeded}
        if self.log is not None:
            self.log.write(0, summary, scalars=False)
            self.log.scalars(0, {"fit_distortion": result.distortion, "fit_codes_used": result.codes_used})
            print(f"codebook fit: {self.model.quantizer.describe()}, from {result.tokens} latent tokens; squared "
                  f"error per token {result.distortion:.4f}; {result.codes_used} codes used")

    def _log_step(self, logs: dict, images_per_sec: float) -> dict[str, float]:
        values = distributed.mean_over_ranks({k: float(v) for k, v in logs.items()}, self.device)
        values.update(lr=self.scheduler.get_last_lr()[0], images_per_sec=images_per_sec,
                      skipped_images=self.skipped_images, nonfinite_steps=self.nonfinite_steps)
        if self.log is not None:
            self.log.write(self.step, values)
        return values

    def _count_nonfinite(self, bad: bool) -> None:
        """Skipped steps are counted and logged; too many in a row stop the run (checkpoints stay as they were)."""
        if not bad:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        if self.info.is_main:
            print(f"step {self.step}: NaN/Inf loss or gradient, step skipped "
                  f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_steps} in all)")
        limit = self.cfg.train.max_nonfinite_steps
        if self.nonfinite_in_a_row >= limit:
            last = latest_checkpoint(self.ckpt_root)
            raise FloatingPointError(
                f"{self.nonfinite_in_a_row} steps in a row had NaN/Inf losses or gradients (up to step {self.step}); "
                f"stopping. The last good checkpoint, {last or 'none yet'}, is untouched: lower train.lr, use "
                f"precision=fp32 or check the data, then resume from it."
            )

    # ---- checkpoints (stage1/train/checkpoint.py) ------------------------------------------------------------
    def _stateful(self) -> dict:
        """What a checkpoint holds besides the weights, by the name trainer_state.pt keeps it under."""
        return {"optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler,
                "disc_optimizer": self.disc_optimizer, "disc_scheduler": self.disc_scheduler}

    def _checkpoint(self) -> None:
        identical = distributed.ranks_agree(self.model.trainable_state_dict(), self.device)
        rng = distributed.gather_objects(
            {"cpu": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        )
        if self.info.is_main:
            if not identical:
                print(f"WARNING: step {self.step}: ranks hold different weights or codebooks")
            counters = {"step": self.step, "skipped_images": self.skipped_images,
                        "nonfinite_steps": self.nonfinite_steps, "rng": rng, "world_size": self.info.world_size,
                        "cpu_threads": torch.get_num_threads() if self.device.type == "cpu" else None}
            write_checkpoint(self.ckpt_root, self.step, keep_last=self.cfg.train.keep_last, fill=lambda directory:
                             save_training(directory, self.model, self.ema, self.loss.discriminator, self._stateful(),
                                           counters, self.cfg.to_tree()))
            self.log.write(self.step, {"checkpoint": True, "ranks_identical": identical}, scalars=False)
        distributed.barrier()

    def _resume(self) -> None:
        if self.info.is_main:
            for name in remove_stale_temporaries(self.ckpt_root):
                print(f"resume: removed {name}, left by a writer that was killed")
        distributed.barrier()
        required = checkpoint_files(self.ema is not None, self.loss.discriminator is not None)
        directory = checkpoint_to_resume(self.ckpt_root, self.cfg.train.resume, required)
        if directory is None:
            return
        state = resume_training(directory, self.model, self.ema, self.loss.discriminator, self._stateful())
        self.step, self.skipped_images, self.nonfinite_steps = (state["step"], state["skipped_images"],
                                                                state["nonfinite_steps"])
        self._restore_rng(state["rng"])
        saved = state.get("cpu_threads")  # absent from checkpoints before it was recorded
        # Bounded as train.cpu_threads is: a checkpoint is a file like any other (a million threads crashed torch)
        usable = isinstance(saved, int) and 1 <= saved <= MAX_THREADS
        if self.auto_threads and usable and saved != torch.get_num_threads():
            torch.set_num_threads(saved)
            if self.info.is_main:
                print(f"threads: {saved} intra-op per process, as the run being resumed had (its float sums)")
        if self.info.is_main:
            print(f"resumed from {directory} at step {self.step}")

    def _restore_rng(self, rng: list) -> None:
        if len(rng) != self.info.world_size:
            torch.manual_seed(self.cfg.seed + self.info.rank + self.step)
            if self.info.is_main:
                print(f"resuming on {self.info.world_size} ranks from {len(rng)}: random streams are re-seeded, "
                      f"so the run continues correctly but not bit-identically")
            return
        torch.set_rng_state(rng[self.info.rank]["cpu"])
        if self.device.type == "cuda" and rng[self.info.rank]["cuda"] is not None:
            torch.cuda.set_rng_state(rng[self.info.rank]["cuda"], self.device)

    @property
    def _eval_decoder(self) -> torch.nn.Module:
        """The decoder that samples and the final model use: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.model.decoder
