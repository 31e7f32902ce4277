"""The model's configuration: one dataclass per part, nested in `VQRAEConfig`, stored as `config.json`.

    VQRAEConfig
        encoder:    EncoderConfig    configs/encoder/*.yaml     which frozen encoder, at which input size
        quantizer:  QuantizerConfig  configs/quantizer/*.yaml   codebook size and EMA rule
        decoder:    DecoderConfig    configs/decoder/*.yaml     ViT decoder sizes
        noise_tau, normalization_stat_path, normalization_eps, pretrained_decoder_path
                                                                the top level of configs/train.yaml
        reshape_to_2d                                           the layout of encode() (Python only)

Field names are the hydra keys, one to one, so a value has one name from the command line to the module that
uses it (`quantizer.decay=0.95` is `config.quantizer.decay` is `VectorQuantizer.decay`). Every value is checked
once, here, when a config is made (stage1.base.config_section: types first, then each section's `check`).
`VQRAE(...)`'s flat keyword names map onto these fields through stage1.model.keywords.KEYWORDS, the only table of
second names; the decoder presets are stage1.model.presets'.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field

from ..base.atomic import read_json, write_json
from ..base.config_section import ConfigError, ConfigSection, choice
from ..base.limits import MAX_CODES, MAX_IMAGE_SIDE, transformer_weights_at_least
from .encoders import encoder_options
from .presets import DECODER_PRESETS
from .quantizers import QUANTIZERS
from .quantizers.scales import VAR_SCALES

MAX_CONFIG_BYTES = 1 << 20  # a model's config.json is a few KB: a larger one is not ours


@dataclass
class EncoderConfig(ConfigSection):
    section = "encoder"
    cls: str = "Dinov2withNorm"  # a name in stage1.model.encoders.ENCODERS
    path: str = "facebook/dinov2-base"  # Hub id or local directory (config.json + weights)
    input_size: int | None = 224  # images are resized to this for the encoder (bicubic); None: used as given
    antialias: bool = False  # antialias that resize (RAE does not: its latents, stats and decoders are without)
    params: dict = field(default_factory=dict)  # extra arguments of the encoder class, e.g. {"normalize": False}

    def check(self):
        options = encoder_options(self.cls)
        self.require(bool(self.path), "path", "a Hub id or a local directory")
        for name, value in self.params.items():
            self.require(name in options and type(value).__name__ == options[name], "params", self.expected("params"))
        self.require(self.input_size is None or 0 < self.input_size <= MAX_IMAGE_SIDE, "input_size",
                     f"null or from 1 to {MAX_IMAGE_SIDE}")

    def expected(self, name: str) -> str:
        if name != "params":
            return super().expected(name)
        options = encoder_options(self.cls)  # cls, the field before, is a string by now; an unknown one is named here
        return f"a mapping of options of {self.cls}: {', '.join(f'{k} ({t})' for k, t in options.items()) or 'none'}"


MAX_DECODER_PARAMETERS = 10**10  # 40 GB in float32; RAE's largest decoder (ViT-XL) has 0.6e9


@dataclass
class QuantizerConfig(ConfigSection):
    """The quantizer: its kind (a class of stage1.model.quantizers.QUANTIZERS), the options every codebook kind reads,
    and each kind's own options. A kind's own options keep their defaults under another kind (refused otherwise, so
    a value is never silently ignored); the kind checks their values (its check_options)."""

    section = "quantizer"
    kind: str = choice(*QUANTIZERS)  # see stage1.model.quantizers
    num_embeddings: int = 8192  # codes per codebook
    commitment_cost: float = 0.25
    decay: float = 0.99  # EMA decay of the codebook statistics
    epsilon: float = 1e-5  # Laplace smoothing of the cluster sizes
    # A code that no token chose in the last restart_window * num_embeddings tokens seen (a code of average share
    # expects restart_window hits in them) restarts on the tokens farthest from their codes; 0: never.
    restart_window: float = 64.0
    # -- the kinds' own options --
    cosine: bool = False  # single, grouped: l2-normalised features and codes
    depth: int = 1  # residual: codebooks applied in turn, each to what the ones before it left
    groups: int = 1  # grouped: the channels split into this many groups, each with its own codebook
    # multiscale: the sides of the scales' maps, increasing, the last the grid's (VAR's, for a 16 x 16 grid)
    scales: tuple[int, ...] = VAR_SCALES
    # multiscale: one codebook per scale, or one shared by every scale (VAR's, with a code pinned at zero); per scale
    # measures the better (benchmarks/multiscale_quality.py)
    shared_codebook: bool = False
    # multiscale: VAR's phi, this many 3x3 convolutions refining the scales' upsampled maps, trained with the decoder
    # (VAR: 4, each serving the scales nearest its place; len(scales): one per scale); 0: none
    phi: int = 0
    # fsq: the levels of each channel of the projection (its vocabulary is their product): [8, 5, 5, 5] 1000 codes,
    # [8, 8, 8, 6, 5] 15360, [8, 8, 8, 5, 5, 5] 64000
    levels: tuple[int, ...] = (8, 5, 5, 5)
    # fsq: the weight of MAGVIT-v2's entropy penalty (sharp codes a token, every level used); with levels of 2: LFQ
    entropy_weight: float = 0.0
    # simvq: where the frozen basis starts: the offline k-means fit of the latents (this project's), or random
    # (N(0, 1) rows, the normalised latents' scale, and no fit)
    basis: str = choice("fit", "random")
    # gumbel: logits from the distance to each code (a learned scale) or a linear head; the sampling temperature,
    # annealed exponentially from tau_start to tau_end over tau_steps training forwards (steps x train.grad_accum);
    # hard one-hot samples (straight-through) or soft mixtures; the weight of the KL term towards uniform code use
    logits: str = choice("distance", "linear")
    tau_start: float = 1.0
    tau_end: float = 0.0625
    tau_steps: int = 20000
    hard: bool = True
    kl_weight: float = 0.01

    def check(self):
        self.require_positive("epsilon", "depth", "groups")
        self.require_at_most(MAX_CODES, "num_embeddings")
        self.require(0.0 <= self.decay < 1.0, "decay", "in [0, 1)")
        self.require(self.commitment_cost >= 0, "commitment_cost", ">= 0")
        self.require(self.restart_window >= 0, "restart_window", ">= 0 (0: never)")
        for name, default in self.foreign_options(self.kind).items():
            owners = [other.kind for other in QUANTIZERS.values() if name in other.options]
            self.require(getattr(self, name) == default, name,
                         f"{json.dumps(default)} with kind {self.kind!r} (an option of {', '.join(owners)})")
        QUANTIZERS[self.kind].check_options(self)

    @classmethod
    def foreign_options(cls, kind: str) -> dict:
        """The other kinds' own options, which `kind` does not read, with their defaults."""
        own = set(QUANTIZERS[kind].options)
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls) if f.name not in own
                and any(f.name in other.options for other in QUANTIZERS.values())}

    def for_kind(self, kind: str, **options) -> "QuantizerConfig":
        """The same common options for another kind, with that kind's own options at their defaults unless given
        (a kind made of single codebooks builds each from this)."""
        return dataclasses.replace(self, kind=kind, **{**self.foreign_options(kind), **options})

    def weights_at_least(self) -> int:
        """A lower bound on the numbers the quantizer's saved state holds (checked against a weights file)."""
        return QUANTIZERS[self.kind].weights_at_least(self)


@dataclass
class DecoderConfig(ConfigSection):
    """ViT decoder sizes. The presets are configs/decoder/*.yaml (hydra's decoder group): the one source."""

    section = "decoder"
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    patch_size: int  # pixels per token side: the decoder paints grid * patch_size pixels
    qkv_bias: bool = True
    cls_token: bool = False  # a trainable token in front of the latent tokens, dropped at the head (RAE: true)
    pos_embed: str = choice("learned", "fixed")  # 2-D sin-cos, learned from there, or fixed (RAE)
    layer_norm_eps: float = 1e-5  # RAE's decoders: 1e-12
    # What the head emits: "centered" x * 0.5 + 0.5 = image; "encoder" (RAE): the encoder's normalised input,
    # x * image_std + image_mean = image
    pixel_space: str = choice("centered", "encoder")

    def check(self):
        self.require_positive("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                              "patch_size", "layer_norm_eps")
        self.require(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
                     f"divisible by decoder.num_attention_heads ({self.num_attention_heads})")
        self.require(self.hidden_size % 4 == 0, "hidden_size", "divisible by 4 (2-D sin-cos init)")
        if self.parameters_at_least() > MAX_DECODER_PARAMETERS:
            raise ConfigError(f"decoder sizes {self.to_dict()} make a decoder of more than "
                              f"{self.parameters_at_least():.3g} parameters; at most {MAX_DECODER_PARAMETERS:.0e} "
                              f"are built")

    def parameters_at_least(self) -> int:
        """A lower bound on the decoder's parameter count: its layers' attention and MLP matrices and its pixel head
        (so a config.json can be checked against its weights file before anything is built)."""
        head = self.hidden_size * 3 * self.patch_size**2
        return transformer_weights_at_least(self.num_hidden_layers, self.hidden_size, self.intermediate_size) + head


SECTIONS = {"encoder": EncoderConfig, "quantizer": QuantizerConfig, "decoder": DecoderConfig}


@dataclass
class VQRAEConfig(ConfigSection):
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    decoder: DecoderConfig = field(default_factory=lambda: DecoderConfig.from_dict(DECODER_PRESETS["vit_b"]))
    noise_tau: float = 0.0  # RAE's latent noise: sigma ~ U(0, noise_tau) per image, on the raw latent, in training
    normalization_stat_path: str | None = None  # latent mean/var, [C] or [C, h, w] (safetensors or RAE's stat.pt);
    # read when the model is built, then saved in its weights (as std = sqrt(var + normalization_eps))
    normalization_eps: float = 1e-5  # RAE's eps
    # RAE's released decoder weights (model.pt, or safetensors) for a decoder in RAE's layout (decoder=rae_vit_*, or
    # RAE's decoder config directory): loaded when the model is built, then saved in its weights
    pretrained_decoder_path: str | None = None
    reshape_to_2d: bool = True  # encode() returns (B, C, h, w); False: (B, N, C) tokens

    def check(self):
        self.require(self.noise_tau >= 0, "noise_tau", ">= 0")
        self.require(self.normalization_eps >= 0, "normalization_eps", ">= 0")

    def save(self, path: str) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> "VQRAEConfig":
        try:
            return cls.from_dict(_without_foreign_options(read_json(path, MAX_CONFIG_BYTES), path))
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None


def _without_foreign_options(values, path: str):
    """A config.json written before the kinds refused each other's options may hold one that its kind never read
    (a single codebook with shared_codebook: true): dropped, as the version that wrote it ignored it, with a warning."""
    quantizer = values.get("quantizer") if isinstance(values, dict) else None
    kind = quantizer.get("kind", "single") if isinstance(quantizer, dict) else None
    if not isinstance(kind, str) or kind not in QUANTIZERS:
        return values  # from_dict names what is wrong
    foreign = {name: quantizer[name] for name, default in QuantizerConfig.foreign_options(kind).items()
               if name in quantizer and quantizer[name] != (list(default) if isinstance(default, tuple) else default)}
    if not foreign:
        return values
    warnings.warn(f"{path}: {foreign} are not options of quantizer.kind {kind!r}, which never read them; ignored",
                  stacklevel=3)
    return {**values, "quantizer": {k: v for k, v in quantizer.items() if k not in foreign}}
