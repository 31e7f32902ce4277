"""The model's configuration: one dataclass per part, nested in `VQRAEConfig`, stored as `config.json`.

    VQRAEConfig
        encoder:    EncoderConfig    configs/encoder/*.yaml     which frozen encoder, at which input size
        quantizer:  QuantizerConfig  configs/quantizer/*.yaml   codebook size and EMA rule
        decoder:    DecoderConfig    configs/decoder/*.yaml     ViT decoder sizes
        noise_tau, normalization_stat_path, reshape_to_2d, quantize_before_reshape     `model:` in configs/train.yaml

Field names are the hydra keys, one to one, so a value has one name from the command line to the module that
uses it (`quantizer.decay=0.95` is `config.quantizer.decay` is `VectorQuantizer.decay`). Every value is checked
once, here, when a config is made. `VQRAE(...)`'s flat keyword names (RAE's) map onto these fields through
`KEYWORDS`, the only table of second names.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields

from .atomic import read_json
from .encoders import encoder_class

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")
DECODER_CONFIG_DIR = os.path.join(CONFIG_DIR, "decoder")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class ConfigSection:
    """to_dict / from_dict for a config dataclass (named by `section`), refusing keys it does not have."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, where: str = ""):
        if not isinstance(values, dict):
            raise ValueError(f"{where}{cls.section} must be a mapping, got {type(values).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{where}unknown {cls.section} config keys {unknown}; expected a subset of {known}")
        required = [f.name for f in fields(cls) if f.default is dataclasses.MISSING and f.default_factory is
                    dataclasses.MISSING]
        missing = [name for name in required if name not in values]
        if missing:
            raise ValueError(f"{where}{cls.section} config lacks keys {missing}")
        return cls(**values)


@dataclass
class EncoderConfig(ConfigSection):
    section = "encoder"
    cls: str = "Dinov2withNorm"  # a name in stage1.encoders.ENCODERS
    path: str = "facebook/dinov2-base"  # Hub id or local directory (config.json + weights)
    input_size: int | None = 224  # images are resized to this for the encoder (bicubic); None: used as given
    antialias: bool = False  # antialias that resize (RAE does not: its latents, stats and decoders are without)
    params: dict = field(default_factory=dict)  # extra arguments of the encoder class, e.g. {"normalize": False}

    def __post_init__(self):
        encoder_class(self.cls)
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"encoder.path must be a Hub id or a local directory, got {self.path!r}")
        if self.input_size is not None and not _positive_int(self.input_size):
            raise ValueError(f"encoder.input_size must be a positive integer or null, got {self.input_size!r}")
        if not isinstance(self.antialias, bool):
            raise ValueError(f"encoder.antialias must be true or false, got {self.antialias!r}")
        if not isinstance(self.params, dict):
            raise ValueError(f"encoder.params must be a mapping, got {self.params!r}")


# one codebook; `depth` levels on residuals; `groups` of channels; no codebook (continuous: VQRAE is RAE)
QUANTIZER_KINDS = ("single", "residual", "grouped", "none")


@dataclass
class QuantizerConfig(ConfigSection):
    section = "quantizer"
    kind: str = "single"
    num_embeddings: int = 8192  # codes per codebook
    depth: int = 1  # residual: codebooks applied in turn, each to what the ones before it left
    groups: int = 1  # grouped: the channels split into this many groups, each with its own codebook
    cosine: bool = False  # l2-normalised features and codes (single, grouped)
    commitment_cost: float = 0.25
    decay: float = 0.99  # EMA decay of the codebook statistics
    epsilon: float = 1e-5  # Laplace smoothing of the cluster sizes
    restart_after_steps: int = 0  # a code no token chose in this many training steps restarts (0: never)
    kmeans_init: bool = False  # first batch: k-means on its features (else: codes drawn from them)
    kmeans_iters: int = 10

    def __post_init__(self):
        if self.kind not in QUANTIZER_KINDS:
            raise ValueError(f"quantizer.kind must be one of {QUANTIZER_KINDS}, got {self.kind!r}")
        for name, kind in (("depth", "residual"), ("groups", "grouped")):
            value = getattr(self, name)
            if not _positive_int(value) or (value > 1 and self.kind != kind):
                raise ValueError(f"quantizer.{name} must be a positive integer, and 1 unless quantizer.kind is "
                                 f"'{kind}'; got {value!r} with kind {self.kind!r}")
        if self.cosine and self.kind == "residual":
            raise ValueError("quantizer.cosine applies to the single and grouped kinds: residuals of unit codes "
                             "are not unit vectors")
        if not _positive_int(self.num_embeddings):
            raise ValueError(f"quantizer.num_embeddings must be a positive integer, got {self.num_embeddings!r}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"quantizer.decay must be in [0, 1), got {self.decay}")
        if self.epsilon <= 0:
            raise ValueError(f"quantizer.epsilon must be positive, got {self.epsilon}")
        if self.commitment_cost < 0:
            raise ValueError(f"quantizer.commitment_cost must be >= 0, got {self.commitment_cost}")
        if not isinstance(self.restart_after_steps, int) or self.restart_after_steps < 0:
            raise ValueError(f"quantizer.restart_after_steps must be an integer >= 0, got {self.restart_after_steps!r}")
        if not _positive_int(self.kmeans_iters):
            raise ValueError(f"quantizer.kmeans_iters must be a positive integer, got {self.kmeans_iters!r}")


POS_EMBEDS = ("learned", "fixed")
PIXEL_SPACES = ("centered", "encoder")


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
    pos_embed: str = "learned"  # 2-D sin-cos, "learned" from there or "fixed" (RAE)
    layer_norm_eps: float = 1e-5  # RAE's decoders: 1e-12
    pixel_space: str = "centered"  # what the head emits: "centered" x * 0.5 + 0.5 = image; "encoder" (RAE): the
    # encoder's normalised input, x * image_std + image_mean = image

    def __post_init__(self):
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size"):
            value = getattr(self, name)
            if not _positive_int(value):
                raise ValueError(f"decoder.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"decoder.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.hidden_size % 4:
            raise ValueError(f"decoder.hidden_size must be divisible by 4 (2-D sin-cos init), got {self.hidden_size}")
        for name, allowed in (("pos_embed", POS_EMBEDS), ("pixel_space", PIXEL_SPACES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"decoder.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.layer_norm_eps, (int, float)) or not self.layer_norm_eps > 0:
            raise ValueError(f"decoder.layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}")


def _read_mapping(path: str) -> dict:
    if path.endswith((".yaml", ".yml")):
        import yaml

        with open(path) as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise ValueError(f"{path} is not valid YAML: {err}") from None
    else:
        values = read_json(path)
    if not isinstance(values, dict):
        raise ValueError(f"decoder config {path} must hold a mapping, got {type(values).__name__}")
    return values


def _decoder_presets() -> dict[str, dict]:
    if not os.path.isdir(DECODER_CONFIG_DIR):
        return {}
    names = sorted(n for n in os.listdir(DECODER_CONFIG_DIR) if n.endswith(".yaml"))
    return {os.path.splitext(n)[0]: _read_mapping(os.path.join(DECODER_CONFIG_DIR, n)) for n in names}


DECODER_PRESETS: dict[str, dict] = _decoder_presets()  # tiny, small, vit_b, vit_l, vit_xl (RAE's XL decoder)


def _preset(name: str) -> dict:
    if not DECODER_PRESETS:
        raise FileNotFoundError(f"the decoder presets live in {DECODER_CONFIG_DIR}, which is missing: install "
                                f"vqrae from its repository (pip install -e .), or pass a decoder config file")
    return dict(DECODER_PRESETS[name])


def load_decoder_config(source: str | dict | DecoderConfig | None, **overrides) -> DecoderConfig:
    """A DecoderConfig from a preset name, a .json/.yaml path, a dict, or None (vit_b); overrides win. A dict or
    file that gives only some sizes takes the others from vit_b."""
    if isinstance(source, DecoderConfig):
        values = source.to_dict()
    elif isinstance(source, dict):
        values = {**_preset("vit_b"), **source}
    elif source is None or source in DECODER_PRESETS:
        values = _preset(source or "vit_b")
    elif os.path.isfile(source):
        values = {**_preset("vit_b"), **_read_mapping(source)}
    else:
        raise ValueError(
            f"decoder config '{source}' is neither a preset ({', '.join(DECODER_PRESETS)}) nor an existing "
            f".json/.yaml file"
        )
    values.update({k: v for k, v in overrides.items() if v is not None})
    return DecoderConfig.from_dict(values)


# VQRAE(...)'s flat keyword names (RAE's, kept for the documented API) -> (section, field) of VQRAEConfig.
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
    "restart_after_steps": ("quantizer", "restart_after_steps"),
    "kmeans_init": ("quantizer", "kmeans_init"),
    "noise_tau": (None, "noise_tau"),
    "reshape_to_2d": (None, "reshape_to_2d"),
    "normalization_stat_path": (None, "normalization_stat_path"),
    "quantize_before_reshape": (None, "quantize_before_reshape"),
}
# In vqrae 0.1's config.json; now the loss config's recon_loss, and restarts counted in steps.
LEGACY_TRAINING_KEYS = ("recon_loss", "dead_code_threshold")
SECTIONS = {"encoder": EncoderConfig, "quantizer": QuantizerConfig, "decoder": DecoderConfig}


def written_before_rae_layout(values: dict) -> bool:
    """config.json files of vqrae 0.2 and before lack decoder.pixel_space. Their models resized images with
    antialiasing and fed the decoder the normalised latent (now it gets the raw one, as RAE's decoders do)."""
    decoder = values.get("decoder")
    return not (isinstance(decoder, dict) and "pixel_space" in decoder)


@dataclass
class VQRAEConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    decoder: DecoderConfig = field(default_factory=lambda: load_decoder_config("vit_b"))
    noise_tau: float = 0.0  # RAE's latent noise: sigma ~ U(0, noise_tau) per image, on the raw latent, in training
    normalization_stat_path: str | None = None  # latent mean/var, [C] or [C, h, w] (safetensors or RAE's stat.pt);
    # saved into the weights
    reshape_to_2d: bool = True  # encode() returns (B, C, h, w); False: (B, N, C) tokens
    quantize_before_reshape: bool = False  # RAE/VQRAE configs carry it; the quantizer always sees tokens, so same codes

    def __post_init__(self):
        for name, section in SECTIONS.items():
            if not isinstance(getattr(self, name), section):
                raise ValueError(f"VQRAEConfig.{name} must be a {section.__name__}, got {getattr(self, name)!r}")
        if self.noise_tau < 0:
            raise ValueError(f"noise_tau must be >= 0, got {self.noise_tau}")
        if self.normalization_stat_path is not None and not isinstance(self.normalization_stat_path, str):
            raise ValueError(
                f"normalization_stat_path must be a file path or null, got {self.normalization_stat_path!r}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, where: str = "") -> "VQRAEConfig":
        """From to_dict()'s nested form; the flat keyword form of vqrae 0.1's config.json is read too."""
        if not isinstance(values, dict):
            raise ValueError(f"{where}a VQRAE config must be a mapping, got {type(values).__name__}")
        if values and not set(SECTIONS) & set(values) and set(values) <= {*KEYWORDS, *LEGACY_TRAINING_KEYS,
                                                                           "decoder_config_path"}:
            # vqrae 0.1 wrote the keyword form, with two values that only training used.
            return cls().with_keywords(**{k: v for k, v in values.items() if k not in LEGACY_TRAINING_KEYS})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{where}unknown keys {unknown}; expected a subset of {known}")
        sections = {name: SECTIONS[name].from_dict(values[name], where) for name in SECTIONS if name in values}
        return cls(**{**values, **sections})

    def save(self, path: str) -> None:
        from .atomic import write_json

        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> "VQRAEConfig":
        values = read_json(path)
        config = cls.from_dict(values, where=f"{path}: ")
        if written_before_rae_layout(values) and "antialias" not in (values.get("encoder") or {}):
            config.encoder = dataclasses.replace(config.encoder, antialias=True)  # how those models resized
        return config

    def with_keywords(self, **keywords) -> "VQRAEConfig":
        """A copy with values given by VQRAE's flat keyword names, e.g. encoder_config_path=<local dir>."""
        unknown = sorted(set(keywords) - set(KEYWORDS) - {"decoder_config_path"})
        if unknown:
            raise TypeError(f"unknown VQRAE keyword arguments {unknown}; expected some of "
                            f"{sorted([*KEYWORDS, 'decoder_config_path'])}")
        sections = {name: getattr(self, name).to_dict() for name in SECTIONS}
        if "decoder_config_path" in keywords:
            sections["decoder"] = load_decoder_config(keywords["decoder_config_path"]).to_dict()
        top = {}
        for keyword, value in keywords.items():
            if keyword == "decoder_config_path" or (keyword == "decoder_patch_size" and value is None):
                continue
            section, name = KEYWORDS[keyword]
            (sections[section] if section else top)[name] = value
        return VQRAEConfig.from_dict({**self.to_dict(), **sections, **top})

    @classmethod
    def from_kwargs(cls, **keywords) -> "VQRAEConfig":
        return cls().with_keywords(**keywords)
