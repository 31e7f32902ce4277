"""VQRAE(...)'s flat keywords, RAE's names, onto the model's config: the table `KEYWORDS` (the only table of second
names), the decoder sources `decoder_config_path` takes (a preset, a .json / .yaml file, a dict, RAE's ViT-MAE config
or its folder) and RAE's encoder_params. Kept apart from stage1.model.config, which every other module reads, because
it reads RAE's files (stage1.model.rae)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..base.config_section import ConfigError
from .config import SECTIONS, DecoderConfig, VQRAEConfig
from .presets import DECODER_PRESETS, read_mapping
from .rae import rae_decoder_config


def _is_vit_mae_config(path: str) -> bool:
    return path.endswith(".json") and "decoder_hidden_size" in read_mapping(path)  # RAE's, not a DecoderConfig


def _preset(name: str) -> dict:
    return dict(DECODER_PRESETS[name])


def load_decoder_config(source: str | dict | DecoderConfig | None, **overrides) -> DecoderConfig:
    """A DecoderConfig from a preset name, a .json/.yaml path, a dict, or None (vit_b); overrides win. A dict or
    file that gives only some sizes takes the others from vit_b. RAE's decoder configs (a ViT-MAE config.json, or
    the directory holding one, as RAE's configs/decoder/ViTXL) give RAE's decoder, in RAE's layout."""
    if isinstance(source, DecoderConfig):
        values = source.to_dict()
    elif isinstance(source, dict):
        values = {**_preset("vit_b"), **source}
    elif source is not None and not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"decoder_config_path must be a preset name, a .json / .yaml file or RAE's config folder, a "
                         f"dict or a DecoderConfig, got {source!r} ({type(source).__name__})")
    elif source is None or source in DECODER_PRESETS:
        values = _preset(source or "vit_b")
    elif os.path.isdir(source) or (os.path.isfile(source) and _is_vit_mae_config(source)):
        values = rae_decoder_config(source).to_dict()
    elif os.path.isfile(source):
        values = {**_preset("vit_b"), **read_mapping(source)}
    else:
        raise ValueError(
            f"decoder config '{source}' is neither a preset ({', '.join(DECODER_PRESETS)}), nor an existing "
            f".json/.yaml file, nor a directory holding RAE's ViT-MAE config.json"
        )
    values.update({k: v for k, v in overrides.items() if v is not None})
    return DecoderConfig.from_dict(values)


# VQRAE(...)'s flat keyword names -> (section, field) of VQRAEConfig: the documented API. The encoder, decoder and
# latent names are those of RAE's stage-1 YAML; the quantizer's are this package's own.
# `decoder_config_path` is not a field but a source: a preset name, a .json/.yaml file or a dict.
KEYWORDS: dict[str, tuple[str | None, str]] = {
    "encoder_cls": ("encoder", "cls"),
    "encoder_config_path": ("encoder", "path"),
    "encoder_input_size": ("encoder", "input_size"),
    "encoder_params": ("encoder", "params"),
    "decoder_patch_size": ("decoder", "patch_size"),
    "quantizer_kind": ("quantizer", "kind"),
    "num_embeddings": ("quantizer", "num_embeddings"),
    "commitment_cost": ("quantizer", "commitment_cost"),
    "vq_decay": ("quantizer", "decay"),
    "vq_epsilon": ("quantizer", "epsilon"),
    "restart_window": ("quantizer", "restart_window"),
    "cosine": ("quantizer", "cosine"),
    "depth": ("quantizer", "depth"),
    "groups": ("quantizer", "groups"),
    "scales": ("quantizer", "scales"),
    "shared_codebook": ("quantizer", "shared_codebook"),
    "phi": ("quantizer", "phi"),
    "levels": ("quantizer", "levels"),
    "entropy_weight": ("quantizer", "entropy_weight"),
    "basis": ("quantizer", "basis"),
    "tau_start": ("quantizer", "tau_start"),
    "tau_end": ("quantizer", "tau_end"),
    "tau_steps": ("quantizer", "tau_steps"),
    "hard": ("quantizer", "hard"),
    "kl_weight": ("quantizer", "kl_weight"),
    "noise_tau": (None, "noise_tau"),
    "reshape_to_2d": (None, "reshape_to_2d"),
    "normalization_stat_path": (None, "normalization_stat_path"),
    "eps": (None, "normalization_eps"),
    "pretrained_decoder_path": (None, "pretrained_decoder_path"),
}
# The keys RAE's encoder classes take their checkpoint under (Dinov2withNorm: dinov2_path; SigLIP2wNorm and MAEwNorm:
# model_name): the same checkpoint as encoder_config_path, which RAE reads the image mean / std from.
RAE_ENCODER_PATH_KEYS = ("dinov2_path", "model_name")
RAE_UNUSED_ENCODER_PARAMS = ("num_tokens",)  # SigLIP2wNorm stores it and never reads it


def config_with_keywords(config: VQRAEConfig, **keywords) -> VQRAEConfig:
    """A copy of `config` with values given by VQRAE's flat keyword names, e.g. encoder_config_path=<local dir>
    (VQRAE(**keywords) starts from VQRAEConfig(); from_pretrained from the saved config)."""
    unknown = sorted(set(keywords) - set(KEYWORDS) - {"decoder_config_path"})
    if unknown:
        raise TypeError(f"unknown VQRAE keyword arguments {unknown}; expected some of "
                        f"{sorted([*KEYWORDS, 'decoder_config_path'])}")
    sections = {name: getattr(config, name).to_dict() for name in SECTIONS}
    if "decoder_config_path" in keywords:
        sections["decoder"] = load_decoder_config(keywords["decoder_config_path"]).to_dict()
    if "encoder_params" in keywords:
        keywords = {**keywords, **_from_rae_encoder_params(keywords)}
    top = {}
    for keyword, value in keywords.items():
        if keyword == "decoder_config_path" or (keyword == "decoder_patch_size" and value is None):
            continue
        section, name = KEYWORDS[keyword]
        (sections[section] if section else top)[name] = value
    return VQRAEConfig.from_dict({**config.to_dict(), **sections, **top})


def _from_rae_encoder_params(keywords: dict) -> dict:
    """RAE's encoder_params hold the encoder's checkpoint too (dinov2_path, model_name): it becomes
    encoder_config_path, the one path of the encoder here (weights, config and image mean / std)."""
    params = keywords["encoder_params"]
    if not isinstance(params, Mapping):  # a dict, or OmegaConf's DictConfig (RAE's instantiate_from_config)
        return {}  # EncoderConfig names the expected type
    paths = {key: params[key] for key in RAE_ENCODER_PATH_KEYS if key in params}
    odd = {key: path for key, path in paths.items() if not isinstance(path, (str, os.PathLike))}
    if odd:
        raise ConfigError(f"encoder_params {odd} must name the encoder's checkpoint as a path (a Hub id or a "
                          f"folder)")
    given = keywords.get("encoder_config_path")
    named = set(paths.values()) | ({given} if given is not None else set())
    if len({os.path.normpath(str(path)) for path in named}) > 1:  # "enc" and "enc/" are one folder
        raise ConfigError(f"encoder_config_path and encoder_params {paths} name different checkpoints "
                          f"{sorted(map(str, named))}; RAE reads its weights from the one and its image mean / std "
                          f"from the other, vqrae both from one: give the same path")
    rest = {k: v for k, v in params.items() if k not in RAE_ENCODER_PATH_KEYS + RAE_UNUSED_ENCODER_PARAMS}
    path = given if given is not None else next(iter(paths.values()), None)
    return {"encoder_params": rest, **({"encoder_config_path": path} if path is not None else {})}


__all__ = ["KEYWORDS", "config_with_keywords", "load_decoder_config"]
