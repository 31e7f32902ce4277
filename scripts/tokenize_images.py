"""Thin wrapper: see `vqrae-tokenize --help`."""

from stage1.cli.tokenize import main

if __name__ == "__main__":
    raise SystemExit(main())
