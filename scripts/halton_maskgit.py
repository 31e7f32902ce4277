"""Halton-MaskGIT (github valeoai/Halton-MaskGIT) on a vqrae tokenizer, none of its files changed. Run it from its
checkout, with main.py and main.py's own flags after `--` (vqrae-tokenize --format maskgit prints them):

    cd Halton-MaskGIT
    python /path/to/vqrae/scripts/halton_maskgit.py -- main.py --mode cls-to-img --data imagenet_feat \\
        --data-folder /codes/maskgit/ --vqgan-folder /runs/vqrae/final --img-size 224 --f-factor 14 \\
        --codebook-size 16384 --mask-value 16384 --nb-class 1000 --vit-size base --vit-folder ckpt/ ...

Its trainer builds LlamaGen's VQ model in get_network("vqgan-llama") (class, codebook size and checkpoint format
written there); this puts LlamaGenTokenizer.from_pretrained(--vqgan-folder, image_size=--img-size) in its place, so
--vqgan-folder names the vqrae model (a folder or Hub id). Everything else is its own code.

--samples PATH replaces its FID / IS evaluations (every 10 epochs and after training: 10k and 50k samples scored by
an Inception network it downloads) with a grid of --num-samples samples of its sampler, decoded by the tokenizer,
written to PATH (FID and IS logged as NaN). With main.py's --test-only --resume it only samples from the checkpoint
in --vit-folder: its sampler to images.
"""

from __future__ import annotations

import argparse
import math
import os
import runpy
import sys

import torch
from torchvision.utils import save_image

from stage1 import LlamaGenTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default=None, help="PNG of samples in place of its FID / IS evaluations")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--labels", default=None, help="classes of the samples, comma-separated (default: 0, 1, ...)")
    parser.add_argument("main", nargs=argparse.REMAINDER, help="-- main.py and its flags")
    args = parser.parse_args()
    command = args.main[1:] if args.main[:1] == ["--"] else args.main
    if not command or not command[0].endswith(".py") or not os.path.isfile(command[0]):
        raise SystemExit("give Halton-MaskGIT's main.py and its flags after --, from its checkout")
    sys.path.insert(0, os.path.dirname(os.path.abspath(command[0])))
    from Trainer.cls_trainer import MaskGIT  # Halton-MaskGIT's, from its checkout

    builds = MaskGIT.get_network

    def get_network(trainer, archi, *rest, **options):
        if archi != "vqgan-llama":
            return builds(trainer, archi, *rest, **options)
        tokenizer = LlamaGenTokenizer.from_pretrained(trainer.args.vqgan_folder, image_size=trainer.args.img_size)
        return tokenizer.to(trainer.args.device)  # frozen: not compiled, not wrapped in DDP (its own unwraps it)

    MaskGIT.get_network = get_network
    if args.samples:
        def sample_instead(trainer, sampler=None, **ignored):
            nb_class = trainer.args.nb_class
            labels = ([int(c) for c in args.labels.split(",")] if args.labels
                      else [i % nb_class for i in range(args.num_samples)])
            with torch.no_grad():
                classes = torch.tensor(labels, device=trainer.args.device)
                images = (sampler or trainer.sampler)(trainer, nb_sample=len(labels), labels=classes)[0]
            if trainer.args.is_master:
                save_image(images.float().add(1).div(2).clamp(0, 1), args.samples,
                           nrow=math.ceil(math.sqrt(len(labels))))
                print(f"wrote {args.samples}: {len(labels)} samples of classes {labels}")
            return {"FID": float("nan"), "IS": float("nan")}

        MaskGIT.eval = sample_instead
    sys.argv = command
    runpy.run_path(command[0], run_name="__main__")


if __name__ == "__main__":
    main()
