"""What `--data` / `data.path` names: an image folder, or tar shards, and exactly which shard specs are accepted.

    a directory                        an image folder (even if its name holds ".tar")
    shards/{000000..000127}.tar        a brace pattern (braceexpand's), at most MAX_SHARDS shards
    a.tar::b.tar                       a list, `::` between the parts
    pipe:CMD, http(s)://, gs://, ...   a stream (webdataset's gopen): read as it comes, or copied to data.tar_cache

Every shard a spec names is a stream URL, or a local regular file whose name ends in a tar suffix. Nothing else
is accepted: not a shard *spec file* (webdataset reads a `.yaml` / `.yml` / `.json` as a list of shards that may
hold `pipe:` commands), not a folder, not `-` (stdin). So a `pipe:` command runs only when the user wrote it in
--data or data.path; no file this project reads can name a shard.
"""

from __future__ import annotations

import os
import re

REMOTE = ("pipe:", "http://", "https://", "gs://", "s3://", "ais://")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MAX_SHARDS = 1_000_000  # shards one spec may name (LAION-5B ships about 500k): braceexpand lists them all at once
USAGE = (f"(local files ending in {' / '.join(TAR_SUFFIXES)}, or streams: {', '.join(REMOTE)}; as a brace pattern "
         f"or a '::' list; shard spec files such as .yaml are not read)")
_RANGE = re.compile(r"^(-?\d+|[A-Za-z])\.\.(-?\d+|[A-Za-z])(?:\.\.(-?\d+))?$")


class ShardSpecError(ValueError):
    """A --data / data.path that names neither an image folder nor accepted tar shards."""


def is_tar_source(data: str) -> bool:
    """Whether `data` names tar shards rather than an image folder: an existing directory is a folder; anything
    else is a shard spec (shard_urls says what is wrong with it)."""
    return not os.path.isdir(data)


def shard_urls(data: str, name: str = "--data") -> list[str]:
    """The shards a spec names, in order, each checked: a stream URL, or an existing local tar file. `name`: what
    the user set it as, for the errors (a command's --data, training's data.path)."""
    parts = data.split("::")
    count = sum(_count_bound(part) for part in parts)
    if count > MAX_SHARDS:
        raise ShardSpecError(f"{name} {data!r} names up to {count:,} shards, more than the {MAX_SHARDS:,} accepted: "
                             f"check the brace pattern")
    urls = [url for part in parts for url in _expanded(part, data, name)]
    if not urls:
        raise ShardSpecError(f"{name} {data!r} names no tar shards")
    local = [url for url in urls if not url.startswith(REMOTE)]
    missing = [url for url in local if not os.path.exists(url)]
    if missing == [data]:  # one path, nothing there
        raise FileNotFoundError(f"{name} {data!r} does not exist: expected an image folder, or tar shards {USAGE}")
    if missing:
        raise FileNotFoundError(f"tar shard(s) not found: {', '.join(missing[:3])}" +
                                (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    for url in local:
        if not (url.endswith(TAR_SUFFIXES) and os.path.isfile(url)):
            what = "a folder" if os.path.isdir(url) else "not a tar file"
            raise ShardSpecError(f"{name} {data!r}: {url!r} is {what}; expected an image folder, or tar shards {USAGE}")
    return urls


def _expanded(pattern: str, data: str, name: str) -> list[str]:
    """braceexpand's expansion of one part (shard_urls bounds it first: braceexpand builds a range all at once)."""
    from braceexpand import braceexpand

    try:
        return list(braceexpand(pattern))
    except ValueError as err:  # UnbalancedBracesError
        raise ShardSpecError(f"{name} {data!r}: {err}") from None


def _count_bound(pattern: str) -> int:
    """An upper bound on the strings `pattern` expands to: the product, over every brace group, of its
    alternatives (a range's length, or its top-level commas + 1)."""
    bound, stack, escaped = 1, [], False  # stack: [start, commas] of each open group
    for i, char in enumerate(pattern):
        if escaped or char == "\\":
            escaped = not escaped
            continue
        if char == "{":
            stack.append([i, 0])
        elif char == "," and stack:
            stack[-1][1] += 1
        elif char == "}" and stack:
            start, commas = stack.pop()
            bound *= commas + 1 if commas else _range_length(pattern[start + 1 : i])
    return bound


def _range_length(body: str) -> int:
    match = _RANGE.match(body)
    if match is None:
        return 1  # a literal brace
    first, last, step = match.groups()
    if first.isalpha() != last.isalpha():
        return 1
    a, b = (ord(first), ord(last)) if first.isalpha() else (int(first), int(last))
    return abs(b - a) // max(1, abs(int(step or 1))) + 1
