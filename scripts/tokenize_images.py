"""Thin wrapper: see `vqrae-tokenize --help`."""

from stage1.cli.arguments import vqrae_tokenize as main

if __name__ == "__main__":
    raise SystemExit(main())
