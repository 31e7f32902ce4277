"""Thin wrapper: see `vqrae-fit-codebook --help`."""

from stage1.cli.arguments import vqrae_fit_codebook as main

if __name__ == "__main__":
    raise SystemExit(main())
