"""vqrae: image tokenizer on frozen foundation encoders (package `stage1`).

The names below load on first use (PEP 562), so importing a light submodule, e.g. the commands' argument parsing in
stage1.cli.arguments, does not import torch, transformers and timm; `from stage1 import VQRAE` works as usual."""

import importlib

_MODULE_OF = {
    "ViTDecoder": "model.decoder",
    "ENCODERS": "model.encoders",
    "EncoderNotAvailableError": "model.encoders",
    "FrozenEncoder": "model.encoders",
    "LlamaGenTokenizer": "model.llamagen",
    "build_encoder": "model.encoders",
    "prepare_image": "data.input_pipeline",
    "DECODER_PRESETS": "model.presets",
    "DecoderConfig": "model.config",
    "EncoderConfig": "model.config",
    "QuantizerConfig": "model.config",
    "VQRAEConfig": "model.config",
    "load_decoder_config": "model.keywords",
    "QUANTIZERS": "model.quantizers",
    "CodeLayout": "model.quantizers",
    "Quantizer": "model.quantizers",
    "QuantizerOutput": "model.quantizers",
    "VectorQuantizer": "model.quantizers",
    "GroupedQuantizer": "model.quantizers",
    "ResidualQuantizer": "model.quantizers",
    "MultiScaleQuantizer": "model.quantizers",
    "NoQuantizer": "model.quantizers",
    "build_quantizer": "model.quantizers",
    "nearest_code": "model.search",
    "VQRAE": "model.vqrae",
    "VARTokenizer": "model.var",
    "from_pretrained": "model.vqrae",
    "RAE": "model.rae_model",
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
