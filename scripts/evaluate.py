"""Thin wrapper: see `vqrae-evaluate --help`."""

from stage1.cli.arguments import vqrae_evaluate as main

if __name__ == "__main__":
    raise SystemExit(main())
