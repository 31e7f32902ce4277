"""Every command's flags and help text, and the launch of a command: its arguments are parsed here, before its
work module (and torch, transformers and timm behind it) is imported, so `--help` and a usage error answer at once.
The work of `vqrae-NAME` is `stage1.cli.NAME.run(args)`."""

from __future__ import annotations

import argparse
import importlib
import sys
from functools import partial

from ..base.codebook_start import CodebookFitConfig
from ..base.limits import MAX_IMAGE_SIDE

INDEX_DTYPES = ("uint8", "uint16", "uint32", "int32", "int64")  # what vqrae-tokenize's shards may be stored as


class CLIError(Exception):
    """Bad input to a command: printed as one line, exit code 2."""


def command_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A command's parser, its help text with the examples kept as written."""
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def positive_int(value: str) -> int:
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")


def image_side(value: str) -> int:
    """--image-size: a side images are resized to (base.limits.MAX_IMAGE_SIDE at most)."""
    side = positive_int(value)
    if side > MAX_IMAGE_SIDE:
        raise argparse.ArgumentTypeError(f"expected a side from 1 to {MAX_IMAGE_SIDE} pixels, got {value!r}")
    return side


def non_negative_int(value: str) -> int:
    if value.isdigit():
        return int(value)
    raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")


MAX_CROP_RANGE = 4.0  # LlamaGen uses 1.1; past a few times the size every image would read as "too elongated"


def crop_range(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if 1 <= number <= MAX_CROP_RANGE:
        return number
    raise argparse.ArgumentTypeError(f"expected a number from 1 to {MAX_CROP_RANGE:g}, got {value!r}")


def add_runtime_args(parser: argparse.ArgumentParser, batch_size: int = 16) -> None:
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="default: cuda if present")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="auto: bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the encoder and decoder forward (pays off on a GPU over many batches)")


def worker_count(value: str) -> str | int:
    if value == "auto" or (value.isdigit() and int(value) >= 0):
        return value if value == "auto" else int(value)
    raise argparse.ArgumentTypeError(f"expected 'auto' or a number of workers >= 0, got {value!r}")


def add_input_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="folder of images (searched recursively), or webdataset tar "
                                                      "shards: 'shards/{000000..000099}.tar', a :: list, a URL")
    parser.add_argument("--num-workers", default="auto", type=worker_count,
                        help="workers that read, decode and resize images: beside a GPU, processes (auto: the cores "
                             "per process less one, at most 8); on the CPU, threads that each run the model on what "
                             "they read, one core each (auto: one per core); 0: this process, one batch at a time")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a directory written by save_pretrained / training, or a Hub id")
    parser.add_argument("--encoder-path", default=None,
                        help="local directory of the frozen encoder, if the one the model references is not reachable")
    parser.add_argument("--image-size", type=image_side, default=None,
                        help="side the images are resized and center-cropped to (default: the model's own size)")


RECONSTRUCT_HELP = """\
vqrae-reconstruct: images -> codes -> images, written original | reconstruction side by side, with PSNR.

    vqrae-reconstruct --model results/quickstart/final --image assets/chelsea.jpg --image assets/coffee.jpg \\
        --out reconstructions.png
"""


def reconstruct_parser() -> argparse.ArgumentParser:
    parser = command_parser("vqrae-reconstruct", RECONSTRUCT_HELP)
    add_model_args(parser)
    parser.add_argument("--image", action="append", required=True, help="an image file (repeat for several)")
    parser.add_argument("--out", required=True, help="PNG to write: one row per image, original | reconstruction")
    add_runtime_args(parser, batch_size=8)
    return parser


TOKENIZE_HELP = """\
vqrae-tokenize: every image under a folder -> its grid of code indices, in shards.

    vqrae-tokenize --model results/quickstart/final --data assets --out tokens/
    torchrun --standalone --nproc_per_node=8 -m stage1.cli.tokenize --model ... --data ... --out ...

SHARD_DIR/shard-00000.npy holds the codes of up to --shard-size images, shape (n, h, w) ((n, h, w, L) for
residual / grouped quantizers: L codes per token), in the smallest unsigned integer type that holds the codebook
size; shard-00000.json lists its images. manifest.json
gathers model, codebook size, grid shape, image size and, for every image, its relative path, shard and
row. Run it again after an interruption: finished shards are kept and only the rest is computed, giving
the same bytes as an uninterrupted run. Finished shards are reused only by the same tokenization: the same image
listing, options and model (a fingerprint of everything the codes depend on: the encoder's and the codebook's
weights, the latent statistics, their configs); anything else is refused, or started afresh with --restart.
Shards are dealt to torchrun ranks round-robin. --format llamagen | jsonl | maskgit | wds | memmap also writes the
codes in that layout (with ImageFolder class ids; maskgit: Halton-MaskGIT's --split train | eval folder; wds: each
input sample with its codes beside it, vq_feat.npy), --augment flip | ten-crop codes several views of each image
(README: Token exports).
"""


def tokenize_parser() -> argparse.ArgumentParser:
    parser = command_parser("vqrae-tokenize", TOKENIZE_HELP)
    add_model_args(parser)
    add_input_args(parser)
    parser.add_argument("--out", required=True, help="folder for the shards and manifest.json")
    parser.add_argument("--shard-size", type=positive_int, default=4096, help="images per shard")
    parser.add_argument("--index-dtype", default="auto", choices=("auto", *INDEX_DTYPES),
                        help="integer type of the shards (auto: the smallest unsigned type that fits)")
    parser.add_argument("--restart", action="store_true",
                        help="discard the shards and exports of another tokenization found in --out (not a "
                             "--maskgit-root outside it) and start afresh")
    parser.add_argument("--format", default="shards",
                        choices=("shards", "llamagen", "jsonl", "maskgit", "wds", "memmap"),
                        help="also export the codes in this layout (stage1/data/token_exports.py); shards are always "
                             "written, they make resuming possible")
    parser.add_argument("--split", default="train", choices=("train", "eval"),
                        help="with --format maskgit: Halton-MaskGIT's Train/ or Eval/ folder")
    parser.add_argument("--maskgit-root", default=None,
                        help="with --format maskgit: the folder of Train/ and Eval/ (its --data-folder), which the "
                             "two splits' runs may share (default: OUT/maskgit)")
    parser.add_argument("--augment", default="none", choices=("none", "flip", "ten-crop"),
                        help="codes of several views of each image, as LlamaGen extracts them: the image and its "
                             "mirror, or the ten crops of a center crop --crop-range times the size")
    parser.add_argument("--crop-range", type=crop_range, default=1.1,
                        help="with --augment ten-crop (LlamaGen's 1.1): the crops are cut from a center crop that "
                             "much larger")
    parser.add_argument("--protocol", default="vqrae", choices=("vqrae", "adm"),
                        help="vqrae: the commands' resize and center crop; adm: ADM's center_crop_arr, as LlamaGen's "
                             "extract_codes_c2i.py crops (its codes exactly)")
    add_runtime_args(parser, batch_size=32)
    return parser


DECODE_HELP = """\
vqrae-decode: shards of code indices (from vqrae-tokenize) -> images.

    vqrae-decode --model results/quickstart/final --tokens tokens/ --out decoded/

Each image is written as OUT/<its relative path>.png (the first view of an augmented tokenization). The model
must match the shards (codebook size and grid shape): that is checked against manifest.json before any work.
"""


def decode_parser() -> argparse.ArgumentParser:
    parser = command_parser("vqrae-decode", DECODE_HELP)
    parser.add_argument("--model", required=True, help="the model the shards were made with (directory or Hub id)")
    parser.add_argument("--encoder-path", default=None, help="local directory of the frozen encoder, if needed")
    parser.add_argument("--tokens", required=True, help="folder written by vqrae-tokenize")
    parser.add_argument("--out", required=True, help="folder for the decoded PNGs")
    add_runtime_args(parser, batch_size=32)
    return parser


EVALUATE_HELP = """\
vqrae-evaluate: reconstruction quality and codebook use of a model on an image folder.

    vqrae-evaluate --model results/quickstart/final --data assets --out eval/ [--limit 50000]
        [--fid-weights pt_inception-2015-12-05.pth]

Images go through the tokenizer (codes -> pixels; a continuous model, quantizer.kind=none, such as a released
RAE decoder loaded with VQRAE.from_rae, straight through its latent, with the code metrics null). Writes
OUT/results.json with PSNR, SSIM (torchmetrics), LPIPS (lpips), rFID (torchmetrics / torch-fidelity), codebook
usage (codes used / K over the whole set), perplexity, bits per image, and OUT/code_usage.png (code frequencies,
sorted). A metric whose weights are not available (LPIPS's backbone, FID's Inception: both are downloads) is null
with the reason in `notes`, and the other metrics still run. FID's Inception weights can be given as a local file
with --fid-weights.

The protocol of published tokenizer rFIDs: --protocol adm crops every image as ADM's center_crop_arr does (box
halvings, bicubic, central square; results.json says so), on the 50k ImageNet validation images (a flat folder or
one folder per class: both are read) at 256 px; --save-npz writes the originals and reconstructions as uint8
arrays (OUT/originals.npz, OUT/reconstructions.npz, key arr_0, (N, H, W, 3)), the batches ADM's evaluator and other
FID suites read.
"""


def evaluate_parser() -> argparse.ArgumentParser:
    parser = command_parser("vqrae-evaluate", EVALUATE_HELP)
    add_model_args(parser)
    add_input_args(parser)
    parser.add_argument("--out", default="vqrae-eval", help="folder for results.json and code_usage.png")
    parser.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N images (sorted by path)")
    parser.add_argument("--lpips-net", default="vgg", choices=("vgg", "alex"))
    parser.add_argument("--fid-weights", default=None, help="local file of torch-fidelity's Inception-v3 weights")
    parser.add_argument("--protocol", default="vqrae", choices=("vqrae", "adm"),
                        help="vqrae: the commands' resize and center crop; adm: ADM's center_crop_arr")
    parser.add_argument("--save-npz", action="store_true",
                        help="also write originals.npz and reconstructions.npz (uint8, key arr_0) for external FID")
    add_runtime_args(parser, batch_size=32)
    return parser


LATENT_STATS_HELP = """\
vqrae-latent-stats: mean and variance of a frozen encoder's latents over an image folder, per channel or (as RAE
computes them) per channel and position.

    vqrae-latent-stats --encoder facebook/dinov2-with-registers-base --data /data/train \\
        --out stats.safetensors [--per-position] [--image-size 224] [--limit 10000]
    vqrae-latent-stats --model results/run/final --data /data/train --out stats.safetensors --per-position
        (the model's encoder, at the model's encoder.input_size: per-position statistics that fit it)

Streaming and numerically stable (per-batch moments merged with Chan et al.'s parallel update, in float64).
The output is what VQRAE(normalization_stat_path=...) reads, in the format its name gives: `.safetensors` (`mean`,
`var`, `count`) or `.pt`, RAE's `stat.pt` (`mean`, `var`: a dict of tensors, as RAE's calculate_stat.py saves it).
Shapes: [C], or [C, h, w] with --per-position.
"""


def latent_stats_parser() -> argparse.ArgumentParser:
    parser = command_parser("vqrae-latent-stats", LATENT_STATS_HELP)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--encoder", help="encoder Hub id or local directory")
    source.add_argument("--model", help="a vqrae model (folder or Hub id): its encoder, at its encoder.input_size")
    parser.add_argument("--encoder-cls", default="Dinov2withNorm",
                        help="a name of stage1.ENCODERS: Dinov2withNorm, SigLIP2, SigLIP, MAE")
    add_input_args(parser)
    parser.add_argument("--out", required=True, help="file to write: .safetensors, or .pt (RAE's stat.pt format)")
    parser.add_argument("--per-position", action="store_true",
                        help="statistics per channel and token position, [C, h, w], as RAE's stat.pt files hold")
    parser.add_argument("--image-size", type=image_side, default=None,
                        help="side the encoder sees (resize + center crop); default: --model's encoder.input_size, "
                             "else 224")
    parser.add_argument("--limit", type=positive_int, default=None, help="use the first N images (sorted by path)")
    add_runtime_args(parser, batch_size=32)
    return parser


FIT_CODEBOOK_HELP = """\
vqrae-fit-codebook: fit a model's codebook to the latents of an image folder (k-means), and save the model.

    vqrae-fit-codebook --model results/run/final --data /data/train --out fitted/ [--images N]
        [--tokens-per-image N] [--iters N]
    torchrun --standalone --nproc_per_node=8 -m stage1.cli.fit_codebook --model ... --data ... --out ...

Images are sampled from the folder (a seeded draw of --images), resized and center-cropped to the model's size,
split over ranks; --tokens-per-image random latent tokens of each go into an exact k-means (all ranks together,
stage1/model/kmeans.py). OUT loads with VQRAE.from_pretrained: the same model with the fitted codebook and its EMA
state (cluster sizes in hits per --batch-size images on every rank), to use as it is or to train on.
OUT/codebook_fit.json records the fit.
"""


def fit_codebook_parser() -> argparse.ArgumentParser:
    parser = command_parser("vqrae-fit-codebook", FIT_CODEBOOK_HELP)
    add_model_args(parser)
    add_input_args(parser)
    parser.add_argument("--out", required=True, help="folder for the model with the fitted codebook")
    fit = CodebookFitConfig()  # training's codebook_fit defaults: one source
    parser.add_argument("--images", type=positive_int, default=fit.images,
                        help="images to sample (all, if the folder has fewer; default %(default)s)")
    parser.add_argument("--tokens-per-image", type=positive_int, default=fit.tokens_per_image,
                        help="random latent tokens kept per image (default %(default)s)")
    parser.add_argument("--iters", type=non_negative_int, default=fit.iters,
                        help="Lloyd iterations (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    add_runtime_args(parser, batch_size=32)
    return parser


PUSH_HELP = """\
vqrae-push: publish a model on the Hugging Face Hub, with a generated model card.

    vqrae-push --model results/run/final --repo user/vqrae-dinov2-b-16k --results eval/results.json \\
        --samples results/run/reconstructions.png [--private]
    vqrae-push --model results/run/final --repo user/name --stage staged/     (write the upload here, send nothing)

Uploads config.json, model.safetensors, the frozen encoder when the model references a local folder (nobody else
could reach it; a Hub encoder stays a reference), README.md (the card: encoder, codebook, decoder, the training run's
steps when the model came from one, the evaluation of --results, the --samples grid) and samples.png. Log in
first (`hf auth login`) or set HF_TOKEN. VQRAE.from_pretrained("user/name") loads it back.
"""


def push_parser() -> argparse.ArgumentParser:
    parser = command_parser("vqrae-push", PUSH_HELP)
    parser.add_argument("--model", required=True, help="a directory written by save_pretrained / training")
    parser.add_argument("--repo", required=True, help="the Hub model repo, user/name or org/name (made if new)")
    parser.add_argument("--encoder-path", default=None, help="local directory of the frozen encoder, if needed")
    parser.add_argument("--results", default=None, help="vqrae-evaluate's results.json, for the card")
    parser.add_argument("--samples", default=None, help="an image for the card, e.g. training's reconstructions.png")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--stage", default=None, help="write what would be uploaded to this folder, upload nothing")
    parser.add_argument("--license", default=None,
                        help="the card's license (default: the frozen encoder's, e.g. cc-by-nc-4.0 for MAE)")
    parser.add_argument("--base-model", default=None,
                        help="the encoder's Hub id for the card (default: encoder_config_path when it is one)")
    parser.add_argument("--datasets", nargs="+", default=None, metavar="ID",
                        help="Hub ids of the training data, e.g. ILSVRC/imagenet-1k")
    parser.add_argument("--eval-dataset", default=None, metavar="ID",
                        help="Hub id of the evaluated set, for the card's model-index (default: the first --datasets)")
    return parser


MAKE_SHARDS_HELP = """\
vqrae-make-shards: an image folder -> webdataset tar shards, which every folder command (--data) reads too.

    vqrae-make-shards --data assets --out shards/ --shard-size 1000
    vqrae-tokenize --model results/quickstart/final --data "shards/{000000..000000}.tar" --out tokens/

Each sample keeps its image's encoded bytes (field: its extension), its path in the folder (path.txt) and its
ImageFolder class id (cls); shards hold --shard-size samples in sorted path order, OUT/000000.tar, ...
"""


def make_shards_parser() -> argparse.ArgumentParser:
    parser = command_parser("vqrae-make-shards", MAKE_SHARDS_HELP)
    parser.add_argument("--data", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--out", required=True, help="folder for the tar shards")
    parser.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard")
    return parser


COMMANDS = {"reconstruct": reconstruct_parser, "tokenize": tokenize_parser, "decode": decode_parser,
            "evaluate": evaluate_parser, "latent_stats": latent_stats_parser, "fit_codebook": fit_codebook_parser,
            "push": push_parser, "make_shards": make_shards_parser}


def report_error(prog: str, message: str, err: BaseException) -> None:
    """The `error:` line, once per job: under torchrun every rank meets the same bad input, so the first rank says
    it; another rank speaks only for an OSError, which may be its own (its node's disk, its files)."""
    from ..base.distributed import launched_rank  # here: the arguments are parsed before torch is imported

    if launched_rank() == 0 or isinstance(err, OSError):
        print(f"{prog}: error: {message}", file=sys.stderr)


def launch(command: str, argv: list[str] | None = None) -> int:
    """Parse `command`'s arguments, then import its module and run it; bad input is one `error:` line, exit code 2."""
    parser = COMMANDS[command]()
    args = parser.parse_args(argv)
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # its per-load weight bar: noise beside the command's own bar
        return importlib.import_module(f"{__package__}.{command}").run(args) or 0
    except (CLIError, ValueError, OSError) as err:  # OSError: missing files, unreachable encoders, a full disk
        message = " ".join(str(err).splitlines())  # one line, whatever a file's names hold
        report_error(parser.prog, message, err)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


# The console scripts of pyproject.toml: vqrae-NAME is launch("NAME").
vqrae_reconstruct = partial(launch, "reconstruct")
vqrae_tokenize = partial(launch, "tokenize")
vqrae_decode = partial(launch, "decode")
vqrae_evaluate = partial(launch, "evaluate")
vqrae_latent_stats = partial(launch, "latent_stats")
vqrae_fit_codebook = partial(launch, "fit_codebook")
vqrae_push = partial(launch, "push")
vqrae_make_shards = partial(launch, "make_shards")
