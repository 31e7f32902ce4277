"""Crash-safe file writes: write to a hidden temporary name in the target folder, fsync, then rename.

A reader therefore sees either the previous complete file or the new complete file, never a partial one,
and a temporary left by a killed writer starts with '.' and ends in '.tmp', so it is never taken for a result.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from contextlib import contextmanager
from typing import Iterator


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc), else by setting it back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def plain_mode(is_dir: bool = False) -> int:
    """The mode a plain open() / mkdir would give now. Temporaries are created 0600 (folders 0700) and the mode
    survives the rename, so outputs get this one set explicitly."""
    return (0o777 if is_dir else 0o666) & ~current_umask()


def follow_umask(folder: str | os.PathLike) -> None:
    """Give every file and folder under `folder` the mode a plain write gives: for what another library wrote there
    (transformers' save_pretrained leaves its weights 0600)."""
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), plain_mode(is_dir=True))
        for name in files:
            os.chmod(os.path.join(root, name), plain_mode())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, plain_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def regular_file_size(path: str | os.PathLike) -> int:
    """The size of a file read whole; anything but a regular file (a FIFO would block its reader forever, a device
    never ends) is one error."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{os.fspath(path)} is not a regular file (a FIFO, device or folder): expected a file")
    return info.st_size


def remove_leftovers(folder: str | os.PathLike) -> None:
    """The temporary files atomic_path names (.NAME.XXXX.tmp) that writers killed mid-file left in `folder`."""
    for name in os.listdir(folder):
        if name.startswith(".") and name.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))


MAX_JSON_BYTES = 1 << 30  # the largest JSON file read: an ImageNet manifest is ~100 MB; a config.json a few KB


def read_json(path: str | os.PathLike, limit: int = MAX_JSON_BYTES):
    """A JSON file's value; a syntax error names the file (many of ours are exchanged: manifests, configs). Its size
    is checked first: json.load reads it whole (an 8 GiB sparse config.json was a MemoryError)."""
    size = regular_file_size(path)
    if size > limit:
        raise ValueError(f"{os.fspath(path)} is {size:,} bytes, more than the {limit:,} accepted for this JSON file")
    with open(path) as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{os.fspath(path)} is not valid JSON: {err}") from None
        except RecursionError:  # nesting deeper than Python's stack: no file of ours is like that
            raise ValueError(f"{os.fspath(path)} nests too deeply to be read") from None


MAX_YAML_BYTES = 1 << 20  # a config file: a few KB
MAX_YAML_NODES = 1 << 16  # values a YAML file may stand for once its aliases are expanded (a config: a few hundred)


def read_yaml(path: str | os.PathLike):
    """A YAML file's value, bounded: its size, and what its aliases expand to (YAML's safe loader shares an aliased
    node, but every reader that copies or walks it, OmegaConf included, expands it: a 400-byte file of nested
    aliases stands for a billion values)."""
    import yaml

    size = regular_file_size(path)
    if size > MAX_YAML_BYTES:
        raise ValueError(f"{os.fspath(path)} is {size:,} bytes, more than the {MAX_YAML_BYTES:,} accepted for a YAML "
                         f"config")
    with open(path) as f:
        try:
            value = yaml.safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ValueError(f"{os.fspath(path)} is not valid YAML: {err}") from None
    if _expanded_nodes(value, MAX_YAML_NODES) > MAX_YAML_NODES:
        raise ValueError(f"{os.fspath(path)} stands for more than {MAX_YAML_NODES:,} values once its aliases are "
                         f"expanded (nested YAML aliases): not a config")
    return value


def _expanded_nodes(value, budget: int) -> int:
    """Values in `value` counted as a copy would hold them (shared ones once per reference), stopping past budget."""
    count, stack = 0, [value]
    while stack and count <= budget:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return count


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def write_yaml(path: str | os.PathLike, data) -> None:
    import yaml

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)


def write_npy(path: str | os.PathLike, array) -> None:
    """A numpy array as a .npy file, written atomically."""
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
