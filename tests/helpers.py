"""Helpers shared by the tests: tiny real checkpoints and test images."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import torch

from stage1.model.tiny import ENCODER_CLS, TINY_FAMILIES, save_tiny_encoder

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: scripts/, README.md
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8)
IMAGE_SIZE = 32
# Deliberately unusual statistics, to show they are read from the checkpoint's preprocessor_config.json.
CUSTOM_MEAN = [0.1, 0.2, 0.3]
CUSTOM_STD = [0.5, 0.6, 0.7]


def build_tiny_encoders(root: str) -> dict[str, tuple[str, str]]:
    """family -> (encoder_cls, directory), each a real transformers checkpoint on disk."""
    out = {}
    for family in TINY_FAMILIES:
        stats = dict(image_mean=CUSTOM_MEAN, image_std=CUSTOM_STD) if family == "dinov2" else {}
        path = save_tiny_encoder(family, os.path.join(root, family), image_size=IMAGE_SIZE, **TINY, **stats)
        out[family] = (ENCODER_CLS[family], path)
    return out


def tiny_vqrae(encoder_dir, **overrides):
    from stage1 import VQRAE

    kwargs = dict(
        encoder_cls="Dinov2withNorm",
        encoder_config_path=encoder_dir,
        encoder_input_size=IMAGE_SIZE,
        decoder_config_path="tiny",
        decoder_patch_size=8,
        num_embeddings=64,
    )
    kwargs.update(overrides)
    return VQRAE(**kwargs)


def smooth_images(n: int, size: int = IMAGE_SIZE, seed: int = 0) -> torch.Tensor:
    """Natural-ish test images: low-frequency colour fields in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def run_training(image_dir, results_dir, *overrides):
    """Train the tiny_test experiment in-process."""
    from stage1.train.config import load_run_config
    from stage1.train.trainer import train

    base = ["experiment=tiny_test", f"data.path={image_dir}", f"results_dir={results_dir}"]
    return train(load_run_config([*base, *overrides]))


def train_metrics(results_dir):
    with open(os.path.join(results_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def step_logs(results_dir):
    """step -> logged scalars (checkpoint lines left out)."""
    return {m["step"]: m for m in train_metrics(results_dir) if "loss" in m}


def torchrun(*args: str, timeout: float, cwd: str | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 ARGS` offline, one thread per process; its exit and output."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def assert_tokenize_refuses(cases, fmt: str, tmp_path, capsys) -> None:
    """Each (argv, message) of `cases` run as `vqrae-tokenize ... --format fmt`: exit code 2, one error line matching
    the message, and no shard written (what an export cannot take is refused before any work)."""
    import re

    from stage1.cli import tokenize

    for i, (args, message) in enumerate(cases):
        capsys.readouterr()
        out = tmp_path / f"out{i}"
        assert tokenize.main([*args, "--out", str(out), "--format", fmt]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and re.search(message, error), error
        assert not out.exists() or not any(name.startswith("shard-") for name in os.listdir(out))


# Halton-MaskGIT's layout, read as its loader reads it (test_maskgit.py, and the exports' property in test_fuzz.py)
class ArraysOnly(pickle.Unpickler):
    """The documented format holds a dict of a numpy array and an int: nothing else may be named in the file."""

    def find_class(self, module, name):
        if (module, name) in {("numpy", "ndarray"), ("numpy", "dtype")}:
            return getattr(np, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of the format")


def read_like_maskgit(folder):
    """Halton-MaskGIT's CodeDataset as its README and extractor describe it: every *.pth in sorted order, each a
    pickle of {"code": (h, w) integers, "y": class}; codes cast to int32."""
    items = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".pth"):
            with open(os.path.join(folder, name), "rb") as f:
                data = ArraysOnly(f).load()
            items.append((name, data["code"], data["y"]))
    return items
