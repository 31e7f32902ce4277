"""Saving and loading a VQRAE: `save_pretrained` / `from_pretrained` (a folder or a Hub repo), `load_weights` (the one
reader of saved weights: from_pretrained and training's resume), the encoder saved inside a model. A mixin of VQRAE,
which keeps the data path; every checkpoint, training's included, is one of these folders:

    config.json          VQRAEConfig (the encoder by reference: a Hub id or an absolute folder, or encoder/)
    model.safetensors    everything but the frozen encoder: decoder, quantizer state, latent statistics
    encoder/             the encoder itself, when saved inside (save_encoder=True, vqrae-push)
"""

from __future__ import annotations

import dataclasses
import os
from typing import TypeVar

import torch
from safetensors.torch import save_file
from transformers.utils import cached_file

from ..base.atomic import atomic_path
from ..base.tensor_files import read_tensor_file, tensor_elements
from .config import VQRAEConfig
from .encoders import may_be_on_hub
from .keywords import config_with_keywords

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ENCODER_SUBDIR = "encoder"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what saved float weights may be

T = TypeVar("T", bound="Pretrained")


class Pretrained:
    """save_pretrained / from_pretrained for VQRAE (its config, encoder, latent statistics and state dict)."""

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen encoder: decoder, codebook, latent statistics."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    def save_pretrained(self, directory: str | os.PathLike, save_encoder: bool = False,
                        weights_name: str = WEIGHTS_NAME) -> None:
        """Write `weights_name` + `config.json`; the frozen encoder is stored by reference unless asked.
        Training checkpoints are written by this same method, so every checkpoint loads with from_pretrained."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        # The latent statistics and RAE's decoder weights it was built from travel in the weights.
        config = dataclasses.replace(self.config, normalization_stat_path=None, pretrained_decoder_path=None)
        if save_encoder:
            self.encoder.save_pretrained(os.path.join(directory, ENCODER_SUBDIR))
            config.encoder = dataclasses.replace(config.encoder, path=ENCODER_SUBDIR)
        elif os.path.isdir(config.encoder.path):  # a local encoder: found from any working directory
            config.encoder = dataclasses.replace(config.encoder, path=os.path.abspath(config.encoder.path))
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        with atomic_path(os.path.join(directory, weights_name)) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt"})
        config.save(os.path.join(directory, CONFIG_NAME))

    @classmethod
    def from_pretrained(cls: type[T], path: str | os.PathLike, weights_name: str = WEIGHTS_NAME, *,
                        revision: str | None = None, token: str | bool | None = None, cache_dir: str | None = None,
                        local_files_only: bool = False, **keywords) -> T:
        """Load from a directory written by save_pretrained (or a training checkpoint: weights_name=
        "ema.safetensors" for its EMA weights) or a Hub repo id, in eval mode (call .train() to train it).
        Keywords (VQRAE's flat names) replace config values, e.g. encoder_config_path=<local dir> where the
        referenced Hub encoder is not available offline. revision, token, cache_dir and local_files_only go to the
        Hub as in transformers' from_pretrained (a Hub repo: its cache too, offline with HF_HUB_OFFLINE=1)."""
        path = os.fspath(path)
        hub = dict(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
        config_file = cls._resolve(path, CONFIG_NAME, hub)
        config = VQRAEConfig.load(config_file)
        weights_file = cls._resolve(path, weights_name, hub)
        if config.encoder.path == ENCODER_SUBDIR and "encoder_config_path" not in keywords:
            config.encoder = dataclasses.replace(config.encoder, path=cls._encoder_inside(path, hub))
        config = config_with_keywords(config, **keywords)
        # Nothing is built from config.json's sizes before its weights are known to be that large.
        needed = config.decoder.parameters_at_least() + config.quantizer.weights_at_least()
        held = tensor_elements(weights_file, "model weights")
        if needed > held:
            raise ValueError(f"{config_file} describes a decoder and codebook of at least {needed:,} numbers, but "
                             f"{weights_file} holds {held:,}: they are not one model's config and weights")
        model = cls.from_config(config)
        model.load_weights(weights_file)
        return model.eval()  # as every from_pretrained: the codebook moves only when the caller trains

    @classmethod
    def from_config(cls: type[T], config: VQRAEConfig) -> T:
        """A model built from a whole config (from_pretrained's way in; subclasses with other constructors)."""
        return cls(config)

    def load_weights(self, weights_file: str) -> None:
        """The trainable weights of a save_pretrained file, in place: every one of them, each of its shape, nothing
        else (the one reader of saved weights: from_pretrained, and training's resume)."""
        state = read_tensor_file(weights_file, "model weights")
        if "latent_mean" in state and "latent_std" in state:  # per channel or per position: the file says which
            self.set_latent_stats(state["latent_mean"], state["latent_std"])
        expected = self.trainable_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mismatched = [
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in set(state) & set(expected)
            if state[k].shape != expected[k].shape
        ]
        if missing or unexpected or mismatched:
            raise ValueError(
                f"weights in {weights_file} do not match the model's config: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, shape mismatches {mismatched[:5]}"
            )
        # An integer codebook or NaN weights would load silently and tokenize every image to code 0.
        wrong_type = [f"{k}: {state[k].dtype} for {expected[k].dtype}" for k in sorted(state)
                      if (state[k].dtype in FLOAT_DTYPES) != expected[k].is_floating_point()
                      or (not expected[k].is_floating_point() and state[k].dtype != expected[k].dtype)]
        # As the model will hold them: a float64 1e300 is finite in the file and Inf once cast to float32.
        not_finite = [k for k in sorted(state) if state[k].dtype in FLOAT_DTYPES and expected[k].is_floating_point()
                      and not state[k].to(expected[k].dtype).isfinite().all()]
        if wrong_type or not_finite:
            raise ValueError(f"weights in {weights_file} are damaged: wrong dtypes {wrong_type[:5]}, NaN or Inf in "
                             f"{not_finite[:5]}")
        self.load_state_dict(state, strict=False)

    @staticmethod
    def _encoder_inside(path: str, hub: dict) -> str:
        """The encoder saved inside a model (save_encoder=True, vqrae-push): its folder, from the Hub if need be."""
        if os.path.isdir(path):
            return os.path.join(path, ENCODER_SUBDIR)
        from huggingface_hub import snapshot_download

        try:
            return os.path.join(snapshot_download(path, allow_patterns=[f"{ENCODER_SUBDIR}/*"], **hub), ENCODER_SUBDIR)
        except Exception as err:  # offline without a cached copy, no such repo, ...
            raise FileNotFoundError(f"the encoder inside '{path}' ({ENCODER_SUBDIR}/) could not be fetched "
                                    f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); download the repo "
                                    f"where there is network and load it from its folder") from err

    @staticmethod
    def _resolve(path: str, name: str, hub: dict) -> str:
        if not os.path.isdir(path) and not may_be_on_hub(path):  # known at once: no Hub retries for a typo
            raise FileNotFoundError(f"'{path}' is not a VQRAE checkpoint: no such directory (seen from "
                                    f"{os.getcwd()}), and a local path, not a Hub repo id (org/name)")
        try:
            resolved = cached_file(path, name, **hub)
        except OSError as err:
            resolved, cause = None, f" ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        else:
            cause = ""
        if resolved is None or not os.path.isfile(resolved):
            from huggingface_hub import constants

            if not os.path.isdir(path) and constants.HF_HUB_OFFLINE:
                raise FileNotFoundError(f"'{path}' is not a VQRAE checkpoint: no such directory, and not in the "
                                        f"Hugging Face cache with the Hub off (HF_HUB_OFFLINE=1){cause}")
            raise FileNotFoundError(f"'{path}' is not a VQRAE checkpoint: it has no {name} (a checkpoint is a "
                                    f"directory or Hub repo with {CONFIG_NAME} and its weights){cause}")
        return resolved


__all__ = ["CONFIG_NAME", "ENCODER_SUBDIR", "WEIGHTS_NAME", "Pretrained"]
