"""Training checkpoints: one directory per step, written whole under a temporary name and renamed.

    checkpoints/step-000500/
        config.json, model.safetensors    the VQRAE (raw decoder weights), written by VQRAE.save_pretrained
        ema.safetensors                   the same keys with the EMA decoder weights (same writer)
        discriminator.safetensors
        train_config.yaml                 the resolved training config
        trainer_state.pt                  optimizer / scheduler / scaler / RNG states, step; read back with
                                          base.tensor_files (weights_only=True), so it can never run code

A crash mid-write leaves only a hidden `.step-*.tmp` directory, which is never taken for a checkpoint.
`save_training` fills one and `resume_training` reads one back: the model's weights through the reader that
VQRAE.from_pretrained uses, the rest (optimizers, schedulers, counters, RNG) through trainer_state.pt.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Callable

import torch
from safetensors.torch import save_file

from ..base.atomic import atomic_path, plain_mode, write_yaml
from ..base.tensor_files import read_tensor_file
from ..model.config import VQRAEConfig
from ..model.pretrained import CONFIG_NAME, WEIGHTS_NAME

STEP_DIR = re.compile(r"^step-(\d+)$")
STALE_DIR = re.compile(r"^\.step-\d+\..*\.(tmp|old)$")
STATE_NAME = "trainer_state.pt"
EMA_WEIGHTS_NAME = "ema.safetensors"
DISCRIMINATOR_NAME = "discriminator.safetensors"
TRAIN_CONFIG_NAME = "train_config.yaml"


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


LOW_DISK = 64 * 2**20  # bytes free under which a failed checkpoint write is taken for a full disk


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
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception) and (isinstance(err, OSError) or shutil.disk_usage(root).free < LOW_DISK):
            # A full disk surfaces as safetensors' or torch.save's own error: say what happened, in one line.
            kept = list_checkpoints(root)
            raise OSError(f"could not write the checkpoint of step {step} in {root} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200] if str(err) else ''}; "
                          f"{shutil.disk_usage(root).free / 2**20:.0f} MiB free there); "
                          f"{f'the previous one, {kept[-1]}, is whole' if kept else 'no earlier checkpoint'}: "
                          f"free space and rerun the same command to resume") from err
        raise
    if keep_last:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


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


def checkpoint_to_resume(root: str, resume: str | None, required) -> str | None:
    """train.resume's checkpoint: with "auto", the newest complete one under root (None: start afresh); else the
    directory named, which must hold every `required` file."""
    if resume is None:
        return None
    directory = latest_checkpoint(root, required) if resume == "auto" else resume
    missing = missing_files(directory, required) if directory is not None else []
    if missing:
        raise FileNotFoundError(f"train.resume={resume}: {directory} is not a complete training checkpoint of this "
                                f"run: it lacks {missing}")
    return directory


def remove_stale_temporaries(root: str) -> list[str]:
    """Hidden step directories that killed writers left (.step-N.*.tmp / .old); call only while none writes."""
    if not os.path.isdir(root):
        return []
    stale = [name for name in os.listdir(root) if STALE_DIR.match(name)]
    for name in stale:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return stale


STATE_COUNTERS = ("step", "skipped_images", "nonfinite_steps", "rng", "ema_n_averaged")  # besides the parts' states


def read_state(directory: str) -> dict:
    """trainer_state.pt through base.tensor_files: torch.save's zip only, read with weights_only=True."""
    state = read_tensor_file(os.path.join(directory, STATE_NAME), "trainer state")
    if not isinstance(state, dict):
        raise ValueError(f"{os.path.join(directory, STATE_NAME)} is not a trainer state (expected a dict, got "
                         f"{type(state).__name__})")
    return state




def checkpoint_files(ema: bool, discriminator: bool) -> list[str]:
    """What a complete checkpoint of a run holds."""
    return [STATE_NAME, WEIGHTS_NAME, CONFIG_NAME, *([EMA_WEIGHTS_NAME] if ema else []),
            *([DISCRIMINATOR_NAME] if discriminator else [])]


def save_training(directory: str, model, ema, discriminator, stateful: dict, state: dict, config_tree: dict) -> None:
    """Fill a checkpoint directory: the model as save_pretrained writes it (so it loads with from_pretrained), the
    EMA decoder's copy, the discriminator, the run's config, and `state` (counters, RNG) with the state_dict() of
    each of `stateful` (optimizers, schedulers, scaler; None where the run has none)."""
    model.save_pretrained(directory)
    if ema is not None:
        with model.decoder_swapped(ema.module):
            model.save_pretrained(directory, weights_name=EMA_WEIGHTS_NAME)
    if discriminator is not None:
        weights = {k: v.detach().contiguous().cpu() for k, v in discriminator.state_dict().items()}
        with atomic_path(os.path.join(directory, DISCRIMINATOR_NAME)) as tmp:  # and its mode: safetensors' is 0600
            save_file(weights, tmp)
    write_yaml(os.path.join(directory, TRAIN_CONFIG_NAME), config_tree)
    states = {name: part.state_dict() if part is not None else None for name, part in stateful.items()}
    torch.save({**states, **state, "ema_n_averaged": int(ema.n_averaged) if ema is not None else 0},
               os.path.join(directory, STATE_NAME))


def resume_training(directory: str, model, ema, discriminator, stateful: dict) -> dict:
    """Load a checkpoint written by save_training into the run's parts, in place; returns its state (counters,
    RNG). Weights that do not fit the model are refused naming the config fields that differ."""
    differ = config_differences(directory, model.config)
    try:
        model.load_weights(os.path.join(directory, WEIGHTS_NAME))
    except ValueError as err:
        raise ValueError(f"{directory} is a checkpoint of another model (it differs in {', '.join(differ) or '?'}): "
                         f"{err}; resume it with its own config, or start afresh (another results_dir, or "
                         f"train.resume=null)") from None
    if differ:
        print(f"resume: the model's config differs from the checkpoint's in {', '.join(differ)}; going on with "
              f"this run's values")
    if ema is not None:
        with model.decoder_swapped(ema.module):
            model.load_weights(os.path.join(directory, EMA_WEIGHTS_NAME))
    if discriminator is not None:
        discriminator.load_state_dict(read_tensor_file(os.path.join(directory, DISCRIMINATOR_NAME),
                                                       "discriminator weights"))
    state = read_state(directory)
    needed = [name for name, part in stateful.items() if part is not None] + list(STATE_COUNTERS)
    missing = [name for name in needed if name not in state]
    if missing:
        raise ValueError(f"{os.path.join(directory, STATE_NAME)} lacks {missing} (a trainer state holds {needed}): "
                         f"it was not written by this run's trainer; resume from another checkpoint "
                         f"(train.resume=DIR) or start afresh (train.resume=null)")
    for name, part in stateful.items():
        if part is not None:
            part.load_state_dict(state[name])
    if ema is not None:
        ema.n_averaged.fill_(state["ema_n_averaged"])
    return state


def config_differences(directory: str, config: VQRAEConfig) -> list[str]:
    """The fields in which a checkpoint's config.json and `config` differ (where the encoder lives aside)."""
    saved = _flat(VQRAEConfig.load(os.path.join(directory, CONFIG_NAME)).to_dict())
    current = _flat(config.to_dict())
    ignored = ("encoder.path", "normalization_stat_path")  # stored resolved / in the weights
    return [f"{key} ({saved.get(key)!r} there, {current.get(key)!r} here)" for key in sorted({*saved, *current})
            if key not in ignored and saved.get(key) != current.get(key)]


def _flat(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "params":
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
