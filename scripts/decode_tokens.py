"""Thin wrapper: see `vqrae-decode --help`."""

from stage1.cli.decode import main

if __name__ == "__main__":
    raise SystemExit(main())
