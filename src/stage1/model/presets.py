"""The files the package ships inside itself, so that an installed wheel has them as a checkout does: the hydra
configs (`configs/`, whose decoder group is also VQRAE's decoder presets) and the quickstart's sample photos
(`assets/`). The repository's top-level `configs` and `assets` are links to these folders: one source."""

from __future__ import annotations

import os

from ..base.atomic import read_json, read_yaml

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../stage1
CONFIG_DIR = os.path.join(PACKAGE_DIR, "configs")
DECODER_CONFIG_DIR = os.path.join(CONFIG_DIR, "decoder")
ASSETS_DIR = os.path.join(PACKAGE_DIR, "assets")


def read_mapping(path: str) -> dict:
    """A mapping from a .yaml / .yml or JSON file; ValueError if the file holds something else."""
    if path.endswith((".yaml", ".yml")):
        values = read_yaml(path) or {}
    else:
        values = read_json(path)
    if not isinstance(values, dict):
        raise ValueError(f"decoder config {path} must hold a mapping, got {type(values).__name__}")
    return values


def _decoder_presets() -> dict[str, dict]:
    names = sorted(n for n in os.listdir(DECODER_CONFIG_DIR) if n.endswith(".yaml"))
    return {os.path.splitext(n)[0]: read_mapping(os.path.join(DECODER_CONFIG_DIR, n)) for n in names}


DECODER_PRESETS: dict[str, dict] = _decoder_presets()  # tiny, small, vit_b, vit_l, vit_xl, rae_vit_* (RAE's)

__all__ = ["ASSETS_DIR", "CONFIG_DIR", "DECODER_CONFIG_DIR", "DECODER_PRESETS", "PACKAGE_DIR", "read_mapping"]
