"""vqrae: image tokenizer on frozen foundation encoders (package `stage1`)."""

from .decoder import DECODER_PRESETS, DecoderConfig, ViTDecoder, load_decoder_config
from .encoders import ENCODERS, EncoderNotAvailableError, FrozenEncoder, build_encoder
from .quantizer import VectorQuantizer, nearest_code
from .vqrae import VQRAE

__all__ = [
    "VQRAE",
    "VectorQuantizer",
    "nearest_code",
    "ViTDecoder",
    "DecoderConfig",
    "DECODER_PRESETS",
    "load_decoder_config",
    "ENCODERS",
    "FrozenEncoder",
    "EncoderNotAvailableError",
    "build_encoder",
]
__version__ = "0.1.0"
