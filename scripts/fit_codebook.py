"""Thin wrapper: see `vqrae-fit-codebook --help`."""

from stage1.cli.fit_codebook import main

if __name__ == "__main__":
    raise SystemExit(main())
