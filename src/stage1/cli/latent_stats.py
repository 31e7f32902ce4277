"""The work of vqrae-latent-stats (its flags and help text: stage1/cli/arguments.py)."""

from __future__ import annotations

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..base.atomic import atomic_path
from ..base.precision import autocast
from ..model.encoders import build_encoder
from ..model.vqrae import COMPILE_OPTIONS, VQRAE
from .arguments import launch
from .common import (
    CLIError,
    check_output,
    data_batches,
    resolve_device,
)

DEFAULT_SIZE = 224  # --encoder without --image-size: RAE's encoders' size


class RunningMoments:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch (Chan et al. 1979)."""

    def __init__(self, channels: int):
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.m2 = torch.zeros(channels, dtype=torch.float64)

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.double()
        n = rows.shape[0]
        if n == 0:
            return
        mean = rows.mean(0)
        m2 = (rows - mean).pow(2).sum(0)
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2 + delta.pow(2) * (self.count * n / total)
        self.count = total

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / max(self.count, 1)



def run(args) -> int:
    check_output(args.out, folder=False)
    if not args.out.endswith((".safetensors", ".pt")):
        raise CLIError(f"--out must end in .safetensors or .pt (RAE's stat.pt format), got {args.out}")
    device = resolve_device(args.device)
    if args.model is not None:  # its encoder, at the size it feeds it
        model = VQRAE.from_pretrained(args.model)
        encoder, name, encoder_cls = model.encoder, model.config.encoder.path, model.config.encoder.cls
        size = args.image_size or model.config.encoder.input_size or DEFAULT_SIZE
    else:
        encoder, name, encoder_cls = build_encoder(args.encoder_cls, args.encoder), args.encoder, args.encoder_cls
        size = args.image_size or DEFAULT_SIZE
    encoder = encoder.to(device)
    if args.compile:
        encoder.model.compile(**COMPILE_OPTIONS)
    encoder.check_fits("--image-size", size)
    side, channels = size // encoder.patch_size, encoder.hidden_size
    # Per position: each image's (N, C) tokens are one sample of N * C values; per channel: each token is one.
    moments = RunningMoments(side * side * channels if args.per_position else channels)
    skipped = 0

    def tokens_of(images: torch.Tensor) -> torch.Tensor:  # the encoder's work on a batch (input_pipeline's step)
        with torch.no_grad(), autocast(device, args.precision):
            return encoder(images).float().cpu()

    count, stream = data_batches(args, size, device, args.limit, step=tokens_of)
    bar = tqdm(total=count, desc="latent stats", unit="image")
    images = 0
    for batch in stream:
        bar.update(len(batch.names) + len(batch.skipped))
        images += len(batch.names) + len(batch.skipped)
        for entry in batch.skipped:
            print(f"skipping: {entry['reason']}")
        skipped += len(batch.skipped)
        if batch.images is not None:
            tokens = batch.output
            moments.update(tokens.flatten(1) if args.per_position else tokens.flatten(0, 1))
    bar.close()
    if moments.count == 0:
        raise CLIError(f"none of the {images} image(s) of {args.data} could be read")
    shape = (channels, side, side) if args.per_position else (channels,)
    # (N * C) in token order -> [C, h, w]; per channel it is [C] already.
    mean, var = (m.float().view(-1, channels).T.reshape(shape).contiguous() for m in (moments.mean, moments.var))
    with atomic_path(args.out) as tmp:
        if args.out.endswith(".pt"):
            torch.save({"mean": mean, "var": var}, tmp)
        else:
            save_file({"mean": mean, "var": var, "count": torch.tensor([moments.count])}, tmp,
                      metadata={"encoder": str(name), "encoder_cls": encoder_cls,
                                "image_size": str(size), "images": str(images - skipped)})
    what = "samples of every token position" if args.per_position else "tokens"
    print(f"wrote {args.out}: mean/var of shape {list(shape)} over {moments.count} {what} "
          f"from {images - skipped} image(s)" + (f" ({skipped} unreadable, skipped)" if skipped else ""))
    return 0


def main(argv=None) -> int:
    return launch("latent_stats", argv)


if __name__ == "__main__":
    raise SystemExit(main())
