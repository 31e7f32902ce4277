"""Thin wrapper: see `vqrae-push --help`."""

from stage1.cli.arguments import vqrae_push as main

if __name__ == "__main__":
    raise SystemExit(main())
