"""End-to-end vqrae-tokenize throughput against the limit of its pipeline, measured side by side in one run.

    python benchmarks/pipeline.py [--model quickstart|dinov2_b] [--images 960] [--device cpu|cuda] [--repeats 3]
                                  [--quick]

A folder of JPEGs is made from the bundled photos (ImageNet-sized: 500 x 375, random crops, quality 90). Stages:
  decode     read + decode + resize + crop of one image on one core (`input_pipeline.prepare_image`)
  workers    the same by the commands' --num-workers readers, no model (processes beside a GPU, threads on the CPU)
  model      encode_to_indices on images already decoded in memory; on the CPU also with one thread, which is the
             model's CPU work per image
  tokenize   vqrae-tokenize itself, from the slope between two folder sizes (model loading and worker start-up
             cancel out)
Each rate is the best of --repeats runs, alike for every stage and for tokenize. The limit: on a CPU-only machine
decoding and the model share the cores, so it is the cores over the total CPU work per image (decode + one-thread
model); beside a GPU it is the slower of the workers' decoding and the model. Targets: tokenize >= 0.8 of the limit
on the CPU, >= 0.9 on a GPU. `--model dinov2_b` is DINOv2-B with registers built from its config (random weights:
speed does not depend on them) with a 16k-code codebook and the ViT-B decoder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
from common import machine, print_table, sync
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_jpegs(folder: str, count: int, seed: int = 0) -> None:
    photos = [Image.open(os.path.join(REPO, "assets", n)).convert("RGB")
              for n in sorted(os.listdir(os.path.join(REPO, "assets"))) if n.endswith(".jpg")]
    g = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        photo = photos[i % len(photos)].resize((750, 562), Image.Resampling.BICUBIC)
        left, top = (int(torch.randint(0, 250, (1,), generator=g)), int(torch.randint(0, 187, (1,), generator=g)))
        tile = photo.crop((left, top, left + 500, top + 375))
        if i % 2:
            tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        tile.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def build_model(kind: str, root: str):
    """A saved model to tokenize with: the quickstart's (tiny DINOv2, 128 px) or DINOv2-B at 224 px."""
    from stage1 import VQRAE

    if kind == "quickstart":
        from stage1.model.tiny import write_stand_in_encoder
        from stage1.train.config import load_run_config

        cfg = load_run_config(["experiment=quickstart", f"results_dir={root}"])
        write_stand_in_encoder(cfg.init.tiny_encoder, cfg.model.encoder.path, image_size=cfg.image_size)
        model = VQRAE(cfg.model)
    else:
        from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

        encoder = os.path.join(root, "dinov2_b")
        Dinov2WithRegistersModel(Dinov2WithRegistersConfig(image_size=518, patch_size=14)).save_pretrained(encoder)
        model = VQRAE(encoder_cls="Dinov2withNorm", encoder_config_path=encoder, encoder_input_size=224,
                      num_embeddings=16384, decoder_config_path="vit_b")
    path = os.path.join(root, "model")
    model.save_pretrained(path)
    return path, model.image_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="quickstart", choices=("quickstart", "dinov2_b"))
    parser.add_argument("--images", type=int, default=960)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="each rate is the best of this many runs")
    parser.add_argument("--quick", action="store_true", help="a few images, for a smoke run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vqrae-pipeline-") as root:  # thousands of JPEGs: never left behind
        run(args, root)


def run(args, root: str) -> None:
    count = 24 if args.quick else args.images
    from stage1 import VQRAE
    from stage1.cli.arguments import launch
    from stage1.data.datasets import find_images
    from stage1.data.input_pipeline import default_workers, image_batches, prepare_image

    data, small = os.path.join(root, "images"), os.path.join(root, "images_quarter")
    make_jpegs(data, count)
    make_jpegs(small, count // 4)
    model_dir, size = build_model(args.model, root)
    device = torch.device(args.device)
    workers = default_workers(device) if args.num_workers == "auto" else int(args.num_workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    names = find_images(data)
    readers = f"{workers} {'thread' if device.type == 'cpu' else 'process'}(s)"
    print(f"machine: {machine()}; device {device}; {count} JPEGs 500x375 -> {size}x{size}; model {args.model}; "
          f"{readers} reading" + (", each also running the model" if device.type == "cpu" else ""))

    def fastest(measure) -> float:  # the least seconds of --repeats runs: what the machine can do, less its noise
        return min(measure() for _ in range(args.repeats))

    def seconds(work) -> float:
        start = time.perf_counter()
        work()
        return time.perf_counter() - start

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a reader runs
    prepare_image(os.path.join(data, names[0]), size)  # lazy imports and first-call set-up left out
    decoded = torch.stack([prepare_image(os.path.join(data, n), size)[0] for n in names])
    decode = count / fastest(lambda: seconds(lambda: [prepare_image(os.path.join(data, n), size) for n in names]))
    torch.set_num_threads(threads)

    chunks = [names[i : i + args.batch_size] for i in range(0, count, args.batch_size)]
    worker_rate = count / fastest(lambda: seconds(lambda: list(image_batches(data, chunks, size, workers, device))))

    model = VQRAE.from_pretrained(model_dir).to(device).eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def model_seconds() -> float:
        with torch.no_grad(), autocast:
            model.encode_to_indices(decoded[: args.batch_size].to(device))  # warm-up
            sync(device)
            start = time.perf_counter()
            for chunk in decoded.split(args.batch_size):
                model.encode_to_indices(chunk.to(device, non_blocking=True)).cpu()
            sync(device)
        return time.perf_counter() - start

    model_all = count / fastest(model_seconds)
    rows = [["decode + resize, 1 core", f"{decode:.1f} img/s"],
            [f"decode + resize, {readers}", f"{worker_rate:.1f} img/s"],
            [f"model only ({torch.get_num_threads()} threads)", f"{model_all:.1f} img/s"]]
    if device.type == "cpu":
        torch.set_num_threads(1)
        model_one = count / fastest(model_seconds)
        torch.set_num_threads(threads)
        rows.append(["model only (1 thread)", f"{model_one:.1f} img/s"])
        limit = cores / (1 / decode + 1 / model_one)
        how, target = f"{cores} cores / (decode + 1-thread model CPU time per image)", 0.8
    else:
        limit, how, target = min(worker_rate, model_all), "the slower of workers and model", 0.9

    def tokenize_seconds(folder: str) -> float:
        out = tempfile.mkdtemp(dir=root)
        argv = ["--model", model_dir, "--data", folder, "--out", out, "--batch-size", str(args.batch_size),
                "--device", args.device, "--num-workers", str(workers)]
        return seconds(lambda: launch("tokenize", argv))

    tokenize_seconds(small)  # imports, caches and allocator warmed up
    whole, quarter = fastest(lambda: tokenize_seconds(data)), fastest(lambda: tokenize_seconds(small))
    if whole <= quarter:  # the slope is lost in the noise (the quick run's few images): no rate to report
        rows += [["limit", f"{limit:.1f} img/s ({how})"],
                 ["vqrae-tokenize, end to end", f"n/a: {count} images took no longer than {count // 4} "
                                                f"({whole:.2f} s vs {quarter:.2f} s); use more --images"]]
        print_table("tokenize pipeline", ["stage", "throughput"], rows)
        return
    end_to_end = (count - count // 4) / (whole - quarter)
    ratio = end_to_end / limit
    rows += [["limit", f"{limit:.1f} img/s ({how})"],
             ["vqrae-tokenize, end to end", f"{end_to_end:.1f} img/s; {whole:.1f} s for {count} images"],
             ["ratio to the limit", f"{ratio:.2f} (target >= {target}: " + ("n/a, --quick: start-up dominates)"
                                                                        if args.quick else
                                                                        f"{'yes' if ratio >= target else 'NO'})")]]
    print_table("tokenize pipeline", ["stage", "throughput"], rows)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
