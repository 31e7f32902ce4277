"""The quantizer kinds, one module each, and their registry: `quantizer.kind` names a class of QUANTIZERS.

    single      one EMA codebook                           codes (h, w)          single.py
    residual    `depth` codebooks on what the ones before    codes (h, w, depth)   residual.py
                them leave
    grouped     the channels in `groups` slices, a codebook  codes (h, w, groups)  grouped.py
                each
    multiscale  VAR's residual scales on the grid            codes (L,)            multiscale.py
    fsq         finite scalar quantization of a learned      codes (h, w)          fsq.py
                projection: no codebook
    simvq       a frozen basis times a learned linear map     codes (h, w)          simvq.py
    gumbel      Gumbel-softmax samples of K codes            codes (h, w)          gumbel.py
    none        no codebook: the latent as it is (RAE)       no codes              none.py

A new kind is a module with a Quantizer subclass (the contract: base.py) and one line below; the config's choices,
the commands, the exports, the card and the end-to-end test (tests/test_quantizer_registry.py) follow from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...base.limits import MAX_QUANTIZER_ELEMENTS
from .base import CodeLayout, Quantizer, QuantizerOutput
from .fsq import FSQuantizer
from .grouped import GroupedQuantizer
from .gumbel import GumbelQuantizer
from .multiscale import MultiScaleQuantizer
from .none import NoQuantizer
from .residual import ResidualQuantizer
from .simvq import SimVQuantizer
from .single import VectorQuantizer

if TYPE_CHECKING:
    from ..config import QuantizerConfig

QUANTIZERS: dict[str, type[Quantizer]] = {cls.kind: cls for cls in (
    VectorQuantizer,
    ResidualQuantizer,
    GroupedQuantizer,
    MultiScaleQuantizer,
    FSQuantizer,
    SimVQuantizer,
    GumbelQuantizer,
    NoQuantizer,
)}


def build_quantizer(config: QuantizerConfig, embedding_dim: int) -> Quantizer:
    """The quantizer of config.kind for latents of embedding_dim channels; a config whose codebooks would hold more
    than MAX_QUANTIZER_ELEMENTS numbers in all is refused before any is allocated (each field alone is bounded where
    it lives; their product is bounded here)."""
    elements = QUANTIZERS[config.kind].state_elements(config, embedding_dim)
    if elements > MAX_QUANTIZER_ELEMENTS:
        raise ValueError(f"quantizer {config.kind!r} would hold {elements:,} numbers ({elements * 4 / 2**30:.1f} GiB "
                         f"in fp32) for {embedding_dim}-channel latents, more than the {MAX_QUANTIZER_ELEMENTS:,} "
                         f"accepted: fewer codes (num_embeddings), codebooks (depth, scales, shared_codebook) or "
                         f"phi convolutions")
    return QUANTIZERS[config.kind](config, embedding_dim)


__all__ = ["QUANTIZERS", "CodeLayout", "FSQuantizer", "GroupedQuantizer", "GumbelQuantizer", "MultiScaleQuantizer",
           "NoQuantizer", "Quantizer", "QuantizerOutput", "ResidualQuantizer", "SimVQuantizer", "VectorQuantizer",
           "build_quantizer"]
