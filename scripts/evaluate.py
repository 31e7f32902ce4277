"""Thin wrapper: see `vqrae-evaluate --help`."""

from stage1.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
