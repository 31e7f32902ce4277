"""Thin wrapper: see `vqrae-reconstruct --help`."""

from stage1.cli.arguments import vqrae_reconstruct as main

if __name__ == "__main__":
    raise SystemExit(main())
