"""Stated bounds on sizes that files from other people declare, checked before anything is allocated from them.

A size read from a file (a manifest's image_size, a config.json's widths, a tar member's header, an .npy header)
is checked against what the file itself can hold where it can be (a config against its weights, a header against
the file's length) and against these limits where it cannot. The limits of one reader live beside it (tar shards:
tar_shards.MAX_IMAGE_BYTES; shard specs: shard_specs.MAX_SHARDS; resizing: images.MAX_RESIZED_PIXELS); these are
shared by several. docs/guarantees.md lists them all.
"""

MAX_IMAGE_SIDE = 8192  # pixels per side of an image a model, a manifest or a command works at
MAX_THREADS = 1024  # CPU threads per process a config may ask for (one more than cores only slows a run down)
MAX_WORKERS = 256  # DataLoader workers per rank (each is a process: 100,000 of them hung the start)
MAX_CODES = 1 << 20  # codes per codebook (the largest tokenizers use 2^18)
MAX_LEVELS = 256  # codebooks one quantizer may stack (depth), split into (groups) or spread over scales
# Numbers a quantizer's codebooks and trained parameters may hold in all (Quantizer.state_elements: codebooks x K x D
# and the rest): 2^28 is 1 GiB in fp32, twice that with a codebook's EMA statistics. The largest published codebooks
# (K = 2^18 at D = 768: SimVQ's) fit; a config.json of many per-scale codebooks or a residual depth of 16 at K = 2^20
# does not, and is refused before anything is allocated.
MAX_QUANTIZER_ELEMENTS = 1 << 28


def transformer_weights_at_least(layers: int, width: int, mlp_width: int) -> int:
    """A lower bound on a transformer's weights: each layer's attention (4 width^2) and MLP (2 width mlp_width)
    matrices. What a config.json's sizes are checked with against the weights file before anything is built."""
    return layers * (4 * width * width + 2 * width * mlp_width)
