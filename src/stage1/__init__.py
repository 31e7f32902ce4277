"""vqrae: image tokenizer on frozen foundation encoders (package `stage1`)."""

from .decoder import ViTDecoder
from .encoders import ENCODERS, EncoderNotAvailableError, FrozenEncoder, build_encoder
from .model_config import (
    DECODER_PRESETS,
    DecoderConfig,
    EncoderConfig,
    QuantizerConfig,
    VQRAEConfig,
    load_decoder_config,
)
from .quantizer import VectorQuantizer
from .quantizer_kinds import GroupedQuantizer, ResidualQuantizer, build_quantizer
from .search import nearest_code
from .vqrae import VQRAE

__all__ = [
    "VQRAE",
    "VQRAEConfig",
    "EncoderConfig",
    "QuantizerConfig",
    "DecoderConfig",
    "VectorQuantizer",
    "ResidualQuantizer",
    "GroupedQuantizer",
    "build_quantizer",
    "nearest_code",
    "ViTDecoder",
    "DECODER_PRESETS",
    "load_decoder_config",
    "ENCODERS",
    "FrozenEncoder",
    "EncoderNotAvailableError",
    "build_encoder",
]
__version__ = "0.1.0"
