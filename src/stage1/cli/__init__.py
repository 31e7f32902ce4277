"""Command-line tools: vqrae-reconstruct, vqrae-tokenize, vqrae-decode, vqrae-evaluate, vqrae-latent-stats."""
