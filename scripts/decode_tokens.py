"""Thin wrapper: see `vqrae-decode --help`."""

from stage1.cli.arguments import vqrae_decode as main

if __name__ == "__main__":
    raise SystemExit(main())
