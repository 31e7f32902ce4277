"""The work of vqrae-make-shards (its flags and help text: stage1/cli/arguments.py)."""

from __future__ import annotations

from ..data.tar_shards import write_shards
from .arguments import launch
from .common import check_output


def run(args) -> int:
    check_output(args.out, folder=True)
    written = write_shards(args.data, args.out, args.shard_size)
    last = len(written) - 1
    print(f"wrote {len(written)} tar shard(s) to {args.out}; read them with --data "
          f"\"{args.out.rstrip('/')}/{{000000..{last:06d}}}.tar\"")
    return 0


def main(argv=None) -> int:
    return launch("make_shards", argv)


if __name__ == "__main__":
    raise SystemExit(main())
