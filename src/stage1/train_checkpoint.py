"""Training checkpoints: one directory per step, written whole under a temporary name and renamed.

    checkpoints/step-000500/
        config.json, model.safetensors    the VQRAE (raw decoder weights), written by VQRAE.save_pretrained
        ema.safetensors                   the same keys with the EMA decoder weights (same writer)
        discriminator.safetensors
        train_config.yaml                 the resolved training config
        trainer_state.pt                  optimizer / scheduler / scaler / RNG states, step; read back with
                                          torch.load(weights_only=True), so it can never run code

A crash mid-write leaves only a hidden `.step-*.tmp` directory, which is never taken for a checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Callable

import torch
from safetensors.torch import load_file

from .atomic import plain_mode

STEP_DIR = re.compile(r"^step-(\d+)$")
STALE_DIR = re.compile(r"^\.step-\d+\..*\.(tmp|old)$")
STATE_NAME = "trainer_state.pt"
EMA_WEIGHTS_NAME = "ema.safetensors"
DISCRIMINATOR_NAME = "discriminator.safetensors"
TRAIN_CONFIG_NAME = "train_config.yaml"


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def write_checkpoint(root: str, step: int, fill: Callable[[str], None], keep_last: int | None = None) -> str:
    """Make root/step-N atomically: `fill(directory)` writes the files into a hidden temporary directory, which is
    fsynced and renamed into place; then prune to the newest `keep_last`."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, step_dir_name(step))
    tmp = tempfile.mkdtemp(prefix=f".{step_dir_name(step)}.", suffix=".tmp", dir=root)
    try:
        os.chmod(tmp, plain_mode(is_dir=True))  # mkdtemp makes it 0700; a checkpoint folder gets a plain mkdir's mode
        fill(tmp)
        for folder, _, names in os.walk(tmp):
            for name in names:
                with open(os.path.join(folder, name), "rb") as f:
                    os.fsync(f.fileno())
        if os.path.exists(final):  # re-written step (e.g. a rerun): move the old one aside first
            stale = tempfile.mkdtemp(prefix=f".{step_dir_name(step)}.", suffix=".old", dir=root)
            os.replace(final, os.path.join(stale, "old"))
            shutil.rmtree(stale)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def write_state(directory: str, state: dict) -> None:
    torch.save(state, os.path.join(directory, STATE_NAME))


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoint directories under root, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = STEP_DIR.match(name)
        if match and os.path.isfile(os.path.join(root, name, STATE_NAME)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return [path for _, path in sorted(found)]


def missing_files(directory: str, names) -> list[str]:
    return [name for name in names if not os.path.isfile(os.path.join(directory, name))]


def latest_checkpoint(root: str, required=()) -> str | None:
    """The newest complete checkpoint: one missing any of `required` (damaged after it was written) is passed
    over, with a note, for the one before it."""
    for directory in reversed(list_checkpoints(root)):
        missing = missing_files(directory, required)
        if not missing:
            return directory
        print(f"resume: passing over {directory}, which lacks {missing}")
    return None


def remove_stale_temporaries(root: str) -> list[str]:
    """Hidden step directories that killed writers left (.step-N.*.tmp / .old); call only while none writes."""
    if not os.path.isdir(root):
        return []
    stale = [name for name in os.listdir(root) if STALE_DIR.match(name)]
    for name in stale:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return stale


def read_state(directory: str) -> dict:
    return torch.load(os.path.join(directory, STATE_NAME), map_location="cpu", weights_only=True)


def read_tensors(directory: str, name: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(directory, name))
