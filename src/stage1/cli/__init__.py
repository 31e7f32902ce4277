"""Command-line tools: vqrae-train (stage1/cli/train.py), and vqrae-reconstruct, -tokenize, -decode, -evaluate,
-latent-stats, -fit-codebook, -push, -make-shards (their flags: stage1/cli/arguments.py; their work: NAME.py)."""
