"""Train a VQRAE decoder and EMA codebook on an image folder.

    torchrun --standalone --nproc_per_node=N scripts/train_stage1.py experiment=<name> data.path=<folder> \
        results_dir=<dir> [hydra overrides...]
    python scripts/train_stage1.py experiment=quickstart          # single process, offline, CPU

Config groups (configs/): encoder, decoder, quantizer, loss, data, experiment. Any value can be overridden,
e.g. train.batch_size=16 loss.disc_start=5000 precision=bf16. `--cfg` prints the composed config and exits.
"""

import sys

from omegaconf import OmegaConf

from stage1.train_config import load_train_config
from stage1.trainer import train


def main(argv: list[str]) -> None:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    show = "--cfg" in argv
    cfg = load_train_config([a for a in argv if a != "--cfg"])
    if show:
        print(OmegaConf.to_yaml(cfg))
        return
    train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
