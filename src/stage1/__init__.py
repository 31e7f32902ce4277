"""vqrae: image tokenizer on frozen foundation encoders (package `stage1`).

The names below load on first use (PEP 562), so importing a light submodule, e.g. the commands' argument parsing in
stage1.cli.arguments, does not import torch, transformers and timm; `from stage1 import VQRAE` works as usual."""

import importlib

_MODULE_OF = {
    "ViTDecoder": "decoder",
    "ENCODERS": "encoders",
    "EncoderNotAvailableError": "encoders",
    "FrozenEncoder": "encoders",
    "build_encoder": "encoders",
    "prepare_image": "input_pipeline",
    "DECODER_PRESETS": "model_config",
    "DecoderConfig": "model_config",
    "EncoderConfig": "model_config",
    "QuantizerConfig": "model_config",
    "VQRAEConfig": "model_config",
    "load_decoder_config": "model_config",
    "VectorQuantizer": "quantizer",
    "GroupedQuantizer": "quantizer_kinds",
    "ResidualQuantizer": "quantizer_kinds",
    "build_quantizer": "quantizer_kinds",
    "nearest_code": "search",
    "VQRAE": "vqrae",
}
__all__ = sorted(_MODULE_OF)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'stage1' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_MODULE_OF))
