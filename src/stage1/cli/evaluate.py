"""The work of vqrae-evaluate (its flags and help text: stage1/cli/arguments.py)."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..base.atomic import atomic_path, write_json
from ..base.precision import autocast
from ..base.tensor_files import read_tensor_file
from ..data.images import psnr, to_uint8
from ..data.input_pipeline import PROTOCOL_CROPS, PROTOCOLS
from ..model.quantizers import CodeLayout
from ..train.losses import build_lpips
from .arguments import launch
from .common import (
    CLIError,
    check_output,
    data_batches,
    load_model,
    model_image_size,
)


def build_fid(weights: str | None, device: torch.device):
    """torchmetrics' FID on torch-fidelity's Inception-v3, from a checked local weights file."""
    if weights is None:
        return None, ("no --fid-weights given: the Inception-v3 weights are a download; pass a local copy of "
                      "torch-fidelity's pt_inception-2015-12-05 weights to compute rFID")
    try:
        # torch-fidelity unpickles this file without restrictions: make sure it holds tensors only first.
        read_tensor_file(weights, "--fid-weights")
    except (OSError, ValueError) as err:
        raise CLIError(f"{err}; refusing to unpickle it") from None
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=weights)
    return fid.to(device), None


def usage_plot(counts: torch.Tensor, path: str, width: int = 800, height: int = 300) -> None:
    """Code frequencies sorted from most to least used (log scale), as a PNG."""
    k = counts.numel()
    ordered = counts.sort(descending=True).values.double()
    bins = min(k, width - 60)
    edges = torch.linspace(0, k, bins + 1).long()
    heights = [ordered[edges[i] : max(edges[i + 1], edges[i] + 1)].mean().item() for i in range(bins)]
    top = math.log10(max(ordered[0].item(), 1.0) + 1)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, bottom, plot_h = 50, height - 30, height - 60
    for i, value in enumerate(heights):
        h = 0 if value <= 0 else max(1, round(math.log10(value + 1) / top * plot_h))
        x = left + i * (width - 60) / bins
        draw.rectangle([x, bottom - h, x + max((width - 60) / bins - 1, 0), bottom], fill=(40, 90, 160))
    draw.line([left, bottom, width - 10, bottom], fill="black")
    draw.line([left, 30, left, bottom], fill="black")
    used = int((counts > 0).sum())
    draw.text((left, 8), f"code usage, sorted by frequency (log scale): {used} of {k} codes used", fill="black")
    draw.text((left, bottom + 8), "codes, most used first", fill="black")
    draw.text((4, 30), f"{int(ordered[0])}", fill="black")
    with atomic_path(path) as tmp:
        image.save(tmp, format="png")


class NpzWriter:
    """Originals and reconstructions as uint8 (N, H, W, 3) arrays, appended to raw files on disk as they come (50k
    images need no 20 GB of memory, and no count in advance), packed at the end into OUT/originals.npz and
    OUT/reconstructions.npz under the key arr_0, as ADM's evaluator reads them."""

    NAMES = ("originals", "reconstructions")

    def __init__(self, out: str):
        os.makedirs(out, exist_ok=True)
        self.out, self.count, self.shape = out, 0, None
        self.raw = {name: os.path.join(out, f".{name}.uint8.tmp") for name in self.NAMES}
        self.files = {name: open(path, "wb") for name, path in self.raw.items()}

    def add(self, originals: torch.Tensor, reconstructions: torch.Tensor) -> None:
        for name, images in zip(self.NAMES, (originals, reconstructions), strict=True):
            array = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
            self.shape = array.shape[1:]
            self.files[name].write(array.tobytes())
        self.count += originals.shape[0]

    def close(self) -> dict:
        written = {}
        for name in self.NAMES:
            self.files[name].close()
            array = np.memmap(self.raw[name], dtype=np.uint8, mode="r", shape=(self.count, *self.shape))
            written[name] = os.path.join(self.out, f"{name}.npz")
            with atomic_path(written[name]) as tmp, open(tmp, "wb") as f:
                np.savez(f, arr_0=array)  # streamed from the memory map
            del array
            os.remove(self.raw[name])
        return written


CODE_METRICS = ("grid_shape", "codebook_size", "codebooks", "codes_used", "codebook_usage", "perplexity",
                "bits_per_image", "entropy_bits_per_image", "latent_relative_distortion", "latent_cosine")


class Scores:
    """Running reconstruction metrics and code counts over the evaluated images."""

    def __init__(self, layout: CodeLayout, side: int, device: torch.device, lpips, fid):
        """layout: the model's codes (stage1.model.quantizers.CodeLayout), on a side x side grid."""
        from torchmetrics.image import StructuralSimilarityIndexMeasure

        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(device)
        self.lpips, self.fid = lpips, fid
        # The codebook of each of an image's flattened codes, each codebook's codes counted apart.
        self.codebook_size, self.codebook_of = layout.vocab_size, layout.codebook_of(side)
        self.codebooks = layout.num_codebooks
        self.counts = torch.zeros(self.codebooks * self.codebook_size, dtype=torch.long)
        # What results.json says of their shape.
        self.layout = {"grid_shape": [side, side], **({"scales": list(layout.scales)} if layout.scales else {})}
        self.psnrs, self.lpips_values, self.grid = [], [], None
        # The latent fit, over every token: sum ||z - z_q||^2, sum z, sum ||z||^2, sum cos(z, z_q), tokens.
        self.error = self.z_sum = self.z_square = self.cosine = self.tokens = 0.0

    def update(self, x: torch.Tensor, rec: torch.Tensor, codes: torch.Tensor | None, latents=None) -> None:
        """codes: None for a continuous model (no code metrics then); latents: (z, z_q) tokens (B, N, C)."""
        if latents is not None and codes is not None:
            z, z_q = (t.flatten(0, 1).double().cpu() for t in latents)
            self.error += (z - z_q).pow(2).sum().item()
            self.z_sum = self.z_sum + z.sum(0)
            self.z_square += z.pow(2).sum().item()
            self.cosine += torch.nn.functional.cosine_similarity(z, z_q, dim=1).sum().item()
            self.tokens += z.shape[0]
        if codes is not None:
            self.grid = self.layout
            offsets = self.codebook_of * self.codebook_size  # each codebook's codes counted apart
            per_codebook = codes.cpu().reshape(codes.shape[0], -1) + offsets
            self.counts += torch.bincount(per_codebook.flatten(), minlength=self.counts.numel())
        self.psnrs.append(psnr(rec, x).cpu())
        self.ssim.update(rec, x)
        if self.lpips is not None:
            self.lpips_values.append(self.lpips(rec * 2 - 1, x * 2 - 1).flatten().float().cpu())
        if self.fid is not None:
            self.fid.update(x, real=True)
            self.fid.update(rec, real=False)

    @property
    def num_images(self) -> int:
        return sum(len(p) for p in self.psnrs)

    def results(self, notes: dict) -> dict:
        """The metrics of results.json; notes gains the reason of any metric left null."""
        rfid = None
        if self.fid is not None:
            if self.num_images < 2:
                notes["rfid"] = "rFID needs at least 2 images"
            else:
                rfid = float(self.fid.compute())
        quality = {
            "num_images": self.num_images,
            "psnr": torch.cat(self.psnrs).mean().item(),
            "ssim": float(self.ssim.compute()),
            "lpips": torch.cat(self.lpips_values).mean().item() if self.lpips_values else None,
            "rfid": rfid,
        }
        if self.grid is None:  # a continuous model: no codes to count
            notes["codes"] = "continuous model (quantizer.kind=none): no codes, so no usage, perplexity or bits"
            return {**quality, **dict.fromkeys(CODE_METRICS)}
        counts, k = self.counts.view(self.codebooks, -1), self.codebook_size
        probs = counts.double() / counts.sum(dim=1, keepdim=True)
        entropy_bits = -(probs * probs.clamp_min(1e-300).log2()).sum(dim=1)  # per codebook
        codes_of = torch.bincount(self.codebook_of, minlength=self.codebooks).double()  # an image's codes per codebook
        # ||z - z_q||^2 against the spread of z about its mean: the share of the encoder's latent the codes miss.
        spread = self.z_square / self.tokens - (self.z_sum / self.tokens).pow(2).sum().item()
        return {
            **quality,
            **self.grid,
            "codebook_size": k,
            "codebooks": self.codebooks,
            "codes_used": int((counts > 0).sum()),
            "codebook_usage": (counts > 0).double().mean().item(),
            "perplexity": (2.0**entropy_bits).mean().item(),  # per codebook, averaged
            "bits_per_image": len(self.codebook_of) * math.log2(k),
            "entropy_bits_per_image": (codes_of * entropy_bits).sum().item(),
            "latent_relative_distortion": self.error / self.tokens / spread,
            "latent_cosine": self.cosine / self.tokens,
        }


def run(args) -> int:
    check_output(args.out, folder=True)
    model = load_model(args)
    device = next(model.decoder.parameters()).device
    size = model_image_size(model, args.image_size)
    notes = {}
    fid, notes["rfid"] = build_fid(args.fid_weights, device)
    try:
        lpips = build_lpips(args.lpips_net).to(device)
    except RuntimeError as err:
        lpips, notes["lpips"] = None, str(err)
    scores, skipped = Scores(model.layout, model.grid_side(size), device, lpips, fid), []

    def reconstruct(images: torch.Tensor):  # the model's work on a batch (input_pipeline's step)
        with torch.no_grad(), autocast(device, args.precision):
            return model.reconstruct(images, output_size=(size, size), return_latents=True)

    with torch.no_grad():
        count, stream = data_batches(args, size, device, args.limit, crop=PROTOCOL_CROPS[args.protocol],
                                     step=reconstruct)
        arrays = NpzWriter(args.out) if args.save_npz else None
        bar = tqdm(total=count, desc="evaluate", unit="image")
        for batch in stream:
            bar.update(len(batch.names) + len(batch.skipped))
            skipped += batch.skipped
            if batch.images is None:
                continue
            rec, codes, latents = batch.output
            scores.update(batch.images, rec.float(), codes, latents)
            if arrays is not None:
                arrays.add(batch.images, rec.float())
        bar.close()
    if not scores.num_images:
        raise CLIError(f"none of the {len(skipped)} image(s) of {args.data} could be read")
    results = {"model": str(args.model), "data": str(args.data), "skipped_images": skipped, "image_size": size,
               "protocol": PROTOCOLS[args.protocol], **scores.results(notes)}
    if arrays is not None:
        results["npz"] = arrays.close()
    results["notes"] = {key: value for key, value in notes.items() if value}
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "results.json"), results)
    if scores.grid is not None:
        usage_plot(scores.counts, os.path.join(args.out, "code_usage.png"))
    for key in ("psnr", "ssim", "lpips", "rfid", "codebook_usage", "perplexity", "bits_per_image",
                "latent_relative_distortion", "latent_cosine"):
        value, note = results[key], results["notes"].get(key) or results["notes"].get("codes", "see results.json")
        print(f"{key:16s} {f'n/a: {note}' if value is None else f'{value:.4f}'}")  # why, and how to get it
    plot = " and code_usage.png" if scores.grid is not None else ""
    print(f"wrote {os.path.join(args.out, 'results.json')}{plot} ({scores.num_images} images)")
    return 0


def main(argv=None) -> int:
    return launch("evaluate", argv)


if __name__ == "__main__":
    raise SystemExit(main())
