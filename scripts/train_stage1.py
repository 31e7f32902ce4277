"""Train a VQRAE decoder and EMA codebook on an image folder (`--help` for the usage; stage1/cli/train.py).

    torchrun --standalone --nproc_per_node=N scripts/train_stage1.py experiment=<name> data.path=<folder> \
        results_dir=<dir> [hydra overrides...]
    python scripts/train_stage1.py experiment=quickstart          # single process, offline, CPU
"""

import sys

from stage1.cli.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
