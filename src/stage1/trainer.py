"""Decoder training: DDP over torchrun ranks, bf16 autocast on CUDA, L1 + LPIPS + PatchGAN, EMA weights,
atomic checkpoints and exact resume.

Per optimizer step, for each micro-batch:
    x_rec, losses = model(x)                       frozen encoder -> EMA quantizer -> decoder
    nll   = recon_weight * recon + lpips_weight * LPIPS(x_rec, x)
    total = nll + [step > disc_start] disc_weight * adaptive_weight * (-D(x_rec)) + vq_loss
then one discriminator step on (x, x_rec.detach()) with the hinge loss, after disc_start.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager, nullcontext

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from . import distributed
from .atomic import atomic_path
from .config import validate_train_config
from .data import ImageDataset, ResumableDistributedSampler, build_transform
from .images import psnr
from .losses import PatchDiscriminator, adaptive_weight, build_lpips, generator_loss, hinge_d_loss
from .tiny import save_tiny_encoder
from .train_checkpoint import latest_checkpoint, read_state, read_tensors, write_checkpoint
from .vqrae import CONFIG_NAME, VQRAE


def train(cfg: DictConfig) -> dict:
    """Run (or resume) the training described by cfg; returns a summary on every rank."""
    validate_train_config(cfg)
    info = distributed.setup(cfg.device, cfg.dist_timeout_minutes)
    try:
        return Trainer(cfg, info).run()
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


class Trainer:
    def __init__(self, cfg: DictConfig, info: distributed.DistInfo):
        self.cfg, self.info, self.device = cfg, info, info.device
        t, loss = cfg.train, cfg.loss
        self.results_dir = cfg.results_dir
        self.ckpt_root = os.path.join(self.results_dir, "checkpoints")
        os.makedirs(self.results_dir, exist_ok=True)
        precision = cfg.precision if cfg.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.precision = precision
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

        # Data first: a wrong folder fails in a second, before any model is loaded.
        transform = build_transform(cfg.image_size, cfg.data.augment, cfg.data.min_scale, cfg.data.hflip)
        self.dataset = ImageDataset(cfg.data.path, transform, seed=cfg.seed)

        # Same seed on every rank while building, so all ranks start from identical weights and codebook, and
        # a resumed run rebuilds what checkpoints do not hold (a random LPIPS backbone) identically.
        encoder_path = self._encoder_path()
        torch.manual_seed(cfg.seed)
        self.model = self._build_model(encoder_path).to(self.device)
        if cfg.encoder.input_size is None and cfg.image_size % self.model.encoder.patch_size:
            raise ValueError(
                f"image_size ({cfg.image_size}) must be a multiple of the encoder's patch size "
                f"({self.model.encoder.patch_size}), or set encoder.input_size"
            )
        self.model.decoder.gradient_checkpointing = bool(t.grad_checkpointing)
        self.lpips = (
            build_lpips(loss.lpips_net, loss.lpips_random_backbone).to(self.device) if loss.lpips_weight > 0 else None
        )
        self.disc = (
            PatchDiscriminator(channels=loss.disc_channels, num_layers=loss.disc_layers).to(self.device)
            if loss.disc_weight > 0
            else None
        )
        # broadcast_buffers=False: the quantizer all-reduces its own EMA statistics (see quantizer.py).
        ddp_args = dict(device_ids=[self.device.index] if self.device.type == "cuda" else None, broadcast_buffers=False)
        self.model_ddp = DDP(self.model, **ddp_args) if info.enabled else self.model
        self.disc_ddp = DDP(self.disc, **ddp_args) if info.enabled and self.disc is not None else self.disc

        self.optimizer = torch.optim.AdamW(
            self.model.decoder.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(t.warmup_steps, t.steps, t.min_lr / t.lr)
        )
        self.disc_optimizer = (
            torch.optim.AdamW(self.disc.parameters(), lr=loss.disc_lr, betas=(0.5, 0.9))
            if self.disc is not None
            else None
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.ema = (
            AveragedModel(self.model.decoder, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay))
            if t.ema_decay is not None
            else None
        )
        self.step = 0
        self.skipped_images = 0
        self.nonfinite_steps = self.nonfinite_in_a_row = 0
        self._resume()
        if self.step == 0:
            torch.manual_seed(cfg.seed + info.rank)
        self.loader = DataLoader(
            self.dataset,
            batch_size=t.batch_size,
            sampler=ResumableDistributedSampler(
                self.dataset, info.world_size, info.rank, seed=cfg.seed, start=self.step * t.batch_size * t.grad_accum
            ),
            num_workers=cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=cfg.data.num_workers > 0,
            generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG out of data loading
        )
        self.writer = None
        if info.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(self.results_dir, "tb"), purge_step=self.step + 1)
            self._truncate_metrics(self.step)
            with atomic_path(os.path.join(self.results_dir, "train_config.yaml")) as tmp:
                OmegaConf.save(cfg, tmp, resolve=True)

    # ---- set-up ---------------------------------------------------------------------------------------------
    def _encoder_path(self) -> str:
        enc = self.cfg.encoder
        if enc.path is not None:
            return enc.path
        path = os.path.join(self.results_dir, "tiny_encoder")
        if self.info.is_main and not os.path.isfile(os.path.join(path, "config.json")):
            tiny = OmegaConf.to_container(enc.tiny)
            save_tiny_encoder(tiny.pop("family"), path, image_size=self.cfg.image_size, seed=self.cfg.seed, **tiny)
            print(f"encoder: a tiny randomly initialised {enc.tiny.family} stand-in at {path}. It is untrained: "
                  f"the reconstructions show the pipeline working, not a real tokenizer. On a machine with "
                  f"network and a GPU, train with a real encoder, e.g. encoder=dinov2_b decoder.patch_size=16.")
        distributed.barrier()
        return path

    def _build_model(self, encoder_path: str) -> VQRAE:
        cfg, q = self.cfg, self.cfg.quantizer
        return VQRAE(
            encoder_cls=cfg.encoder.cls,
            encoder_config_path=encoder_path,
            encoder_input_size=cfg.encoder.input_size,
            encoder_params=OmegaConf.to_container(cfg.encoder.params),
            decoder_config_path=cfg.decoder.config,
            decoder_patch_size=cfg.decoder.patch_size,
            num_embeddings=q.num_embeddings,
            commitment_cost=q.commitment_cost,
            vq_decay=q.decay,
            vq_epsilon=q.epsilon,
            dead_code_threshold=q.dead_code_threshold,
            kmeans_init=q.kmeans_init,
            noise_tau=cfg.model.noise_tau,
            normalization_stat_path=cfg.model.normalization_stat_path,
            recon_loss=cfg.model.recon_loss,
        )

    def _resume(self) -> None:
        resume = self.cfg.train.resume
        if resume is None:
            return
        directory = latest_checkpoint(self.ckpt_root) if resume == "auto" else resume
        if directory is None:
            return
        if not os.path.isfile(os.path.join(directory, "trainer_state.pt")):
            raise FileNotFoundError(f"train.resume={resume}: {directory} is not a complete training checkpoint")
        state = read_state(directory)
        missing = self.model.load_state_dict(read_tensors(directory, "model.safetensors"), strict=False).missing_keys
        if any(not k.startswith("encoder.") for k in missing):
            raise ValueError(f"checkpoint {directory} lacks model weights: {missing[:5]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.disc is not None:
            self.disc.load_state_dict(read_tensors(directory, "discriminator.safetensors"))
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        if self.ema is not None:
            ema = read_tensors(directory, "ema.safetensors")
            prefix = "decoder."
            self.ema.module.load_state_dict({k[len(prefix) :]: v for k, v in ema.items() if k.startswith(prefix)})
            self.ema.n_averaged.fill_(state["ema_n_averaged"])
        self.step = state["step"]
        self.skipped_images = state["skipped_images"]
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        rng = state["rng"]
        if len(rng) == self.info.world_size:
            torch.set_rng_state(rng[self.info.rank]["cpu"])
            if self.device.type == "cuda" and rng[self.info.rank]["cuda"] is not None:
                torch.cuda.set_rng_state(rng[self.info.rank]["cuda"], self.device)
        else:
            torch.manual_seed(self.cfg.seed + self.info.rank + self.step)
            if self.info.is_main:
                print(f"resuming on {self.info.world_size} ranks from {len(rng)}: random streams are re-seeded, "
                      f"so the run continues correctly but not bit-identically")
        if self.info.is_main:
            print(f"resumed from {directory} at step {self.step}")

    def _truncate_metrics(self, step: int) -> None:
        """After a resume, drop metric lines logged past the checkpoint (they will be logged again)."""
        path = os.path.join(self.results_dir, "metrics.jsonl")
        if not os.path.isfile(path):
            return
        kept = []
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line)
                except json.JSONDecodeError:  # a line torn by a crash
                    continue
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            f.writelines(kept)

    # ---- one step -------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _train_step(self, batches: list[dict]) -> dict[str, torch.Tensor]:
        cfg, loss_cfg = self.cfg, self.cfg.loss
        use_gan = self.disc is not None and self.step >= loss_cfg.disc_start  # self.step: steps done so far
        accum = len(batches)
        logs: dict[str, torch.Tensor] = {}
        pairs = []

        def add(key, value):
            logs[key] = logs.get(key, 0.0) + value.detach().float() / accum

        for i, batch in enumerate(batches):
            x = batch["image"].to(self.device, non_blocking=True)
            last = i == accum - 1
            no_sync = self.model_ddp.no_sync() if self.info.enabled and not last else nullcontext()
            with no_sync, self._autocast():
                x_rec, losses = self.model_ddp(x, return_loss=True)
                nll = loss_cfg.recon_weight * losses["recon_loss"]
                if self.lpips is not None:
                    perceptual = self.lpips(x_rec.float() * 2 - 1, x * 2 - 1).mean()
                    nll = nll + loss_cfg.lpips_weight * perceptual
                    add("lpips", perceptual)
                total = nll + losses["vq_loss"]
                if use_gan:
                    # The generator pass uses the bare discriminator: its gradients here are discarded below.
                    g_loss = generator_loss(self.disc(x_rec))
                    weight = loss_cfg.disc_weight * adaptive_weight(
                        nll, g_loss, self.model.decoder.last_layer, loss_cfg.adaptive_weight_max
                    )
                    total = total + weight * g_loss
                    add("g_loss", g_loss)
                    add("adaptive_weight", weight)
            self.scaler.scale(total / accum).backward()
            pairs.append((x, x_rec.detach()))
            for key in ("recon_loss", "vq_loss", "commitment_loss", "perplexity", "codebook_usage",
                        "skipped_ema_update"):
                add(key, losses[key])
            add("loss", total)

        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.decoder.parameters(), cfg.train.grad_clip or math.inf)
        logs["grad_norm"] = grad_norm
        if not distributed.all_ranks_true(torch.isfinite(logs["loss"]) & torch.isfinite(grad_norm)):
            # A NaN/Inf loss or gradient on any rank: no rank updates anything this step.
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()  # fp16: backs the loss scale off if the gradients overflowed
            self.scheduler.step()  # the schedule follows steps taken, skipped or not
            logs["nonfinite"] = torch.ones(())
            return logs
        self.scaler.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model.decoder)

        if use_gan:
            self.disc_optimizer.zero_grad(set_to_none=True)
            for i, (x, x_rec) in enumerate(pairs):
                last = i == accum - 1
                no_sync = self.disc_ddp.no_sync() if self.info.enabled and not last else nullcontext()
                with no_sync, self._autocast():
                    # One forward over real and fake together: DDP wants each module once per backward.
                    logits = self.disc_ddp(torch.cat([x, x_rec]))
                    d_loss = hinge_d_loss(*logits.chunk(2))
                self.scaler.scale(d_loss / accum).backward()
                add("d_loss", d_loss)
            self.scaler.unscale_(self.disc_optimizer)
            disc_norm = torch.nn.utils.clip_grad_norm_(self.disc.parameters(), cfg.train.grad_clip or math.inf)
            if distributed.all_ranks_true(torch.isfinite(logs["d_loss"]) & torch.isfinite(disc_norm)):
                self.scaler.step(self.disc_optimizer)
            self.disc_optimizer.zero_grad(set_to_none=True)
        self.scaler.update()
        logs["nonfinite"] = torch.zeros(())
        return logs

    # ---- the run --------------------------------------------------------------------------------------------
    def run(self) -> dict:
        t = self.cfg.train
        stop = t.stop_at or t.steps
        data = iter(self.loader)
        fixed = self._fixed_images() if self.info.is_main else None
        bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step", disable=not self.info.is_main,
                   mininterval=2.0, dynamic_ncols=True)
        window_start, window_images = time.time(), 0
        last_logs = {}
        self.model.train()
        while self.step < stop:
            batches = [next(data) for _ in range(t.grad_accum)]
            skipped = sum(int(b["skipped"].sum()) for b in batches)
            logs = self._train_step(batches)
            self.step += 1
            self._count_nonfinite(bool(logs["nonfinite"]))
            window_images += sum(b["image"].shape[0] for b in batches) * self.info.world_size
            self.skipped_images += distributed.sum_over_ranks(skipped, self.device)
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == stop:
                elapsed = time.time() - window_start
                last_logs = distributed.mean_over_ranks({k: float(v) for k, v in logs.items()}, self.device)
                last_logs.update(lr=self.scheduler.get_last_lr()[0], images_per_sec=window_images / max(elapsed, 1e-9),
                                 skipped_images=self.skipped_images, nonfinite_steps=self.nonfinite_steps)
                self._log(last_logs)
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
        if self.writer is not None:
            self.writer.close()
        return summary

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

    # ---- outputs --------------------------------------------------------------------------------------------
    def _log(self, logs: dict[str, float]) -> None:
        if not self.info.is_main:
            return
        with open(os.path.join(self.results_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": self.step, **logs}) + "\n")
        for key, value in logs.items():
            self.writer.add_scalar(f"train/{key}", value, self.step)

    def _fixed_images(self) -> torch.Tensor:
        """The first num_samples images, center-cropped: the same ones in every sample grid."""
        center = build_transform(self.cfg.image_size, "center_crop", hflip=False)
        count = min(self.cfg.train.num_samples, len(self.dataset))
        return torch.stack([center(self.dataset.load(i)) for i in range(count)]).to(self.device)

    @property
    def _eval_decoder(self) -> torch.nn.Module:
        """The decoder that samples and the final model use: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.model.decoder

    @torch.no_grad()
    def _reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        decoder = self._eval_decoder
        self.model.eval()
        try:
            with using_decoder(self.model, decoder), self._autocast():
                return self.model(images).float()
        finally:
            self.model.train()

    def _save_samples(self, images: torch.Tensor) -> None:
        grid = make_grid(torch.cat([images, self._reconstruct(images)]).cpu(), nrow=len(images), padding=2)
        path = os.path.join(self.results_dir, "samples", f"step-{self.step:07d}.png")
        with atomic_path(path) as tmp:
            save_image(grid, tmp, format="png")
        self.writer.add_image("samples", grid, self.step)

    def _checkpoint(self) -> None:
        identical = distributed.ranks_agree(self.model.trainable_state_dict(), self.device)
        rng = distributed.gather_objects(
            {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.device)
             if self.device.type == "cuda" else None}
        )
        if self.info.is_main:
            if not identical:
                print(f"WARNING: step {self.step}: ranks hold different weights or codebooks")
            weights = self.model.trainable_state_dict()
            files = {
                CONFIG_NAME: json.dumps(self.model.config, indent=2),
                "model.safetensors": weights,
                "train_config.yaml": OmegaConf.to_yaml(self.cfg, resolve=True),
                "trainer_state.pt": {
                    "step": self.step,
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "disc_optimizer": self.disc_optimizer.state_dict() if self.disc is not None else None,
                    "ema_n_averaged": int(self.ema.n_averaged) if self.ema is not None else 0,
                    "skipped_images": self.skipped_images,
                    "nonfinite_steps": self.nonfinite_steps,
                    "rng": rng,
                    "world_size": self.info.world_size,
                },
            }
            if self.ema is not None:
                files["ema.safetensors"] = {
                    **weights, **{f"decoder.{k}": v for k, v in self.ema.module.state_dict().items()}
                }
            if self.disc is not None:
                files["discriminator.safetensors"] = self.disc.state_dict()
            write_checkpoint(self.ckpt_root, self.step, files, keep_last=self.cfg.train.keep_last)
            with open(os.path.join(self.results_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": self.step, "checkpoint": True, "ranks_identical": identical}) + "\n")
        distributed.barrier()

    def _export_final(self, images: torch.Tensor | None) -> str:
        """results_dir/final: the model to use (EMA decoder weights), loadable with VQRAE.from_pretrained."""
        final = os.path.join(self.results_dir, "final")
        if not self.info.is_main:
            return final
        decoder = self._eval_decoder
        with using_decoder(self.model, decoder):
            self.model.save_pretrained(final)
        if self.cfg.train.report_reconstructions and images is not None:
            model = VQRAE.from_pretrained(final).to(self.device).eval()
            with torch.no_grad():
                size = tuple(images.shape[-2:])
                rec = model.decode_from_indices(model.encode_to_indices(images), output_size=size).float()
            scores = psnr(rec, images)
            names = self.dataset.paths[: len(images)]
            print(f"reconstructions of {len(images)} images by {final} (codes -> pixels):")
            for name, score in zip(names, scores.tolist(), strict=True):
                print(f"  {name:32s} PSNR {score:6.2f} dB")
            print(f"  mean PSNR {scores.mean():.2f} dB")
            grid = make_grid(torch.cat([images, rec]).cpu(), nrow=len(images), padding=2)
            with atomic_path(os.path.join(self.results_dir, "reconstructions.png")) as tmp:
                save_image(grid, tmp, format="png")
            print(f"wrote {os.path.join(self.results_dir, 'reconstructions.png')} (originals above reconstructions)")
        return final
