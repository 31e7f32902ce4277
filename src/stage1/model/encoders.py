"""Frozen pretrained encoders: image in [0, 1] -> grid of patch features.

Every encoder is loaded with transformers' `from_pretrained`, so `encoder_config_path` is either a Hub id
(resolved through the local Hugging Face cache, downloaded when there is a network) or a local directory
holding `config.json` + weights. A config names an encoder by string through `ENCODERS`.
"""

from __future__ import annotations

import inspect
import os

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.utils import cached_file

from ..base.atomic import follow_umask, read_json, write_json
from ..base.limits import transformer_weights_at_least
from ..base.tensor_files import tensor_elements

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


class EncoderNotAvailableError(OSError):
    """The encoder's weights are neither in a local directory nor reachable through the Hub cache."""


def may_be_on_hub(path: str) -> bool:
    """Whether a path that is no local directory is worth asking the Hub (or, with HF_HUB_OFFLINE=1, its local
    cache, answered at once) for: it reads as an org/name repo id, and is not local (a path that exists, starts with
    `/` or `.`, or whose first part is an existing folder: `results/nope` is a missing run, not a repo). Otherwise the
    answer is known at once."""
    if os.path.isabs(path) or path.startswith(".") or path.count("/") != 1 or os.path.exists(path):
        return False
    return not os.path.isdir(path.split("/")[0])


def _not_available(path: str, cause: Exception) -> EncoderNotAvailableError:
    where = ("pass --encoder-path DIR to the commands, encoder.path=DIR to training (encoder_config_path=DIR in "
             "Python)")
    cause_text = f"(cause: {type(cause).__name__}: {str(cause).splitlines()[0][:200]})"
    if not may_be_on_hub(path):  # a local path, not a Hub org/name id
        return EncoderNotAvailableError(
            f"Could not load the encoder '{path}': no such directory with config.json and weights (seen from "
            f"{os.getcwd()}). If the encoder lives elsewhere now, {where}. {cause_text}")
    return EncoderNotAvailableError(
        f"Could not load the encoder '{path}': it is not a local directory with config.json and weights, "
        f"and it could not be fetched from the Hugging Face Hub (no network, or not in the local cache). "
        f"On a machine with network run `hf download {path} --local-dir DIR`, copy DIR here and "
        f"{where}. {cause_text}"
    )


MAX_ENCODER_CONFIG_BYTES = 1 << 20  # an encoder's config.json is a few KB; transformers reads it whole


def _cannot_build(path: str, err: Exception) -> ValueError:
    """A local encoder folder whose files transformers cannot make a model of (a patch size of 0, an unknown
    activation or model_type, ...): whatever it raised, one error naming the folder."""
    return ValueError(f"the encoder '{path}' cannot be built from its config.json and weights "
                      f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else 'no message'})")


def load_config(path: str):
    local = os.path.isdir(path)
    if not local and not may_be_on_hub(path):
        raise _not_available(path, FileNotFoundError("a local path, not a Hub id (org/name)"))
    if local and os.path.exists(os.path.join(path, "config.json")):
        read_json(os.path.join(path, "config.json"), MAX_ENCODER_CONFIG_BYTES)  # bounded before transformers reads it
    try:
        # A folder's own Python (auto_map) never runs: transformers would ask "run the custom code?" on a terminal.
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except OSError as err:
        raise _not_available(path, err) from err
    except Exception as err:
        if "trust_remote_code" in str(err) or "auto_map" in str(err):
            raise ValueError(f"the encoder '{path}' asks to run Python code of its own (auto_map in its "
                             f"config.json); vqrae never runs code from a model folder: use an encoder whose "
                             f"model_type transformers knows") from None
        if local:
            raise _cannot_build(path, err) from None
        raise _not_available(path, err) from err


def load_pretrained(model_class: type[PreTrainedModel], path: str, **overrides) -> tuple[PreTrainedModel, list[str]]:
    """The checkpoint's model, with attention on torch's fused scaled_dot_product_attention kernels, and the names
    of weights its files lack (transformers fills them with random numbers: FrozenEncoder refuses any it keeps);
    `overrides` change its config."""
    try:
        _check_weights_hold(model_class, path, overrides)
        model, info = model_class.from_pretrained(path, attn_implementation="sdpa", trust_remote_code=False,
                                                  output_loading_info=True, **overrides)
    except OSError as err:
        raise _not_available(path, err) from err
    except RuntimeError as err:  # transformers' report of weights whose shapes differ from the config's
        raise ValueError(f"the encoder '{path}' has weights of other shapes than its config.json says "
                         f"({str(err).splitlines()[0][:200]})") from None
    except ValueError:
        raise  # already one error that names the folder
    except Exception as err:  # a config transformers took but cannot build (ZeroDivisionError, KeyError, ...)
        raise _cannot_build(path, err) from None
    return model, sorted(info["missing_keys"])


def _check_weights_hold(model_class: type[PreTrainedModel], path: str, overrides: dict) -> None:
    """config.json's sizes against its safetensors weights, before transformers builds anything from them: its
    transformer layers alone (attention and MLP matrices) must fit in what the files hold. A .bin checkpoint is left
    to transformers (it reads it with weights_only, bounded by the file)."""
    files = _safetensors_files(path)
    if not files:
        return
    config = model_class.config_class.from_pretrained(path, **overrides)
    h, i, layers = (int(getattr(config, name, 0) or 0) for name in
                    ("hidden_size", "intermediate_size", "num_hidden_layers"))
    needed = transformer_weights_at_least(layers, h, i)
    held = sum(tensor_elements(f, "the encoder's weights") for f in files)
    if needed > held:
        raise ValueError(f"the encoder '{path}': its config.json describes {layers} layers of width {h} (at least "
                         f"{needed:,} weights) but its weights hold {held:,} numbers: not this checkpoint's config")


def _safetensors_files(path: str) -> list[str]:
    """The local paths of a checkpoint's safetensors weights (one file or an index's shards), fetched through the
    Hub cache like from_pretrained would; none for a .bin checkpoint."""
    single = _optional_file(path, "model.safetensors")
    if single is not None:
        return [single]
    index = _optional_file(path, "model.safetensors.index.json")
    if index is None:
        return []
    listed = read_json(index)
    weight_map = listed.get("weight_map") if isinstance(listed, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) and os.path.basename(name) == name
                                                   for name in weight_map.values()):
        raise ValueError(f"{index} is not a safetensors index (a weight_map of file names in its folder)")
    return [_optional_file(path, name) or os.path.join(os.path.dirname(index), name)
            for name in sorted(set(weight_map.values()))]


def _optional_file(path: str, name: str) -> str | None:
    """A checkpoint's file `name` (its folder, or the Hub through its cache), None when it has none or the Hub
    cannot be reached."""
    return cached_file(path, name, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)


MAX_PIXEL_STAT = 1000.0  # the largest |mean| or std an encoder's preprocessor_config.json may give (ImageNet: 0.5)


def read_image_stats(path: str, default_mean, default_std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input mean/std from the checkpoint's `preprocessor_config.json`, or the family's defaults.

    Read as a plain JSON file (local directory or Hub cache) rather than through an image processor,
    which would pull in optional dependencies and, for some classes, network calls.
    """
    resolved = _optional_file(path, "preprocessor_config.json")
    if resolved is None or not os.path.isfile(resolved):
        return tuple(default_mean), tuple(default_std)
    config = read_json(resolved, 1 << 20)  # a few hundred bytes: a larger one is not a preprocessor config
    if not isinstance(config, dict):
        raise ValueError(f"{resolved}: expected a JSON object (with image_mean / image_std), got "
                         f"{type(config).__name__}")
    mean, std = config.get("image_mean", default_mean), config.get("image_std", default_std)
    channels = len(default_mean)
    # Statistics of pixels in [0, 1]: beyond MAX_PIXEL_STAT they are no such thing (3.5e38 is Inf in float32, and a
    # std of 1e300 made every image one input, as a std of 0 did).
    for name, values, least in (("image_mean", mean, -MAX_PIXEL_STAT), ("image_std", std, 1e-6)):
        if not (isinstance(values, (list, tuple)) and len(values) == channels and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and least <= v <= MAX_PIXEL_STAT
                for v in values)):
            what = (f"numbers from -{MAX_PIXEL_STAT:g} to {MAX_PIXEL_STAT:g}" if name == "image_mean" else
                    f"numbers from 1e-6 to {MAX_PIXEL_STAT:g} (a std of 0 makes every image one input)")
            raise ValueError(f"{resolved}: {name} must be a list of {channels} {what}, got {values!r}"[:400])
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _drop_layernorm_affine(model: PreTrainedModel, name: str) -> dict[str, torch.Tensor]:
    """RAE: the final LayerNorm `name` without its learned scale/shift, so every token is normalised to zero mean
    and unit variance per channel (latent scales comparable across encoders and codebooks). Returns the dropped
    weights, which a saved copy of the checkpoint keeps."""
    norm = getattr(model, name)
    setattr(model, name, nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=False))
    return {f"{name}.{key}": value.detach() for key, value in norm.state_dict().items()}


class FrozenEncoder(nn.Module):
    """Base class: normalises [0, 1] images, runs the frozen backbone, returns patch tokens (B, N, C).

    Frozen for real: parameters do not require grad, the module stays in eval() whatever its parent does,
    and the forward runs under no_grad.
    """

    default_mean = IMAGENET_MEAN
    default_std = IMAGENET_STD

    def __init__(self, model: PreTrainedModel, path: str, patch_size: int, hidden_size: int, missing: list[str],
                 dropped: dict[str, torch.Tensor]):
        random = sorted(set(missing) & set(model.state_dict()))  # the final LayerNorm's affine may be dropped
        if random:
            raise ValueError(f"the encoder '{path}' lacks {len(random)} weight(s) its config.json needs "
                             f"({random[:3]}): they would be random, not pretrained")
        # NaN or Inf weights give NaN features for every image, which all snap to one code.
        damaged = [name for name, value in model.state_dict().items()
                   if value.is_floating_point() and not value.isfinite().all()]
        if damaged:
            raise ValueError(f"the encoder '{path}' has NaN or Inf weights in {damaged[:3]}: a damaged copy? fetch "
                             f"it again")
        super().__init__()
        self.model = model
        # Not the module's state (the frozen encoder is loaded from its checkpoint): what save_pretrained gives back.
        self.dropped_weights = {name: value for name, value in dropped.items() if name not in missing}
        self.path = path
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (patch_size, hidden_size)):
            raise ValueError(f"the encoder '{path}': its config.json's patch_size and hidden_size must be positive "
                             f"integers (square patches), got {patch_size!r} and {hidden_size!r}")
        self.patch_size, self.hidden_size = patch_size, hidden_size
        mean, std = read_image_stats(path, self.default_mean, self.default_std)
        # Not persistent: they come from the checkpoint's own files, so saved VQRAE weights never hold them.
        self.register_buffer("image_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.model.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True):
        # A frozen encoder never enters training mode (no dropout, no drop-path), even under model.train().
        return super().train(False)

    def patch_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def save_pretrained(self, folder: str) -> None:
        """The checkpoint as it was loaded, complete (the dropped LayerNorm affine too, so that it loads with no
        weight missing), with its image mean / std in preprocessor_config.json."""
        state = {**self.model.state_dict(), **self.dropped_weights}
        self.model.save_pretrained(folder, state_dict={k: v.detach().cpu().contiguous() for k, v in state.items()})
        write_json(os.path.join(folder, "preprocessor_config.json"),
                   {"image_mean": self.image_mean.flatten().tolist(), "image_std": self.image_std.flatten().tolist()})
        follow_umask(folder)

    def check_fits(self, what: str, *sides: int, hint: str = "") -> None:
        """The one rule for every size this encoder sees: a whole number of patches per side."""
        if any(side % self.patch_size for side in sides):
            shown = ", ".join(str(side) for side in sides)
            p = self.patch_size
            raise ValueError(f"{what} ({shown}) must be a multiple of the encoder's patch size ({p}){hint}")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixel_values = (images - self.image_mean.to(images.dtype)) / self.image_std.to(images.dtype)
        return self.patch_tokens(pixel_values)


class Dinov2withNorm(FrozenEncoder):
    """DINOv2 and DINOv2-with-registers; patch tokens only (CLS and register tokens dropped)."""

    def __init__(self, path: str, normalize: bool = True):
        from transformers import Dinov2Model, Dinov2WithRegistersModel

        config = load_config(path)
        classes = {"dinov2": Dinov2Model, "dinov2_with_registers": Dinov2WithRegistersModel}
        if config.model_type not in classes:
            raise ValueError(
                f"Dinov2withNorm expects a DINOv2 checkpoint (model_type one of {sorted(classes)}), "
                f"got model_type='{config.model_type}' at '{path}'"
            )
        model, missing = load_pretrained(classes[config.model_type], path)
        dropped = _drop_layernorm_affine(model, "layernorm") if normalize else {}
        self.num_prefix_tokens = 1 + getattr(config, "num_register_tokens", 0)
        super().__init__(model, path, config.patch_size, config.hidden_size, missing, dropped)

    def patch_tokens(self, pixel_values):
        return self.model(pixel_values=pixel_values).last_hidden_state[:, self.num_prefix_tokens :]


class SigLIP2(FrozenEncoder):
    """SigLIP and SigLIP2 vision towers; patch tokens of the last hidden state.

    Fixed-resolution SigLIP2 checkpoints (e.g. google/siglip2-base-patch16-256) use the SigLIP architecture;
    NaFlex checkpoints (model_type siglip2) take pre-patchified pixels and are fed a full, unpadded grid.
    A full image-text checkpoint works too: only its vision tower is loaded.
    """

    default_mean = SIGLIP_MEAN
    default_std = SIGLIP_STD

    def __init__(self, path: str, normalize: bool = True):
        from transformers import SiglipVisionModel

        config = load_config(path)
        vision_config = getattr(config, "vision_config", config)
        self.naflex = config.model_type.startswith("siglip2")
        if self.naflex:
            from transformers import Siglip2VisionModel as model_class
        elif config.model_type.startswith("siglip"):
            model_class = SiglipVisionModel
        else:
            raise ValueError(
                f"SigLIP2 expects a SigLIP or SigLIP2 checkpoint, got model_type='{config.model_type}' at '{path}'"
            )
        # The attention-pooling head only makes the pooled output, which a tokenizer never uses.
        model, missing = load_pretrained(model_class, path, vision_use_head=False)
        dropped = _drop_layernorm_affine(model, "post_layernorm") if normalize else {}
        super().__init__(model, path, vision_config.patch_size, vision_config.hidden_size, missing, dropped)

    def patch_tokens(self, pixel_values):
        if not self.naflex:
            return self.model(pixel_values=pixel_values, interpolate_pos_encoding=True).last_hidden_state
        b, c, height, width = pixel_values.shape
        p = self.patch_size
        h, w = height // p, width // p
        # Same patch layout as Siglip2ImageProcessor: row-major patches, each flattened as (p, p, C).
        patches = pixel_values.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, p * p * c)
        mask = torch.ones(b, h * w, dtype=torch.long, device=pixel_values.device)
        shapes = torch.tensor([[h, w]] * b, dtype=torch.long, device=pixel_values.device)
        return self.model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes).last_hidden_state


class MAE(FrozenEncoder):
    """MAE ViT encoder with masking turned off: every patch comes out, in raster order, CLS dropped."""

    def __init__(self, path: str, normalize: bool = True):
        from transformers import ViTMAEModel

        config = load_config(path)
        if config.model_type != "vit_mae":
            raise ValueError(f"MAE expects a ViT-MAE checkpoint, got model_type='{config.model_type}' at '{path}'")
        model, missing = load_pretrained(ViTMAEModel, path, mask_ratio=0.0)
        dropped = _drop_layernorm_affine(model, "layernorm") if normalize else {}
        super().__init__(model, path, config.patch_size, config.hidden_size, missing, dropped)

    def patch_tokens(self, pixel_values):
        b, _, height, width = pixel_values.shape
        n = (height // self.patch_size) * (width // self.patch_size)
        # mask_ratio=0 keeps every patch, but ViT-MAE still shuffles them by argsort(noise):
        # an increasing noise makes that shuffle the identity, so tokens stay in raster order.
        noise = torch.arange(n, device=pixel_values.device, dtype=torch.float32).expand(b, n)
        out = self.model(pixel_values=pixel_values, noise=noise, interpolate_pos_encoding=True)
        return out.last_hidden_state[:, 1:]


ENCODERS: dict[str, type[FrozenEncoder]] = {
    "Dinov2withNorm": Dinov2withNorm,
    "SigLIP2": SigLIP2,
    "SigLIP": SigLIP2,
    "SigLIP2wNorm": SigLIP2,
    "MAE": MAE,
    "MAEwNorm": MAE,
}


def encoder_class(name: str) -> type[FrozenEncoder]:
    """The encoder class registered under `name` (the config's encoder.cls, the keyword encoder_cls)."""
    if name not in ENCODERS:
        raise ValueError(f"Unknown encoder_cls '{name}': encoder.cls must be one of {sorted(ENCODERS)}")
    return ENCODERS[name]


def encoder_options(name: str) -> dict[str, str]:
    """The keyword options (encoder.params) of the encoder class `name`, and their types' names."""
    parameters = inspect.signature(encoder_class(name).__init__).parameters
    return {key: str(p.annotation) for key, p in parameters.items() if key not in ("self", "path")}


def build_encoder(encoder_cls: str, path: str, **params) -> FrozenEncoder:
    return encoder_class(encoder_cls)(path, **params)


__all__ = [
    "ENCODERS",
    "EncoderNotAvailableError",
    "FrozenEncoder",
    "Dinov2withNorm",
    "SigLIP2",
    "MAE",
    "build_encoder",
    "encoder_class",
]
