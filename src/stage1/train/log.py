"""Training logs on the main rank: metrics.jsonl (one JSON object per line), TensorBoard (tb/) and, with
logger=wandb, Weights & Biases (one W&B run per results_dir: a resumed training continues it).

TensorBoard and W&B group the scalars: loss/ (every loss term and the GAN's weights), codebook/ (usage,
perplexity, restarts; the codebook fit's distortion and codes used at step 0), optim/ (lr, grad_norm) and perf/
(images_per_sec, skipped images, non-finite steps). TensorBoard also holds the composed config, as text and as
hparams."""

from __future__ import annotations

import json
import os

from ..base.atomic import atomic_path

METRICS_NAME = "metrics.jsonl"
WANDB_ID_NAME = "wandb_run_id"  # in results_dir: the W&B run a resumed training goes on logging to
LOGGERS = ("tensorboard", "wandb")
GROUP_OF = {
    "perplexity": "codebook", "codebook_usage": "codebook", "restarted_codes": "codebook",
    "skipped_ema_update": "codebook", "fit_distortion": "codebook", "fit_codes_used": "codebook",
    "lr": "optim", "grad_norm": "optim",
    "images_per_sec": "perf", "skipped_images": "perf", "nonfinite_steps": "perf", "nonfinite": "perf",
}


def scalar_tag(key: str) -> str:
    """The grouped name of a logged value: loss/ unless GROUP_OF says otherwise."""
    return f"{GROUP_OF.get(key, 'loss')}/{key}"


class MetricsLog:
    def __init__(self, results_dir: str, step: int, wandb_project: str | None = None, config: dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.path = os.path.join(results_dir, METRICS_NAME)
        kept = step if step > 0 else -1  # resumed at `step` (a checkpoint is never at 0): keep up to it; fresh: none
        self._truncate(kept)
        self.writer = SummaryWriter(os.path.join(results_dir, "tb"), purge_step=kept + 1)
        if config is not None and step == 0:
            _write_config(self.writer, config)
        self.wandb = None if wandb_project is None else _wandb_run(results_dir, wandb_project, config)

    def _truncate(self, step: int) -> None:
        """Drop lines logged past `step`: after a resume, those past the checkpoint (they will be logged again);
        in a fresh run into the results_dir of a killed one, all of them."""
        if not os.path.isfile(self.path):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line)
                except json.JSONDecodeError:  # a line torn by a crash
                    continue
        with atomic_path(self.path) as tmp, open(tmp, "w") as f:
            f.writelines(kept)

    def write(self, step: int, values: dict, scalars: bool = True) -> None:
        """One metrics.jsonl line; with `scalars`, each value as a grouped TensorBoard (and W&B) scalar."""
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if scalars:
            self.scalars(step, values)

    def scalars(self, step: int, values: dict) -> None:
        for key, value in values.items():
            self.writer.add_scalar(scalar_tag(key), value, step)
        if self.wandb is not None:
            self.wandb.log({scalar_tag(key): value for key, value in values.items()}, step=step)

    def image(self, tag: str, image, step: int) -> None:
        self.writer.add_image(tag, image, step)
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(image.permute(1, 2, 0).float().cpu().numpy())}, step=step)

    def close(self) -> None:
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def _write_config(writer, config: dict) -> None:
    """The composed config in TensorBoard: as YAML text, and flattened (train.lr, ...) as hparams."""
    import yaml
    from torch.utils.tensorboard.summary import hparams

    writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=True) + "```", 0)
    flat = {}

    def walk(tree: dict, prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:  # hparams takes numbers, strings and booleans
                flat[prefix + key] = value if isinstance(value, (bool, int, float, str)) else str(value)

    walk(config, "")
    for summary in hparams(flat, {}):
        writer.file_writer.add_summary(summary)


def _wandb_run(results_dir: str, project: str, config: dict | None):
    """The W&B run of this results_dir: started on the first run (its id kept in results_dir), resumed after."""
    import wandb

    id_file = os.path.join(results_dir, WANDB_ID_NAME)
    if os.path.isfile(id_file):
        with open(id_file) as f:
            run_id = f.read().strip()
    else:
        run_id = wandb.util.generate_id()
        with atomic_path(id_file) as tmp, open(tmp, "w") as f:
            f.write(run_id)
    return wandb.init(project=project, id=run_id, resume="allow", dir=results_dir,
                      name=os.path.basename(os.path.normpath(results_dir)), config=config)
