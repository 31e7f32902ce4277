"""Thin wrapper: see `vqrae-make-shards --help`."""

from stage1.cli.arguments import vqrae_make_shards as main

if __name__ == "__main__":
    raise SystemExit(main())
