"""Thin wrapper: see `vqrae-latent-stats --help`."""

from stage1.cli.latent_stats import main

if __name__ == "__main__":
    raise SystemExit(main())
