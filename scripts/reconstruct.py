"""Thin wrapper: see `vqrae-reconstruct --help`."""

from stage1.cli.reconstruct import main

if __name__ == "__main__":
    raise SystemExit(main())
