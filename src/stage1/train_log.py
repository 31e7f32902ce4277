"""Training logs on the main rank: metrics.jsonl (one JSON object per line) and TensorBoard (tb/)."""

from __future__ import annotations

import json
import os

from .atomic import atomic_path

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    def __init__(self, results_dir: str, step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.path = os.path.join(results_dir, METRICS_NAME)
        self._truncate(step)
        self.writer = SummaryWriter(os.path.join(results_dir, "tb"), purge_step=step + 1)

    def _truncate(self, step: int) -> None:
        """After a resume, drop lines logged past the checkpoint (they will be logged again)."""
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
        """One metrics.jsonl line; with `scalars`, each value as a TensorBoard scalar under train/."""
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if scalars:
            for key, value in values.items():
                self.writer.add_scalar(f"train/{key}", value, step)

    def image(self, tag: str, image, step: int) -> None:
        self.writer.add_image(tag, image, step)

    def close(self) -> None:
        self.writer.close()
