"""Decoder training: DDP over torchrun ranks, bf16 autocast on CUDA, the losses of stage1.losses, EMA weights,
atomic checkpoints and exact resume.

One optimizer step (Trainer._train_step):
    for each of grad_accum micro-batches:
        x_rec, quantizer_losses = model(x)            frozen encoder -> EMA quantizer -> decoder
        total = VQRAELoss.generator_loss(...)         recon + LPIPS + vq + adaptive-weighted GAN term
        backward(total / grad_accum)                  DDP syncs gradients on the last micro-batch only
    clip, step the decoder's optimizer (skipped on every rank if any rank saw NaN/Inf), update the EMA decoder
    after loss.disc_start: the same for the discriminator on (x, x_rec.detach())
"""

from __future__ import annotations

import itertools
import math
import os
import time
import warnings
from contextlib import contextmanager, nullcontext

import torch
from safetensors.torch import save_file
from torch.nn.utils import clip_grad_norm_
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from torchvision.utils import make_grid
from tqdm import tqdm

from . import distributed
from .atomic import write_yaml
from .codebook_fit import encode_batches, fit_codebook
from .data import ImageDataset, ResumableDistributedSampler, build_transform
from .images import psnr, save_png
from .losses import VQRAELoss
from .precision import autocast, resolve_precision
from .rae import load_rae_decoder
from .tar_shards import TarStream, training_dataset
from .tiny import write_stand_in_encoder
from .train_checkpoint import (
    DISCRIMINATOR_NAME,
    EMA_WEIGHTS_NAME,
    STATE_NAME,
    TRAIN_CONFIG_NAME,
    latest_checkpoint,
    missing_files,
    read_state,
    read_tensors,
    remove_stale_temporaries,
    write_checkpoint,
    write_state,
)
from .train_config import RunConfig, check_files
from .train_log import MetricsLog
from .vqrae import CONFIG_NAME, VQRAE, WEIGHTS_NAME


def train(cfg: RunConfig) -> dict:
    """Run (or resume) the training described by cfg; returns a summary on every rank."""
    check_files(cfg)
    # Data first: a wrong folder fails in a second, before any model is loaded.
    transform = build_transform(cfg.image_size, cfg.data.augment, cfg.data.min_scale, cfg.data.hflip, cfg.data.resize)
    dataset = training_dataset(cfg.data.path, transform, cfg.seed, cfg.data.tar_cache)
    info = distributed.setup(cfg.device, cfg.dist_timeout_minutes)
    try:
        if cfg.init.tiny_encoder is not None:
            if info.is_main:
                write_stand_in_encoder(cfg.init.tiny_encoder, cfg.model.encoder.path, image_size=cfg.image_size,
                                       seed=cfg.seed)
            distributed.barrier()
        return Trainer(cfg, info, dataset).run()
    finally:
        distributed.teardown()


@contextmanager
def using_decoder(model: VQRAE, decoder: torch.nn.Module):
    """Temporarily run `model` with another decoder (the EMA copy)."""
    original = model.decoder
    model.decoder = decoder
    try:
        yield model
    finally:
        model.decoder = original


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

    def __init__(self, cfg: RunConfig, info: distributed.DistInfo, dataset: ImageDataset):
        self.cfg, self.info, self.device, self.dataset = cfg, info, info.device, dataset
        self.results_dir = cfg.results_dir
        self.ckpt_root = os.path.join(self.results_dir, "checkpoints")
        self.precision = resolve_precision(cfg.precision, self.device)
        # Same seed on every rank while building, so all ranks start from identical weights and codebook, and a
        # resumed run rebuilds what checkpoints do not hold (a random LPIPS backbone) identically.
        torch.manual_seed(cfg.seed)
        self.model = VQRAE(cfg.model)
        if cfg.init.decoder is not None:
            load_rae_decoder(self.model.decoder, cfg.init.decoder)
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
        self.loader = self._build_loader()
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
        self.optimizer = torch.optim.AdamW(
            self.model.decoder.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, **fused
        )
        schedule = warmup_cosine(t.warmup_steps, t.steps, t.min_lr / t.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.disc_optimizer = self.disc_scheduler = None
        if disc is not None:
            c = self.loss.config
            self.disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=c.disc_lr, betas=tuple(c.disc_betas),
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

    def _build_loader(self) -> DataLoader:
        t, workers = self.cfg.train, self.cfg.data.num_workers
        if isinstance(self.dataset, TarStream):  # resume: the readers skip this rank's batches already taken
            stream = self.dataset.for_rank(self.info.rank, self.info.world_size, workers, t.batch_size,
                                           start_batches=self.step * t.grad_accum)
            return DataLoader(stream, batch_size=t.batch_size, num_workers=workers,
                              pin_memory=self.device.type == "cuda", persistent_workers=workers > 0)
        start = self.step * t.batch_size * t.grad_accum  # resume: where the data stream stood
        return DataLoader(
            self.dataset,
            batch_size=t.batch_size,
            sampler=ResumableDistributedSampler(
                self.dataset, self.info.world_size, self.info.rank, seed=self.cfg.seed, start=start
            ),
            num_workers=self.cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.cfg.data.num_workers > 0,
            generator=torch.Generator().manual_seed(self.cfg.seed),  # keeps the global RNG out of data loading
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
        """Clip and step the decoder's optimizer unless the loss or gradient is not finite on some rank."""
        self.scaler.unscale_(self.optimizer)
        logs["grad_norm"] = clip_grad_norm_(self.model.decoder.parameters(), self.cfg.train.grad_clip or math.inf)
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
        fixed = self._fixed_images() if self.info.is_main else None
        bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step", disable=not self.info.is_main,
                   mininterval=2.0, dynamic_ncols=True)
        window_start, window_images, last_logs = time.time(), 0, {}
        first_step = self.step
        if self.step == 0 and self.cfg.codebook_fit.images > 0 and self.model.config.quantizer.kind != "none":
            self._fit_codebook()
        self.model.train()
        while self.step < stop:
            batches = [next(data) for _ in range(t.grad_accum)]
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
                self._save_samples(fixed)
            if self.step % t.ckpt_every == 0 or self.step == stop:
                self._checkpoint()
        bar.close()
        summary = {"step": self.step, "results_dir": self.results_dir, "logs": last_logs}
        if self.step == t.steps:
            summary["final"] = self._export_final(fixed)
        distributed.barrier()
        if self.log is not None:
            self.log.close()
        return summary

    def _fit_codebook(self) -> None:
        """Before step 0: k-means of latents from codebook_fit.images images (this rank's share) -> the codebook."""
        c, t, info = self.cfg.codebook_fit, self.cfg.train, self.info
        center = self.dataset.with_transform(build_transform(self.cfg.image_size, "center_crop", hflip=False))
        if isinstance(center, TarStream):  # a stream: the first images of this rank's readers, one pass at most
            workers = self.cfg.data.num_workers
            images = center.for_rank(info.rank, info.world_size, workers, t.batch_size, epochs=1)
            batches = -(-c.images // (info.world_size * t.batch_size))
            loader = itertools.islice(DataLoader(images, batch_size=t.batch_size, num_workers=workers), batches)
        else:
            order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.cfg.seed))
            mine = order[: c.images][info.rank :: info.world_size].tolist()
            loader = DataLoader(torch.utils.data.Subset(center, mine), batch_size=t.batch_size,
                                num_workers=self.cfg.data.num_workers, generator=torch.Generator())
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
            print(f"codebook fit: {len(result.results)} codebook(s) of {self.model.quantizer.num_embeddings} codes "
                  f"from {result.tokens} latent tokens; squared error per token {result.distortion:.4f}; "
                  f"{result.codes_used} codes used")

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

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def _checkpoint(self) -> None:
        identical = distributed.ranks_agree(self.model.trainable_state_dict(), self.device)
        rng = distributed.gather_objects(
            {"cpu": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        )
        if self.info.is_main:
            if not identical:
                print(f"WARNING: step {self.step}: ranks hold different weights or codebooks")
            write_checkpoint(self.ckpt_root, self.step, lambda directory: self._fill_checkpoint(directory, rng),
                             keep_last=self.cfg.train.keep_last)
            self.log.write(self.step, {"checkpoint": True, "ranks_identical": identical}, scalars=False)
        distributed.barrier()

    def _fill_checkpoint(self, directory: str, rng: list) -> None:
        self.model.save_pretrained(directory)  # config.json + model.safetensors: loads with VQRAE.from_pretrained
        if self.ema is not None:
            with using_decoder(self.model, self.ema.module):
                self.model.save_pretrained(directory, weights_name=EMA_WEIGHTS_NAME)
        if self.loss.discriminator is not None:
            weights = {k: v.detach().contiguous().cpu() for k, v in self.loss.discriminator.state_dict().items()}
            save_file(weights, os.path.join(directory, DISCRIMINATOR_NAME))
        write_yaml(os.path.join(directory, TRAIN_CONFIG_NAME), self.cfg.to_tree())
        write_state(directory, {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "disc_optimizer": self.disc_optimizer.state_dict() if self.disc_optimizer is not None else None,
            "disc_scheduler": self.disc_scheduler.state_dict() if self.disc_scheduler is not None else None,
            "ema_n_averaged": int(self.ema.n_averaged) if self.ema is not None else 0,
            "skipped_images": self.skipped_images,
            "nonfinite_steps": self.nonfinite_steps,
            "rng": rng,
            "world_size": self.info.world_size,
        })

    def _checkpoint_files(self) -> list[str]:
        """What a complete checkpoint of this run holds."""
        names = [STATE_NAME, WEIGHTS_NAME, CONFIG_NAME]
        names += [EMA_WEIGHTS_NAME] if self.ema is not None else []
        return names + ([DISCRIMINATOR_NAME] if self.loss.discriminator is not None else [])

    def _resume(self) -> None:
        resume, required = self.cfg.train.resume, self._checkpoint_files()
        if self.info.is_main:
            for name in remove_stale_temporaries(self.ckpt_root):
                print(f"resume: removed {name}, left by a writer that was killed")
        distributed.barrier()
        directory = latest_checkpoint(self.ckpt_root, required) if resume == "auto" else resume
        if directory is None:
            return
        missing = missing_files(directory, required)
        if missing:
            raise FileNotFoundError(f"train.resume={resume}: {directory} is not a complete training checkpoint "
                                    f"of this run: it lacks {missing}")
        state = read_state(directory)
        missing = self.model.load_state_dict(read_tensors(directory, WEIGHTS_NAME), strict=False).missing_keys
        if any(not k.startswith("encoder.") for k in missing):
            raise ValueError(f"checkpoint {directory} lacks model weights: {missing[:5]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.loss.discriminator is not None:
            self.loss.discriminator.load_state_dict(read_tensors(directory, DISCRIMINATOR_NAME))
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])
            if state.get("disc_scheduler") is not None:  # checkpoints before loss.disc_schedule: constant
                self.disc_scheduler.load_state_dict(state["disc_scheduler"])
        if self.ema is not None:
            ema = read_tensors(directory, EMA_WEIGHTS_NAME)
            self.ema.module.load_state_dict({k.removeprefix("decoder."): v for k, v in ema.items()
                                             if k.startswith("decoder.")})
            self.ema.n_averaged.fill_(state["ema_n_averaged"])
        self.step, self.skipped_images = state["step"], state["skipped_images"]
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        self._restore_rng(state["rng"])
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

    # ---- outputs --------------------------------------------------------------------------------------------
    def _fixed_images(self) -> torch.Tensor:
        """The first num_samples readable images, center-cropped: the same ones in every sample grid."""
        center = build_transform(self.cfg.image_size, "center_crop", hflip=False)
        self.fixed_names, images = self.dataset.first_images(self.cfg.train.num_samples, center)
        return torch.stack(images).to(self.device)

    @property
    def _eval_decoder(self) -> torch.nn.Module:
        """The decoder that samples and the final model use: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.model.decoder

    @torch.no_grad()
    def _reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        try:
            with using_decoder(self.model, self._eval_decoder), autocast(self.device, self.precision):
                return self.model(images).float()
        finally:
            self.model.train()

    def _save_samples(self, images: torch.Tensor) -> None:
        grid = make_grid(torch.cat([images, self._reconstruct(images)]).cpu(), nrow=len(images), padding=2)
        save_png(grid, os.path.join(self.results_dir, "samples", f"step-{self.step:07d}.png"))
        self.log.image("samples", grid, self.step)

    def _export_final(self, images: torch.Tensor | None) -> str:
        """results_dir/final: the model to use (EMA decoder weights), loadable with VQRAE.from_pretrained."""
        final = os.path.join(self.results_dir, "final")
        if not self.info.is_main:
            return final
        with using_decoder(self.model, self._eval_decoder):
            self.model.save_pretrained(final)
        if self.cfg.train.report_reconstructions and images is not None:
            self._report_reconstructions(final, images)
        return final

    def _report_reconstructions(self, final: str, images: torch.Tensor) -> None:
        """Reload the exported model and put it through codes -> pixels (the latent, if continuous): PSNR per image
        and a grid."""
        model = VQRAE.from_pretrained(final).to(self.device).eval()
        rec = model.reconstruct(images, output_size=images.shape[-2:])[0].float()
        scores = psnr(rec, images)
        path_name = "codes" if model.config.quantizer.kind != "none" else "latent"
        print(f"reconstructions of {len(images)} images by {final} ({path_name} -> pixels):")
        for name, score in zip(self.fixed_names, scores.tolist(), strict=True):
            print(f"  {name:32s} PSNR {score:6.2f} dB")
        print(f"  mean PSNR {scores.mean():.2f} dB")
        path = os.path.join(self.results_dir, "reconstructions.png")
        save_png(torch.cat([images, rec]), path, nrow=len(images), padding=2)
        print(f"wrote {path} (originals above reconstructions)")
