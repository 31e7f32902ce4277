"""Image files <-> float tensors in [0, 1]: any PIL mode in (grey, palette, RGBA, 16-bit, CMYK, ...),
RGB out; PNG out through a crash-safe write."""

from __future__ import annotations

import io
import os
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2
from torchvision.utils import save_image

from ..base.atomic import atomic_path

# Full-scale value of high-bit-depth integer modes.
_HIGH_BIT_MODES = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0}
_ORIENTATION = 0x0112  # the EXIF tag
_TURNS = range(2, 9)  # the orientations that move pixels (1 is upright), as ImageOps.exif_transpose reads them
_JPEG_EXTRAS = 1 << 24  # bytes a JPEG may hold beside its scans (EXIF, thumbnails, ICC profile) at the most
# Pixels an image may have once its shorter side is resized (256 MB as 8-bit RGB): a 1 x 100000 image is small, but
# at 256 px on its shorter side it would be 25.6 billion.
MAX_RESIZED_PIXELS = 1 << 26


def _tensor_jpeg_decoder():
    """TorchCodec's decode_jpeg, torchvision's decoders' successor; None where it does not load (it needs torch >=
    2.11), and then Pillow decodes JPEGs as every other image."""
    try:
        from torchcodec.decoders import decode_jpeg
    except (ImportError, OSError, RuntimeError):  # not installed, or its compiled library does not fit this torch
        return None
    return decode_jpeg


decode_jpeg = _tensor_jpeg_decoder()


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded: missing, truncated, not an image, or a decompression bomb."""


def load_image(path: str) -> tuple[torch.Tensor, str]:
    """(3, H, W) float tensor in [0, 1] and a short description of the conversion it took. Any file that cannot
    be decoded raises UnreadableImageError (one type for callers that skip such files)."""
    pixels, note = read_image(path)
    return to_unit_float(pixels), note


def read_image(path: str) -> tuple[torch.Tensor, str]:
    """load_image's pixels as decoded: uint8 for an 8-bit image (most are), float in [0, 1] for a deeper one."""
    try:
        return _decode(path)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001  Pillow's plugins raise anything on a damaged file (NotImplementedError,
        # AttributeError, struct.error, BLPFormatError, ...): every decoder error is an unreadable image, listed
        raise UnreadableImageError(f"{type(err).__name__}: {str(err)[:300]}") from err


def to_unit_float(pixels: torch.Tensor) -> torch.Tensor:
    return v2.functional.to_dtype(pixels, torch.float32, scale=True) if pixels.dtype == torch.uint8 else pixels


def _decode(source) -> tuple[torch.Tensor, str]:
    with _opened(source) as file, Image.open(file) as image:  # the header: format, mode, size, EXIF; bomb-checked
        # A file far larger than its pixels (junk after the image) goes to Pillow, which reads only what it decodes.
        if decode_jpeg is not None and image.format == "JPEG" and image.mode in ("RGB", "L") and (
                _length(file) <= 3 * image.width * image.height + _JPEG_EXTRAS):
            # Most images: libjpeg-turbo through TorchCodec (torchvision's decoders' successor), the same pixels as
            # Pillow's decode (tested) without its three copies (PIL image, numpy array, tensor). 1.3x faster here.
            orientation = image.getexif().get(_ORIENTATION, 1)
            file.seek(0)
            data = bytearray(file.read())  # writable: torch wraps it without a copy
            try:  # upright: TorchCodec applies the EXIF orientation itself (tested against exif_transpose)
                pixels = decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode="RGB")
            except RuntimeError as err:  # "<function>, <its source file>:<line>, <what is wrong>."
                raise OSError(str(err).rsplit(", ", 1)[-1].rstrip(".")) from err
            note = f"{image.mode} {pixels.shape[2]}x{pixels.shape[1]}" + ("" if image.mode == "RGB" else " -> RGB")
            return pixels, note + _turned(orientation)
        image.load()
        # A camera's EXIF orientation: the pixels as the photo is meant to be seen, as every viewer shows them.
        orientation = image.getexif().get(_ORIENTATION, 1)
        if orientation in _TURNS:
            ImageOps.exif_transpose(image, in_place=True)
        mode, size, turned = image.mode, image.size, _turned(orientation)
        if mode in _HIGH_BIT_MODES or mode == "F":
            # 16/32-bit grey: scale by the format's full range (PIL's RGB conversion would clip it to 8 bits).
            array = np.asarray(image, dtype=np.float64)
            if not np.isfinite(array).all():  # a float image (mode F) may hold NaN / Inf: no pixels to scale
                raise ValueError(f"{mode} image with NaN or Inf pixels")
            scale = _HIGH_BIT_MODES.get(mode, 1.0)
            if mode == "I" and array.max() <= 255:
                scale = 255.0
            grey = torch.from_numpy(np.clip(array / scale, 0.0, 1.0)).float()
            note = f"{mode} {size[0]}x{size[1]} -> RGB (grey, {int(scale) + 1} levels)"
            return grey.expand(3, -1, -1).clone(), note + turned
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
            # Composite on white: transparent pixels have no colour of their own.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(background, rgba).convert("RGB")
            note = f"{mode} {size[0]}x{size[1]} -> RGB (alpha composited on white)"
        else:
            rgb = image if mode == "RGB" else image.convert("RGB")
            note = f"{mode} {size[0]}x{size[1]}" + ("" if mode == "RGB" else " -> RGB")
        return v2.functional.pil_to_tensor(rgb), note + turned


def _opened(source):
    """A path opened for reading, or a binary file object as it is."""
    return open(source, "rb") if isinstance(source, (str, os.PathLike)) else nullcontext(source)


def _length(file) -> int:
    position = file.tell()
    end = file.seek(0, io.SEEK_END)
    file.seek(position)
    return end


def _turned(orientation) -> str:
    return f", turned upright (EXIF orientation {orientation})" if orientation in _TURNS else ""


def resize_center_crop(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to `size` (antialiased bicubic), then the central size x size square, in the pixels' dtype
    (uint8, or floats in [0, 1]). 8-bit pixels are resized as uint8, by torchvision's fixed-point kernel: 8x faster
    than in float; against the float resize, 0.26 / 255 off on average and 11 / 255 at the worst pixel (a bicubic
    overshoot clipped between the kernel's two passes), PSNR >= 54.7 dB, measured on photos at 32 to 384 px
    (tests/test_cli.py checks it)."""
    square = v2.functional.center_crop(resize_shorter_side(pixels, size), [size, size])
    return square if square.dtype == torch.uint8 else square.clamp(0.0, 1.0)


def resize_shorter_side(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to `size`, antialiased bicubic, in the pixels' dtype (RAE's resize); an image that would
    exceed MAX_RESIZED_PIXELS is unreadable."""
    check_resized(pixels.shape[-1], pixels.shape[-2], size)
    return v2.functional.resize(pixels, size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)


def check_resized(width: int, height: int, size: int) -> None:
    """UnreadableImageError if a width x height image, its shorter side resized to `size`, is over
    MAX_RESIZED_PIXELS."""
    short, long = sorted((max(1, width), max(1, height)))
    if size * -(-long * size // short) > MAX_RESIZED_PIXELS:
        raise UnreadableImageError(f"a {width}x{height} image is too elongated: resized to {size} px on its shorter "
                                   f"side it would have more than {MAX_RESIZED_PIXELS:,} pixels")


def adm_center_crop(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """The crop behind published tokenizer rFIDs: ADM's center_crop_arr (guided-diffusion, image_datasets.py) on the
    8-bit image. Halve it with a box filter while its shorter side is at least twice `size`, resize it (PIL
    bicubic) so the shorter side is `size` and the other is rounded, then cut the central square (offsets rounded
    down). Returns uint8 pixels."""
    check_resized(pixels.shape[-1], pixels.shape[-2], size)
    eight_bit = pixels if pixels.dtype == torch.uint8 else to_uint8(pixels)
    image = Image.fromarray(eight_bit.permute(1, 2, 0).contiguous().numpy())
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.Resampling.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return torch.from_numpy(array[top : top + size, left : left + size].copy()).permute(2, 0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1] (peak 1)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """The 8-bit pixels a PNG of `images` holds (same rounding as torchvision's save_image)."""
    return images.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def save_png(images: torch.Tensor, path: str, **grid_kwargs) -> None:
    """One image (3, H, W) or a grid of a batch, written atomically as PNG."""
    with atomic_path(path) as tmp:
        save_image(images.detach().float().cpu(), tmp, format="png", **grid_kwargs)
