"""Thin wrapper: see `vqrae-latent-stats --help`."""

from stage1.cli.arguments import vqrae_latent_stats as main

if __name__ == "__main__":
    raise SystemExit(main())
