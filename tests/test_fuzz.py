"""Issue 20: a property-based fuzz suite. Strategies generate hostile files (tar shards, manifests, .npy shard
headers, config.json, weights, torch files, images, shard specs) and feed them through the REAL loaders and commands.

The property every test checks, each stating its own part in its docstring: either success with the right output,
or one clear error (the exception types the loader documents; for a command, exit code 2 and exactly one
`vqrae-NAME: error:` line on stderr). Never another exception, never a hang (every example runs under a watchdog
alarm), never an allocation beyond a stated bound (the bounds are scaled down where the test can reach them:
tar_shards.MAX_IMAGE_BYTES, shard_specs.MAX_SHARDS, Pillow's decompression-bomb limit), never a write outside the
target.

Hypothesis profiles live in tests/conftest.py: "ci" (the default: a few derandomized examples per property, no
example database) and "thorough" (`pytest tests/test_fuzz.py --hypothesis-profile=thorough`: 1000 random ones).

The bugs this suite found are the tests at the end, one minimal reproducer each (regression tests now that they
are fixed). A bug found and not yet fixed gets an xfail(strict=True) reproducer there, and the strategy leaves its
input out (saying so) until it is fixed, so the suite stays green meanwhile.
"""

from __future__ import annotations

import bz2
import contextlib
import glob
import gzip
import hashlib
import io
import json
import lzma
import math
import os
import re
import shutil
import signal
import struct
import tarfile
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from unittest import mock

import numpy as np
import pytest
import torch
from helpers import IMAGE_SIZE, read_like_maskgit, smooth_images
from hypothesis import event, given, note
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

from stage1 import VQRAE
from stage1.base.tensor_files import read_tensor_file
from stage1.cli import decode, tokenize
from stage1.data import shard_specs, tar_shards, token_shards
from stage1.data.images import MAX_RESIZED_PIXELS, UnreadableImageError
from stage1.data.input_pipeline import prepare_image

WATCHDOG_S = 20.0  # far beyond what any example takes here (milliseconds to a second): past it, it is a hang


class _Expired(BaseException):
    """The watchdog's alarm. A BaseException, so that no `except Exception` in the code under test swallows it."""


@contextlib.contextmanager
def no_hang(seconds: float = WATCHDOG_S):
    """Fail (an AssertionError, so hypothesis shrinks the example) if the block runs longer than `seconds`."""

    def expire(signum, frame):
        raise _Expired

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Expired:
        raise AssertionError(f"still running after {seconds} s: a hang") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_PROGRESS = re.compile(r"\r?[\w-]+: +\d+%\|[^\r\n]*")  # tqdm's progress bar, drawn with \r on stderr


def error_lines(stderr: str) -> list[str]:
    """stderr's lines, tqdm's progress bars left out."""
    return [line for line in _PROGRESS.sub("", stderr).split("\n") if line]


def run_command(main, argv: list[str]) -> tuple[int, str]:
    """A command's exit code and stderr; a traceback (any exception out of main) fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def assert_one_error(code: int, stderr: str, command: str) -> None:
    lines = error_lines(stderr)
    assert code == 2, (code, stderr)
    assert len(lines) == 1 and lines[0].startswith(f"{command}: error: "), stderr


def png_bytes(seed: int, width: int = 3, height: int = 2) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="png")
    return buffer.getvalue()


def snapshot(root: str) -> dict[str, str]:
    """Every file under root -> a digest of its bytes."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    files[path] = hashlib.sha256(f.read()).hexdigest()
    return files


# ---- shared fixtures: a tiny model and a real tokenization of three images -------------------------------------------
class Loaded:
    """The tiny model, with a short repr: hypothesis prints every argument of a failing example."""

    def __init__(self, model: VQRAE):
        self.model = model

    def __repr__(self) -> str:
        return "<the tiny VQRAE of model_dir>"


@pytest.fixture(scope="module")
def model(model_dir):
    return Loaded(VQRAE.from_pretrained(model_dir))


@pytest.fixture(scope="module")
def tokens_dir(model_dir, tmp_path_factory):
    """vqrae-tokenize's output for a.png, nested/b.png, c.png in shards of two: shard-00000.npy (2 rows) and
    shard-00001.npy (1 row), uint8 rows of 4 x 4 codes."""
    images = tmp_path_factory.mktemp("fuzz_images")
    (images / "nested").mkdir()
    for seed, name in enumerate(("a.png", "nested/b.png", "c.png")):
        (images / name).write_bytes(png_bytes(seed, IMAGE_SIZE, IMAGE_SIZE))
    out = tmp_path_factory.mktemp("fuzz_tokens") / "tokens"
    code, stderr = run_command(tokenize.main, ["--model", model_dir, "--data", str(images), "--out", str(out),
                                               "--shard-size", "2", "--num-workers", "0", "--device", "cpu"])
    assert code == 0, stderr
    return str(out)


# ======================================================================================================================
# 1. Tar shards: read_shard, index_shard, TarIndex
# ======================================================================================================================
IMAGE_LIMIT, TEXT_LIMIT = 1024, 64  # tar_shards.MAX_IMAGE_BYTES and MAX_TEXT_BYTES, scaled down for the test
FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, b"Z")  # data follows the header (Z: unknown type)
OTHER_TYPES = (tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE)
GOOD_PNGS = [png_bytes(100 + i) for i in range(3)]

# Hostile names and texts, '#' included (read_shard's suffix for a repeated name). Never "good": the good samples'
# namespace, so that their expected names are known.
_hostile_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=10) | st.sampled_from(["a.png#2", "#1"])
_raw_text = st.binary(max_size=8).map(lambda b: b.decode("utf-8", "surrogateescape"))  # non-UTF-8 member names
_stems = st.one_of(st.sampled_from(["", ".", "..", "a", "A", "k.ey", "._x", "x/..", "ünï", "名前", "sp ace", "\\",
                                    "L" * 150]), _hostile_text, _raw_text)
_fields = st.sampled_from(["png", "PNG", "jpg", "webp", "cls", "CLS", "path.txt", "txt", "json", "", "png.png",
                           "cls.txt", "tar"])
member_names = st.builds(lambda folder, stem, dot, fld: folder + stem + dot + fld,
                         st.sampled_from(["", "d/", "d/e/", "../", "/", "./"]), _stems, st.sampled_from([".", ""]),
                         _fields).filter(lambda name: "good" not in name)
_oversized = st.integers(1, 300)
_image_payloads = st.one_of(st.just(GOOD_PNGS[0]), st.binary(max_size=64), st.just(b""),
                            _oversized.map(lambda n: b"\x89" * (IMAGE_LIMIT + n)))
_cls_payloads = st.one_of(st.integers(-2**40, 2**40).map(lambda i: str(i).encode()),
                          st.sampled_from([b"", b" 7\n", b"+3", b"1_0", "٣".encode(), b"\xff", b"-1", b"-2",
                                           b"2147483647", b"2147483648", b"9" * 60, b"1e3", b"0x10", b"nan"]),
                          st.binary(max_size=8), _oversized.map(lambda n: b"1" * (TEXT_LIMIT + n)))
_path_payloads = st.one_of(_hostile_text.map(str.encode), st.binary(max_size=12),
                           st.sampled_from([b"../../x.png", b"/abs.png", b"", b"a\nb.png", "ü/名.png".encode()]),
                           _oversized.map(lambda n: b"p" * (TEXT_LIMIT + n))).filter(lambda b: b"good" not in b)


def _payloads_for(name: str):
    base = name.rsplit("/", 1)[-1]
    fld = base.partition(".")[2].lower()
    if fld in tar_shards.IMAGE_FIELDS:
        return _image_payloads
    return {"cls": _cls_payloads, "path.txt": _path_payloads}.get(fld, st.binary(max_size=32))


@dataclass
class Member:
    """One hostile tar member: `declared` its header's size when that lies, `pax` its pax records (PAX format)."""

    name: str
    kind: bytes
    payload: bytes
    declared: int | None = None
    pax: dict = field(default_factory=dict)
    global_header: bool = False  # a pax global header (type g): its records apply to every member after it


def _as_parsed(chunk: bytes) -> tuple[bool, bool]:
    """How tarfile reads one member's bytes on their own: (whether the next header starts where the bytes end, as
    written; whether _sample_files takes the member, which closes the sample before it). A global header changes
    how every later member reads: it counts as not as written."""
    try:
        with tarfile.open(fileobj=io.BytesIO(chunk + b"\0" * 1024), mode="r:") as tar:
            member = tar.next()
            as_written = (member is not None and tar.offset == len(chunk) and not tar.pax_headers
                          and member.size >= 0)  # a negative size breaks the tar (tarfile would step back)
    except (tarfile.TarError, ValueError):  # ValueError: a sparse map tarfile cannot parse, for one
        return False, False
    base = os.path.split(member.name)[1] if member is not None else ""
    return as_written, bool(member is not None and member.isfile() and "." in base and not base.startswith("."))


@st.composite
def hostile_members(draw) -> Member:
    if draw(st.integers(0, 15)) == 0:
        return Member("", b"g", b"", pax=draw(st.dictionaries(st.sampled_from(["path", "size", "comment", "mtime"]),
                                                               st.sampled_from(["x", "7", "", "a/b"]), max_size=2)),
                      global_header=True)
    name = draw(member_names)
    kind = draw(st.sampled_from(FILE_TYPES + OTHER_TYPES)) if draw(st.booleans()) else tarfile.REGTYPE
    payload = draw(_payloads_for(name)) if kind in FILE_TYPES else b""
    # A size that lies: a little, far past the end (GNU writes base-256, USTAR falls back to a pax size), or negative
    # (pax only: tarfile before 3.12.12 steps back to an earlier header).
    declared = draw(st.sampled_from([None, None, None, "lie", "huge"]).flatmap(
        lambda lie: st.integers(0, 3000) if lie == "lie" else st.sampled_from([2**40, 10**15]) if lie else st.none()))
    sizes = st.one_of(st.integers(0, 3000).map(str), st.sampled_from(["-512", "-1024", "-1536", str(10**15)]))
    records = draw(st.dictionaries(st.sampled_from(["path", "size", "comment", "mtime", "uid", "linkpath"]),
                                   st.one_of(sizes, st.sampled_from(["x", "", "1e3", " 5"]), _hostile_text),
                                   max_size=2))
    sparse = draw(st.sampled_from([{}] * 7 + [  # a GNU sparse file: holes tarfile fills with zeros, up to its size
        {"GNU.sparse.map": "0,1", "GNU.sparse.size": "900"}, {"GNU.sparse.map": "3,1", "GNU.sparse.size": "5"},
        {"GNU.sparse.map": "0,1,10,1", "GNU.sparse.size": "2000000"}, {"GNU.sparse.map": "x", "GNU.sparse.size": "5"},
        {"GNU.sparse.map": "0,1", "GNU.sparse.size": "-1"}]))
    pax = {k: v for k, v in {**records, **sparse}.items() if not (k == "path" and "good" in v)}
    return Member(name, kind, payload, declared, pax)


@st.composite
def tar_recipes(draw) -> dict:
    """A tar of hostile members and of good samples (good{i}.png + good{i}.cls [+ good{i}.path.txt], each group
    contiguous) in any order, its end, an optional compression and an optional damage."""
    hostile = draw(st.lists(hostile_members(), max_size=6))
    goods = draw(st.lists(st.tuples(st.integers(-1, 2**31 - 1), st.booleans()), min_size=1, max_size=3))
    order = draw(st.permutations([("h", i) for i in range(len(hostile))] + [("g", i) for i in range(len(goods))]))
    return dict(
        format=draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])),
        hostile=hostile, goods=goods, order=order,
        ending=draw(st.sampled_from(["zeros", "zeros", "none", "garbage", "half block"])),
        compression=draw(st.sampled_from([None, None, None, "gz", "bz2", "xz"])),
        damage=draw(st.one_of(st.none(), st.none(), st.tuples(st.just("truncate"), st.floats(0, 1)),
                              st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 255)))),
    )


def _header(info: tarfile.TarInfo, fmt: int) -> bytes:
    try:
        return info.tobuf(fmt, "utf-8", "surrogateescape")
    except ValueError:  # a name USTAR cannot hold
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def _member_bytes(member: Member, fmt: int) -> bytes:
    if member.global_header:
        return tarfile.TarInfo.create_pax_global_header(member.pax)
    info = tarfile.TarInfo(member.name)
    info.type, info.mode, info.mtime = member.kind, 0o644, 0
    info.size = member.declared if member.declared is not None else len(member.payload)
    if member.kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = "target"
    info.pax_headers = dict(member.pax) if fmt == tarfile.PAX_FORMAT else {}
    return _header(info, fmt) + _padded(member.payload)


def _good_bytes(i: int, label: int, with_path: bool, fmt: int) -> bytes:
    fields = [("png", GOOD_PNGS[i]), ("cls", str(label).encode())]
    if with_path:
        fields.append(("path.txt", f"good/{i}.png".encode()))
    out = b""
    for fld, data in fields:
        info = tarfile.TarInfo(f"good{i}.{fld}")
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        out += _header(info, fmt) + _padded(data)
    return out


def build_tar(recipe: dict) -> tuple[bytes, bytes, dict]:
    """(the file's bytes, the tar as written before compression and damage, name -> (png, label) of the good
    samples that read_shard and index_shard must return intact: those before anything that breaks the parse)."""
    chunks = []  # (start, end, good index or None, whether it closes the sample before it)
    body, broken = b"", math.inf  # broken: the first byte whose parse is not as written
    for kind, i in recipe["order"]:
        if kind == "g":
            data, as_written, closes = _good_bytes(i, *recipe["goods"][i], recipe["format"]), True, True
        else:
            data = _member_bytes(recipe["hostile"][i], recipe["format"])
            as_written, closes = _as_parsed(data)
        if not as_written:
            broken = min(broken, len(body))
        chunks.append((len(body), len(body) + len(data), i if kind == "g" else None, closes))
        body += data
    ending = {"zeros": b"\0" * 1024, "none": b"", "garbage": b"junk" * 200, "half block": b"\0" * 300}
    raw = body + ending[recipe["ending"]]
    compressor = {None: bytes, "gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}
    data = compressor[recipe["compression"]](raw)
    damage = recipe["damage"]
    if damage is not None and data:
        at = min(int(damage[1] * len(data)), len(data) - 1)
        if damage[0] == "truncate":
            data = data[:at]
        elif data[at] != damage[2]:
            data = data[:at] + bytes([damage[2]]) + data[at + 1:]
        else:
            damage = None
        if damage is not None:
            broken = min(broken, at if recipe["compression"] is None else 0)  # compressed: no promise at all
    intact = {}
    for position, (_, _, i, _) in enumerate(chunks):
        # A sample is yielded when the next member _sample_files takes arrives (or the tar ends): that member's
        # header, and everything before it, must read as written.
        closer = next((chunk for chunk in chunks[position + 1:] if chunk[3]), None)
        if i is not None and (closer[1] if closer else len(body)) <= broken:
            label, with_path = recipe["goods"][i]
            intact[f"good/{i}.png" if with_path else f"good{i}.png"] = (GOOD_PNGS[i], label)
    return data, raw, intact


@given(tar_recipes())
def test_tar_shards_read_hostile_tars_into_samples_or_listed_problems(recipe):
    """read_shard never raises: every sample has its image bytes and no problem, or no bytes and a problem naming
    the tar; names are unique; labels are integers in [-1, 2^31); no image is over MAX_IMAGE_BYTES and all of them
    together are no more than the (uncompressed) tar holds. The good samples before any damage come back with their
    own bytes and labels. index_shard (and TarIndex) never raises on a .tar (a ValueError on a .tar.gz name), its
    extents lie inside the file, and it gives the same bytes as read_shard for a name both read without a problem;
    on an undamaged tar the two list the same names."""
    data, raw, intact = build_tar(recipe)
    note(f"{len(data)} bytes, intact good samples: {sorted(intact)}")
    with (tempfile.TemporaryDirectory() as tmp, no_hang(),
          mock.patch.object(tar_shards, "MAX_IMAGE_BYTES", IMAGE_LIMIT),
          mock.patch.object(tar_shards, "MAX_TEXT_BYTES", TEXT_LIMIT)):
        path = os.path.join(tmp, "shard.tar")
        with open(path, "wb") as f:
            f.write(data)
        samples = tar_shards.read_shard(path)
        entries = tar_shards.index_shard(path)
        index = tar_shards.TarIndex([path])
        try:
            indexed = {}
            for name in index:
                try:
                    indexed[name] = index[name]
                except UnreadableImageError as err:
                    assert str(err) and path in str(err)
        finally:
            index.close()
        with pytest.raises(ValueError, match="compressed"):
            tar_shards.index_shard(path + ".gz")

    event(f"read_shard: {sum(s.problem is None for s in samples)} good of {len(samples)}, {len(intact)} promised")
    names = [s.name for s in samples]
    assert len(set(names)) == len(names), names
    for sample in samples:
        assert isinstance(sample.label, int) and -1 <= sample.label < 2**31
        if sample.problem is None:
            assert isinstance(sample.data, bytes) and len(sample.data) <= IMAGE_LIMIT
        else:
            assert sample.data is None and path in sample.problem, sample
    damaged = [i for i, s in enumerate(samples) if s.name.startswith(f"{path} (after sample")]
    assert damaged in ([], [len(samples) - 1]), names  # at most one entry for a broken tar, the last
    assert sum(len(s.data) for s in samples if s.data is not None) <= len(raw)
    got = {s.name: (s.data, s.label) for s in samples if s.problem is None}
    for name, expected in intact.items():
        assert got.get(name) == expected, (name, [(s.name, s.problem) for s in samples])

    index_names = [entry[0] for entry in entries]
    assert len(set(index_names)) == len(index_names), index_names
    by_name = {s.name: s for s in samples}
    for name, offset, size, problem in entries:
        if problem is not None:
            assert path in problem and name not in indexed
            continue
        assert 0 <= offset and 0 <= size and offset + size <= len(data)
        assert indexed[name] == data[offset:offset + size]
        if name in by_name and by_name[name].problem is None:
            assert indexed[name] == by_name[name].data
    if recipe["compression"] is None:
        for name, (png, _) in intact.items():
            assert indexed.get(name) == png, (name, entries)
    clean = (recipe["damage"] is None and recipe["compression"] is None and recipe["ending"] != "garbage"
             and not any(not _as_parsed(_member_bytes(m, recipe["format"]))[0] for m in recipe["hostile"]))
    if clean:
        assert index_names == names
        assert sorted(indexed) == sorted(got)


# ======================================================================================================================
# 2. Manifests: read_manifest, then vqrae-decode
# ======================================================================================================================
class Raw(bytes):
    """A file's bytes, written as they are; shown short in hypothesis's reports."""

    def __repr__(self) -> str:
        return f"Raw(<{len(self):,} bytes: {bytes(self[:12])!r}...>)"


DEEP = Raw(b"[" * 100_000 + b"]" * 100_000)  # 200 kB of JSON nested deeper than Python's stack
MANIFEST_KEYS = ["model", "encoder", "codebook_size", "grid_shape", "index_shape", "views", "augment", "classes",
                 "image_size", "dtype", "num_images", "num_shards", "images", "skipped"]
json_junk = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)
ABSOLUTE = "<ABS>"  # replaced by an absolute path inside the test's sandbox
_manifest_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12) | st.sampled_from(["a\nb.jpg"])
hostile_paths = st.one_of(
    st.sampled_from(["a.png", "x.jpg", "nested/b.png", "../x.jpg", "../../escaped.jpg", "nested/../../../s.jpg",
                     ABSOLUTE, "", ".", "..", "./a.jpg", "a//b.jpg", "a/", "ünï/名.jpg", "a\x00b.jpg", "a.jpg",
                     "c.PNG", "x" * 300, "nested/b", "a.png/x.jpg", "nested/b.png/c.jpg"]),
    _manifest_text)
hostile_shards = st.one_of(
    st.sampled_from(["shard-00000.npy", "shard-00001.npy", "shard-00009.npy", "../tokens/shard-00000.npy",
                     ABSOLUTE, "", ".npy", "manifest.json", "shard-00000.json", "a/shard-00000.npy", "x\x00.npy",
                     "s" * 300 + ".npy"]),
    _manifest_text)
_top_values = {
    "codebook_size": st.sampled_from([64, 63, 65, 0, -1, 2**20, 2**20 + 1, 10**30, "64", 64.0, True, None]),
    "grid_shape": st.sampled_from([[4, 4], [2, 8], [4], [4, 4, 1], [-4, -4], ["4", "4"], [4.0, 4.0], None]),
    "index_shape": st.sampled_from([[4, 4], [2, 8], [4, 4, 1], [4, 4, 0], [4], [4, 4, 1, 1], [10**12, 4], None]),
    "views": st.sampled_from([1, 2, 0, -1, 10**12, "1", 1.5]),
    "image_size": st.sampled_from([32, 1, 17, 64, 0, -32, 8193, 10**12, 32.0, "32"]),  # 8192 works but is slow
    "dtype": st.sampled_from(["uint8", "uint16", "int64", "float32", "object", "u1", "", "bool", 8]),
    "num_images": st.sampled_from([3, 0, 2, 4, -1, 10**30]),
    "classes": st.sampled_from([None, [], ["a"], [1], "a"]),
    "skipped": st.sampled_from([[], [{}], [{"path": "x", "reason": "y"}], ["x"], None]),
}
manifest_ops = st.one_of(
    st.tuples(st.just("top"), st.sampled_from(MANIFEST_KEYS + ["bogus"]), json_junk),
    st.sampled_from(sorted(_top_values)).flatmap(lambda k: st.tuples(st.just("top"), st.just(k), _top_values[k])),
    st.tuples(st.just("drop"), st.sampled_from(MANIFEST_KEYS)),
    st.tuples(st.just("entry"), st.integers(0, 2), st.just("path"), hostile_paths),
    st.tuples(st.just("entry"), st.integers(0, 2), st.just("shard"), hostile_shards),
    st.tuples(st.just("entry"), st.integers(0, 2), st.sampled_from(["row", "label"]),
              st.sampled_from([0, 1, 2, -1, 3, 2**63, 10**30, "0", 0.0, True, None])),
    st.tuples(st.just("entry"), st.integers(0, 2), st.sampled_from(["extra", "path", "row"]), json_junk),
    st.tuples(st.just("entry_drop_key"), st.integers(0, 2), st.sampled_from(["path", "shard", "row", "label"])),
    st.tuples(st.just("entries"), st.sampled_from(["duplicate", "drop", "junk"]), st.integers(0, 2),
              st.booleans()),
)
# Changes read_manifest accepts, so that vqrae-decode gets to work on them: paths anywhere, labels, valid rows.
plausible_manifest_ops = st.one_of(
    st.tuples(st.just("entry"), st.integers(0, 2), st.just("path"), hostile_paths),
    st.tuples(st.just("entry"), st.integers(0, 2), st.just("label"), st.integers(-2**63, 2**63 - 1)),
    st.tuples(st.just("entry"), st.integers(0, 2), st.just("row"), st.sampled_from([0, 1])),
    st.tuples(st.just("entries"), st.sampled_from(["duplicate", "drop"]), st.integers(0, 2), st.just(True)),
    st.tuples(st.just("top"), st.sampled_from(["model", "encoder", "augment"]), _manifest_text),
    st.tuples(st.just("top"), st.just("image_size"), st.integers(1, 64)),
)
manifest_recipes = st.one_of(
    st.lists(plausible_manifest_ops, min_size=1, max_size=3),
    st.lists(plausible_manifest_ops, min_size=1, max_size=3),
    st.lists(manifest_ops, min_size=1, max_size=3),
    st.tuples(st.just("whole"), json_junk),
    st.tuples(st.just("bytes"), st.one_of(st.binary(max_size=40), st.sampled_from([b"{not json", b"\xff\xfe{}",
                                                                                   b"", b"NaN", b"[]" * 3, DEEP]))))


def mutate_manifest(good: dict, recipe, sandbox: str):
    """The manifest a recipe makes of the good one: a dict, or raw bytes."""
    absolute = os.path.join(sandbox, "abs", "x.jpg")
    if isinstance(recipe, tuple) and recipe[0] == "bytes":
        return recipe[1]
    if isinstance(recipe, tuple) and recipe[0] == "whole":
        return recipe[1]
    manifest = json.loads(json.dumps(good))
    for op in recipe:
        images = manifest.get("images")
        entries = images if isinstance(images, list) else []
        if op[0] == "top":
            manifest[op[1]] = op[2]
        elif op[0] == "drop":
            manifest.pop(op[1], None)
        elif op[0] == "entry" and op[1] < len(entries) and isinstance(entries[op[1]], dict):
            entries[op[1]][op[2]] = absolute if op[3] == ABSOLUTE else op[3]
        elif op[0] == "entry_drop_key" and op[1] < len(entries) and isinstance(entries[op[1]], dict):
            entries[op[1]].pop(op[2], None)
        elif op[0] == "entries" and entries:
            what, i, fix_count = op[1:]
            i %= len(entries)
            if what == "duplicate":
                entries.append(json.loads(json.dumps(entries[i])))
            elif what == "drop":
                entries.pop(i)
            else:
                entries[i] = ["junk", i]
            if fix_count:
                manifest["num_images"] = len(entries)
    return manifest


def _checked_manifest(folder: str, manifest: token_shards.Manifest) -> None:
    """What read_manifest promises of a manifest it returns."""
    for entry in manifest.images:
        assert os.path.basename(entry["shard"]) == entry["shard"] and entry["shard"].endswith(".npy")
        shard = np.load(os.path.join(folder, entry["shard"]), mmap_mode="r")
        assert 0 <= entry["row"] < shard.shape[0]
        assert str(shard.dtype) == manifest.dtype
        assert list(shard.shape[2 if manifest.views > 1 else 1:]) == manifest.index_shape


@given(manifest_recipes)
def test_manifests_are_read_or_refused_and_decode_writes_only_inside_out(tokens_dir, model_dir, model, recipe):
    """read_manifest returns a Manifest whose every entry names a shard inside the folder and a row that shard
    holds, or raises ValueError (ConfigError is one); never another exception. Then vqrae-decode exits 0 having
    written exactly one PNG per entry inside --out (the first entry's pixels the model's decode of its codes), or
    exits 2 with one error line; either way nothing outside --out is written or changed."""
    note(repr(recipe))
    with tempfile.TemporaryDirectory() as sandbox, no_hang():
        tokens = os.path.join(sandbox, "tokens")
        shutil.copytree(tokens_dir, tokens)
        with open(os.path.join(tokens_dir, token_shards.MANIFEST)) as f:
            good = json.load(f)
        manifest = mutate_manifest(good, recipe, sandbox)
        with open(os.path.join(tokens, token_shards.MANIFEST), "wb") as f:
            f.write(manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode())
        try:
            read = token_shards.read_manifest(tokens)
        except ValueError as err:
            assert str(err)
            read = None
        event(f"read_manifest: {'refused' if read is None else 'read'}")
        if read is not None:
            _checked_manifest(tokens, read)
        out = os.path.join(sandbox, "deep", "out")
        before = snapshot(sandbox)
        code, stderr = run_command(decode.main, ["--model", model_dir, "--tokens", tokens, "--out", out,
                                                 "--device", "cpu"])
        after = snapshot(sandbox)
        event(f"vqrae-decode: exit {code}")
        changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
        assert all(p.startswith(out + os.sep) for p in changed), sorted(changed)
        if read is None:
            assert_one_error(code, stderr, "vqrae-decode")
            assert not os.path.exists(out)
            return
        if code != 0:
            assert_one_error(code, stderr, "vqrae-decode")
            return
        targets = {os.path.realpath(os.path.join(out, os.path.splitext(e["path"])[0] + ".png")) for e in read.images}
        assert {os.path.realpath(p) for p in changed} == targets
        if not read.images:
            return
        first = read.images[0]
        written = np.asarray(Image.open(os.path.join(out, os.path.splitext(first["path"])[0] + ".png")))
        assert written.shape == (read.image_size, read.image_size, 3)
        row = np.load(os.path.join(tokens, first["shard"]))[first["row"]]
        row = row[0] if read.views > 1 else row
        with torch.no_grad():
            image = model.model.decode_from_indices(torch.from_numpy(row.astype(np.int64))[None],
                                              output_size=(read.image_size,) * 2)[0]
        expected = image.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.abs(written.astype(int) - expected.astype(int)).max() <= 1


# ======================================================================================================================
# 3. .npy shard headers
# ======================================================================================================================
_dims = st.one_of(st.integers(-2, 5), st.sampled_from([2**31, 2**62, 2**63 - 1, 2**63, 2**64, 10**30, -2**63,
                                                       True, False]))
_shapes = st.lists(_dims, max_size=4).map(tuple)
npy_headers = st.fixed_dictionaries({
    "descr": st.one_of(st.sampled_from(["|u1", "<u1", "<u2", "<i8", ">i8", "|O", "<f4", "|b1", "<U4", "|V16",
                                        "<U99999999999", "|V9999999999999", "", "zz"]),
                       st.sampled_from(["[('a', '<i4')]", "[('', '|u1', (4, 4))]", "{'a': 1}"]).map(
                           lambda text: ("raw", text))),
    "fortran_order": st.sampled_from([False, True, "yes", 1, None]),
    "shape": st.one_of(_shapes,
                       st.sampled_from([(3, 4, 4), (2, 4, 4), (1, 4, 4), (3, 16), (4, 4), 3, "(3, 4, 4)", None,
                                        [3, 4, 4], (3.0, 4, 4)])),
})


def _literal(value) -> str:
    return value[1] if isinstance(value, tuple) and value and value[0] == "raw" else repr(value)


plausible_npy_headers = st.fixed_dictionaries({
    "descr": st.sampled_from(["|u1", "|u1", "<u1", "|i1", "<u2"]),
    "fortran_order": st.sampled_from([False, False, True]),
    "shape": st.sampled_from([(2, 4, 4), (3, 4, 4), (5, 4, 4), (2, 4, 4), (0, 4, 4), (2, 16), (2, 4, 4, 1),
                              (1, 4, 4)]),
})


PAYLOAD = bytes(range(7, 256)) * 2  # a shard's bytes after its header: distinct, so rows are told apart


@st.composite
def npy_files(draw) -> tuple[bytes, np.ndarray | None]:
    """(an .npy file, the rows it holds as numpy reads them, for a header that numpy must accept; else None)."""
    plausible = draw(st.sampled_from([True, True, False]))
    header = draw(plausible_npy_headers if plausible else npy_headers)
    text = "{" + ", ".join(f"'{k}': {_literal(v)}" for k, v in header.items())
    text += "" if plausible else draw(st.sampled_from(["", ", 'extra': 1", ", 'é': 1", ", 'descr': '|u1'"]))
    text += "}"
    versions = [(1, 0), (2, 0), (3, 0)] + ([] if plausible else [(0, 0), (9, 9)])
    version = draw(st.sampled_from(versions))
    encoded = text.encode("utf-8" if version == (3, 0) else "latin-1", "replace")
    encoded += b" " * (-(len(encoded) + 13) % 64) + b"\n"
    lie = 0 if plausible else draw(st.sampled_from([0, 0, 0, -1, 1, -len(encoded), 10**4, 2**16]))
    length = max(0, min(len(encoded) + lie, 2**16 - 1 if version[0] == 1 else 2**32 - 1))
    prefix = b"\x93NUMPY" + bytes(version) + struct.pack("<H" if version[0] == 1 else "<I", length)
    if plausible:
        dtype = np.dtype(header["descr"])
        needed = math.prod(header["shape"]) * dtype.itemsize
        payload = PAYLOAD[:needed + draw(st.sampled_from([0, 0, 0, 0, 0, 1, 8]))]  # bytes past the rows, sometimes
        rows = np.frombuffer(payload[:needed], dtype).reshape(header["shape"],
                                                              order="F" if header["fortran_order"] else "C")
        return prefix + encoded + payload, rows
    body = prefix + encoded + PAYLOAD[:draw(st.sampled_from([48, 48, 32, 16, 0, 47, 49, 200]))]
    truncate = draw(st.none() | st.integers(0, 20))
    return (body if truncate is None else body[:truncate]), None


@given(npy_files())
def test_hostile_npy_shard_headers_are_one_clear_error(tokens_dir, model_dir, npy):
    """A code shard whose .npy header is hostile (huge, negative or non-integer dimensions, an object or absurd
    dtype, fortran_order junk, a header length that lies, truncated data, non-ASCII keys, unknown versions), named
    by an otherwise valid manifest: read_manifest raises ValueError or returns; never another exception, and
    nothing is allocated from the header (the shard is mapped). When it returns, the shard holds the manifest's
    layout, read_codes gives the file's own rows (C or Fortran order), and vqrae-decode writes the three images
    or exits 2 with one error line."""
    data, rows = npy
    note(repr(data[:200]))
    with tempfile.TemporaryDirectory() as tmp, no_hang(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's "overflow in scalar multiply" on a huge shape
        tokens = os.path.join(tmp, "tokens")
        shutil.copytree(tokens_dir, tokens)
        with open(os.path.join(tokens, "shard-00000.npy"), "wb") as f:
            f.write(data)
        try:
            manifest = token_shards.read_manifest(tokens)
        except ValueError as err:
            assert str(err)
            event("npy: refused")
            return
        event("npy: read")
        codes, labels = token_shards.read_codes(tokens, manifest)
        shard = np.load(os.path.join(tokens, "shard-00000.npy"), mmap_mode="r")
        out = os.path.join(tmp, "out")
        code, stderr = run_command(decode.main, ["--model", model_dir, "--tokens", tokens, "--out", out,
                                                 "--device", "cpu"])
        if code == 0:
            assert sorted(os.path.relpath(p, out) for p in snapshot(out)) == ["a.png", "c.png", "nested/b.png"]
        else:
            assert_one_error(code, stderr, "vqrae-decode")
    assert shard.shape[0] >= 2 and shard.shape[1:] == (4, 4) and shard.dtype == np.uint8
    assert codes.shape == (3, 4, 4) and codes.dtype == np.uint8 and labels.shape == (3,)
    assert np.array_equal(codes[:2], shard[:2])
    if rows is not None:
        assert np.array_equal(codes[:2], rows[:2])


# ======================================================================================================================
# 4. config.json -> VQRAE.from_pretrained
# ======================================================================================================================
SECTIONS = {"encoder": ["cls", "path", "input_size", "antialias", "params"],
            "quantizer": ["kind", "num_embeddings", "depth", "groups", "cosine", "commitment_cost", "decay",
                          "epsilon", "restart_window"],
            "decoder": ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
                        "qkv_bias", "cls_token", "pos_embed", "layer_norm_eps", "pixel_space"],
            None: ["noise_tau", "normalization_stat_path", "reshape_to_2d"]}
_sizes = st.sampled_from([0, 1, 2, 4, 7, 8, 16, 24, 32, 40, 64, 128, -1, 2**20, 2**20 + 1, 2**31, 10**12, 10**30])
_config_values = st.one_of(
    _sizes, json_junk, st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([1e300, -0.0, 1e-300]),
    st.sampled_from(["single", "residual", "grouped", "none", "learned", "fixed", "centered", "encoder",
                     "Dinov2withNorm", "SigLIP2", "MAE", "nope", "", "org/name", "/nonexistent", ".", "<MODEL>",
                     "<WEIGHTS>", {"normalize": False}, {"normalize": "yes"}, {"bogus": 1}, {}]))
config_ops = st.one_of(
    st.sampled_from(list(SECTIONS)).flatmap(lambda s: st.tuples(st.just("set"), st.just(s),
                                                                st.sampled_from(SECTIONS[s] + ["bogus"]),
                                                                _config_values)),
    st.sampled_from(list(SECTIONS)).flatmap(lambda s: st.tuples(st.just("drop"), st.just(s),
                                                                st.sampled_from(SECTIONS[s]))),
    st.tuples(st.just("section"), st.sampled_from(["encoder", "quantizer", "decoder"]), json_junk),
)
_plausible_config = {
    ("encoder", "input_size"): st.sampled_from([None, 8, 16, 24, 32, 40, 64]),
    ("encoder", "antialias"): st.booleans(),
    ("encoder", "params"): st.sampled_from([{}, {"normalize": False}, {"normalize": True}]),
    ("quantizer", "kind"): st.sampled_from(["single", "residual", "grouped", "none"]),
    ("quantizer", "cosine"): st.booleans(),
    ("quantizer", "commitment_cost"): st.floats(0, 10),
    ("quantizer", "decay"): st.floats(0, 0.999),
    ("quantizer", "epsilon"): st.floats(1e-12, 1.0),
    ("quantizer", "restart_window"): st.floats(0, 1e6),
    ("decoder", "qkv_bias"): st.booleans(),
    ("decoder", "cls_token"): st.booleans(),
    ("decoder", "pos_embed"): st.sampled_from(["learned", "fixed"]),
    ("decoder", "layer_norm_eps"): st.floats(1e-12, 1.0),
    ("decoder", "pixel_space"): st.sampled_from(["centered", "encoder"]),
    ("decoder", "num_attention_heads"): st.sampled_from([1, 2, 4]),
    (None, "noise_tau"): st.floats(0, 10),
    (None, "reshape_to_2d"): st.booleans(),
}
plausible_config_ops = st.sampled_from(sorted(_plausible_config, key=str)).flatmap(
    lambda key: st.tuples(st.just("set"), st.just(key[0]), st.just(key[1]), _plausible_config[key]))
config_recipes = st.one_of(st.lists(plausible_config_ops, min_size=1, max_size=3),
                           st.lists(config_ops | plausible_config_ops, min_size=1, max_size=3),
                           st.tuples(st.just("whole"), json_junk | st.just(DEEP)))


def mutate_config(good: dict, recipe, folder: str, encoder_dir: str):
    if isinstance(recipe, tuple):
        return recipe[1]
    config = json.loads(json.dumps(good))
    places = {"<MODEL>": encoder_dir, "<WEIGHTS>": os.path.join(folder, "model.safetensors")}
    for op in recipe:
        section = config if op[1] is None else config.get(op[1])
        if op[0] == "section":
            config[op[1]] = op[2]
        elif isinstance(section, dict) and op[0] == "set":
            section[op[2]] = places.get(op[3], op[3]) if isinstance(op[3], str) else op[3]
        elif isinstance(section, dict):
            section.pop(op[2], None)
    return config


def _works(model: VQRAE) -> None:
    """A loaded model's forward and codes on a tiny image."""
    x = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape
    if model.config.quantizer.kind != "none":
        codes = model.encode_to_indices(x)
        assert codes.dtype == torch.long and 0 <= codes.min() and codes.max() < model.quantizer.num_embeddings


@given(config_recipes)
def test_hostile_config_json_loads_a_working_model_or_is_one_clear_error(model_dir, dinov2_dir, recipe):
    """config.json with hostile values (huge or negative sizes, wrong types, unknown keys and choices, nested
    junk, other encoders and paths): VQRAE.from_pretrained gives a model whose forward and codes work on a tiny
    image, or raises ValueError (ConfigError is one) or OSError (a path that names no encoder or stats file) with a
    message, the errors the commands print as one line; never another exception (a TypeError from encoder.params
    was one), never anything built from sizes its weights do not hold."""
    note(repr(recipe))
    with tempfile.TemporaryDirectory() as tmp, no_hang():
        folder = os.path.join(tmp, "model")
        shutil.copytree(model_dir, folder)
        with open(os.path.join(folder, "config.json")) as f:
            good = json.load(f)
        config = mutate_config(good, recipe, folder, dinov2_dir)
        with open(os.path.join(folder, "config.json"), "wb") as f:
            f.write(config if isinstance(config, bytes) else json.dumps(config).encode())
        try:
            loaded = VQRAE.from_pretrained(folder)
        except (ValueError, OSError) as err:
            assert str(err)
            event(f"config: {type(err).__name__}")
            return
        event("config: loaded")
        _works(loaded)


# ======================================================================================================================
# 5. Weights: safetensors through from_pretrained; torch files through read_tensor_file
# ======================================================================================================================
_dtypes = st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.float8_e5m2, torch.float8_e4m3fn,
                           torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool])
_fills = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1e38, -1e38, 1e-45, -1.0, 2.0**62])
tensor_ops = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 99)),
    st.tuples(st.just("extra"), st.sampled_from(["bogus", "decoder.bogus", "latent_mean"]),
              st.lists(st.integers(0, 3), max_size=3)),
    st.tuples(st.just("shape"), st.integers(0, 99), st.lists(st.integers(0, 70), max_size=3)),
    st.tuples(st.just("dtype"), st.integers(0, 99), _dtypes),
    st.tuples(st.just("fill"), st.integers(0, 99), _fills),
)
_header_dtypes = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E5M2", "F8_E4M3", "X9", "",
                                  "f32"])
header_ops = st.one_of(
    st.tuples(st.just("dtype"), st.integers(0, 99), _header_dtypes),
    st.tuples(st.just("shape"), st.integers(0, 99), st.sampled_from([[2**40, 2**40], [-1], [], ["a"], [0, 2**62],
                                                                     [64, 32, 1], None])),
    st.tuples(st.just("offsets"), st.integers(0, 99), st.sampled_from([[0, 2**62], [8, 0], [0, 0], [-1, 4], None,
                                                                       [0, 4, 8]])),
    st.tuples(st.just("drop_key"), st.integers(0, 99), st.sampled_from(["dtype", "shape", "data_offsets"])),
    st.tuples(st.just("metadata"), json_junk),
    st.tuples(st.just("whole"), json_junk),
)
# Changes a model may load: finite values anywhere, floats stored in another float type.
plausible_tensor_ops = st.one_of(
    st.tuples(st.just("fill"), st.integers(0, 99), st.sampled_from([0.0, 1e38, -1e38, 1e-45, -1.0, 2.0**62])),
    st.tuples(st.just("float dtype"), st.integers(0, 99), st.sampled_from([torch.float16, torch.bfloat16,
                                                                          torch.float64])),
)
weight_recipes = st.one_of(
    st.tuples(st.just("tensors"), st.lists(plausible_tensor_ops, max_size=3)),
    st.tuples(st.just("tensors"), st.lists(tensor_ops, max_size=3)),
    st.tuples(st.just("header"), st.lists(header_ops, min_size=1, max_size=3)),
    st.tuples(st.just("length"), st.sampled_from([0, 1, 7, 8, -1, 1, 2**32, 2**63, 2**64 - 1])),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 255)),
)


def mutate_weights(path: str, recipe) -> None:
    """Rewrite a model.safetensors as the recipe says: its tensors, its JSON header, or its raw bytes."""
    kind = recipe[0]
    if kind == "tensors":
        state = load_file(path)
        for op in recipe[1]:
            keys = sorted(state)
            key = keys[op[1] % len(keys)] if keys and isinstance(op[1], int) else None
            if op[0] == "drop" and key:
                del state[key]
            elif op[0] == "extra":
                state[op[1]] = torch.zeros(op[2])
            elif op[0] == "shape" and key:
                state[key] = torch.zeros(op[2], dtype=state[key].dtype)
            elif op[0] == "dtype" and key:
                state[key] = state[key].to(op[2])
            elif op[0] == "float dtype" and key and state[key].is_floating_point():
                state[key] = state[key].to(op[2])
            elif op[0] == "fill" and key and state[key].numel():
                tensor = state[key].clone()
                if tensor.is_floating_point():
                    tensor.view(-1)[0] = op[2]
                elif not math.isnan(op[2]) and not math.isinf(op[2]) and tensor.dtype != torch.bool:
                    bounds = torch.iinfo(tensor.dtype)
                    tensor.view(-1)[0] = int(max(min(op[2], bounds.max), bounds.min))
                state[key] = tensor
        save_file(state, path, metadata={"format": "pt"})
        return
    with open(path, "rb") as f:
        data = f.read()
    (length,) = struct.unpack("<Q", data[:8])
    header, rest = json.loads(data[8:8 + length]), data[8 + length:]
    if kind == "header":
        names = sorted(k for k in header if k != "__metadata__")
        for op in recipe[1]:
            if op[0] == "whole":
                header = op[1]
                continue
            if not isinstance(header, dict):
                continue
            if op[0] == "metadata":
                header["__metadata__"] = op[1]
                continue
            entry = header.get(names[op[1] % len(names)])
            if not isinstance(entry, dict):
                continue
            if op[0] == "drop_key":
                entry.pop(op[2], None)
            else:
                entry[{"dtype": "dtype", "shape": "shape", "offsets": "data_offsets"}[op[0]]] = op[2]
        encoded = json.dumps(header).encode()
        data = struct.pack("<Q", len(encoded)) + encoded + rest
    elif kind == "length":
        data = struct.pack("<Q", recipe[1] % 2**64) + data[8:]
    elif kind == "truncate":
        data = data[:int(recipe[1] * len(data))]
    else:
        at = min(int(recipe[1] * len(data)), len(data) - 1)
        data = data[:at] + bytes([recipe[2]]) + data[at + 1:]
    with open(path, "wb") as f:
        f.write(data)


@given(weight_recipes)
def test_hostile_weights_load_a_working_model_or_are_one_clear_error(model_dir, recipe):
    """model.safetensors with NaN / Inf / absurd values, other dtypes, missing, extra or reshaped tensors, a JSON
    header that lies (dtypes, shapes, offsets, metadata), a header length that lies, truncated or flipped bytes:
    VQRAE.from_pretrained gives a model holding exactly the file's tensors, whose forward and codes work on a
    tiny image, or raises ValueError; never another exception."""
    note(repr(recipe))
    with tempfile.TemporaryDirectory() as tmp, no_hang():
        folder = os.path.join(tmp, "model")
        shutil.copytree(model_dir, folder)
        weights = os.path.join(folder, "model.safetensors")
        mutate_weights(weights, recipe)
        try:
            loaded = VQRAE.from_pretrained(folder)
        except ValueError as err:
            assert str(err)
            event("weights: refused")
            return
        event("weights: loaded")
        state = load_file(weights)
    held = loaded.trainable_state_dict()
    assert sorted(held) == sorted(state)
    for key, tensor in state.items():
        assert torch.equal(held[key], tensor.to(held[key].dtype)), key
    _works(loaded)


@st.composite
def torch_files(draw) -> tuple[str, bytes, dict | None]:
    """(file name, bytes, the tensors read_tensor_file must return or None)."""
    shapes = st.lists(st.integers(0, 3), max_size=3)
    dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.uint8, torch.bool])
    tensors = draw(st.dictionaries(st.sampled_from(["mean", "var", "std", "count", "a.b"]),
                                   st.tuples(shapes, dtypes).map(lambda sd: torch.zeros(sd[0]).to(sd[1])),
                                   min_size=1, max_size=3))
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    saved = buffer.getvalue()
    kind = draw(st.sampled_from(["random", "zip", "deflated", "valid", "valid", "truncated", "flipped",
                                 "not tensors", "numel lie"]))
    name = draw(st.sampled_from(["stats.pt", "stats.pth", "stat", "stats.safetensors"]))
    if kind == "random":
        return name, draw(st.binary(max_size=300)), None
    if kind in ("zip", "deflated"):
        out = io.BytesIO()
        method = zipfile.ZIP_STORED if kind == "zip" else zipfile.ZIP_DEFLATED
        with zipfile.ZipFile(out, "w", method) as archive, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a name given twice: zipfile warns, and writes both
            if kind == "deflated":
                with zipfile.ZipFile(io.BytesIO(saved)) as source:
                    for entry in source.infolist():
                        archive.writestr(entry.filename, source.read(entry.filename))
            for entry_name, data in draw(st.lists(st.tuples(st.sampled_from(["a", "archive/data.pkl", "x/version",
                                                                             "archive/data/0"]),
                                                            st.binary(max_size=40)), max_size=3)):
                archive.writestr(entry_name, data)
        return name, out.getvalue(), None
    if kind == "valid":
        return "stats.pt", saved, tensors
    if kind == "truncated":
        return name, saved[:draw(st.integers(0, len(saved) - 1))], None
    if kind == "flipped":
        at = draw(st.integers(0, len(saved) - 1))
        return name, saved[:at] + bytes([draw(st.integers(0, 255))]) + saved[at + 1:], None
    if kind == "not tensors":
        import datetime

        out = io.BytesIO()
        torch.save({"when": datetime.date(2020, 1, 1), "mean": torch.zeros(1)}, out)
        return name, out.getvalue(), None
    # A pickle whose storage declares another element count than its record holds (4 floats).
    buffer = io.BytesIO()
    torch.save({"mean": torch.arange(4.0)}, buffer)
    out = io.BytesIO()
    numel = draw(st.sampled_from([0, 3, 5, 2**31 - 1, 2**40, -5]))
    declared = b"X\x03\x00\x00\x00cpuq\x06K\x04"  # ('storage', FloatStorage, '0', 'cpu', 4) ends so
    with (zipfile.ZipFile(buffer) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive):
        for entry in source.infolist():
            data = source.read(entry.filename)
            if entry.filename.endswith("data.pkl"):
                assert declared in data
                data = data.replace(declared, declared[:-2] + b"\x8a\x08" + numel.to_bytes(8, "little", signed=True))
            archive.writestr(entry.filename, data)
    return name, out.getvalue(), None


@given(torch_files())
def test_hostile_torch_files_are_read_as_tensors_or_refused(file):
    """base.tensor_files.read_tensor_file on random bytes, foreign zips, deflated zips (a zip bomb's shape), torch
    files truncated, flipped, holding more than tensors, or declaring storages their records do not hold: returns
    the saved tensors (a valid torch.save file) or raises ValueError; never another exception (FileNotFoundError
    only for a missing file)."""
    name, data, expected = file
    with tempfile.TemporaryDirectory() as tmp, no_hang():
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        with pytest.raises(FileNotFoundError):
            read_tensor_file(path + ".missing", "stats")
        try:
            got = read_tensor_file(path, "stats")
        except ValueError as err:
            assert expected is None and str(err)
            event("torch file: refused")
            return
        event("torch file: read")
    assert isinstance(got, dict)
    if expected is not None:
        assert sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


# ======================================================================================================================
# 6. Images: prepare_image
# ======================================================================================================================
BOMB_PIXELS = 1 << 22  # Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS), scaled down for the test
_LOSSLESS = ("PNG", "BMP", "TIFF", "PPM")


@st.composite
def image_files(draw) -> tuple[bytes, dict]:
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM"]))
    mode = draw(st.sampled_from(["RGB", "RGB", "L", "RGBA", "P", "1", "LA", "CMYK", "I;16", "I", "F"]))
    width, height = draw(st.one_of(st.tuples(st.integers(1, 24), st.integers(1, 24)),
                                   st.sampled_from([(1, 70000), (70000, 1), (2, 3000), (3000, 3)])))
    pixels = np.random.default_rng(draw(st.integers(0, 2**16))).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode == "I;16":
        image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
    elif mode != "RGB":
        image = image.convert(mode)
    buffer, original = io.BytesIO(), mode == "RGB"
    try:
        image.save(buffer, format=fmt)
    except Exception:  # a mode or a size the format cannot hold (PIL says so in many ways)
        fmt, buffer, original = "PNG", io.BytesIO(), False
        image = image.convert("RGB")
        image.save(buffer, format="PNG")
    data = buffer.getvalue()
    damage = draw(st.one_of(st.none(), st.tuples(st.just("truncate"), st.floats(0, 1)),
                            st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)),
                                                                min_size=1, max_size=4)),
                            st.tuples(st.just("append"), st.binary(min_size=1, max_size=64))))
    if damage is not None and damage[0] == "truncate":
        data = data[:int(damage[1] * len(data))]
    elif damage is not None and damage[0] == "flip":
        flipped = bytearray(data)
        for where, value in damage[1]:
            flipped[min(int(where * len(data)), len(data) - 1)] = value
        damage, data = (None if bytes(flipped) == data else damage), bytes(flipped)
    elif damage is not None:
        data += damage[1]
    return data, dict(format=fmt, mode=image.mode, size=(width, height), damage=damage,
                      pixels=pixels if original else None)  # the file's pixels, when it holds them as drawn


@given(image_files(), st.integers(1, 48))
def test_hostile_images_are_prepared_or_unreadable(file, size):
    """prepare_image on images of every format and mode PIL writes, at tiny and very elongated sizes (1 x 70000),
    truncated, with flipped bytes or junk appended: returns a (3, size, size) float tensor in [0, 1] or raises
    UnreadableImageError; never another exception. An undamaged image is readable unless resizing it would pass
    MAX_RESIZED_PIXELS; an undamaged lossless RGB image of the right size comes back with its own pixels."""
    data, info = file
    note({k: v for k, v in info.items() if k != "pixels"})
    with (tempfile.TemporaryDirectory() as tmp, no_hang(), mock.patch.object(Image, "MAX_IMAGE_PIXELS", BOMB_PIXELS),
          warnings.catch_warnings()):
        warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning, libjpeg's corrupt-data notes
        path = os.path.join(tmp, "image." + info["format"].lower())
        with open(path, "wb") as f:
            f.write(data)
        try:
            pixels, conversions = prepare_image(path, size)
        except UnreadableImageError as err:
            assert path in str(err), err
            event(f"image: unreadable ({'damaged' if info['damage'] else 'undamaged'})")
            if info["damage"] is None:
                short, long = sorted(info["size"])
                assert size * -(-long * size // short) > MAX_RESIZED_PIXELS, err
            return
    event(f"image: prepared ({'damaged' if info['damage'] else 'undamaged'})")
    assert pixels.shape == (3, size, size) and pixels.dtype == torch.float32 and isinstance(conversions, str)
    assert 0 <= pixels.min() and pixels.max() <= 1
    if info["damage"] is None and info["format"] in _LOSSLESS and info["pixels"] is not None and \
            info["size"] == (size, size):
        assert torch.equal((pixels * 255).round().to(torch.uint8).permute(1, 2, 0),
                           torch.from_numpy(info["pixels"]))


# ======================================================================================================================
# 7. Shard specs: shard_urls
# ======================================================================================================================
SPEC_LIMIT = 50  # shard_specs.MAX_SHARDS, scaled down for the test
LOCAL = "<DIR>/"  # replaced by the test's folder of shards
_spec_pieces = st.sampled_from(["{", "}", ",", "..", "0", "1", "9", "00", "-1", "a", "z", "Z", "/", ".tar", ".tgz",
                                ".tar.gz", ".yaml", ".json", "-", "\\", "x", "s", "99999999999", "999", "d.tar", " ",
                                "{0..9}", "{s,x}", "{a..z..3}", "{1..9..0}", "::", "\n"])
spec_parts = st.tuples(st.sampled_from([LOCAL, LOCAL, "", "pipe:", "http://h/", "s3://b/", "-"]),
                       st.lists(_spec_pieces, max_size=12).map("".join)).map("".join)
shard_spec_strings = st.lists(spec_parts, min_size=1, max_size=3).map("::".join)
SPEC_FILES = ["0.tar", "1.tar", "9.tar", "00.tar", "s0.tar", "s1.tar", "x.tgz", "s.tar.gz", "a.yaml", "x.json", "f"]


@given(shard_spec_strings)
def test_shard_specs_name_existing_tars_and_streams_or_are_one_clear_error(spec):
    """shard_urls on generated specs (braces, ranges up to 10^11, steps, '::' lists, .yaml and .json files, a
    folder named .tar, pipe: and URL prefixes, backslashes): returns exactly braceexpand's expansion of each part,
    at most MAX_SHARDS in all, every local one an existing file with a tar suffix, or raises ValueError
    (ShardSpecError) or FileNotFoundError; quickly, and without expanding past the brace bound. It only names
    shards: nothing is opened or run (a generated pipe: spec is never read)."""
    from braceexpand import braceexpand

    with tempfile.TemporaryDirectory() as tmp, no_hang(), mock.patch.object(shard_specs, "MAX_SHARDS", SPEC_LIMIT):
        for name in SPEC_FILES:
            open(os.path.join(tmp, name), "wb").close()
        os.mkdir(os.path.join(tmp, "d.tar"))
        text = spec.replace(LOCAL, tmp + "/")
        parts = text.split("::")
        note(repr(text))
        try:
            urls = shard_specs.shard_urls(text)
        except (ValueError, FileNotFoundError) as err:
            assert str(err)
            event(f"shard spec: {type(err).__name__}")
            return
        event(f"shard spec: {len(urls)} url(s)" if len(urls) < 2 else "shard spec: 2+ urls")
        assert urls == [url for p in parts for url in braceexpand(p)]
        assert len(urls) <= SPEC_LIMIT
        for url in urls:
            assert url.startswith(shard_specs.REMOTE) or (url.endswith(shard_specs.TAR_SUFFIXES)
                                                          and os.path.isfile(url)), url


# ======================================================================================================================
# 8. The surfaces issue 32 attacked: RAE's stat files and decoder releases, encoder folders' preprocessor configs,
#    the adapters' code lists, config products
# ======================================================================================================================
STAT_CHANNELS, STAT_GRID = 4, 3


@st.composite
def stat_files(draw) -> dict:
    """stat.pt as RAE writes it ({"mean", "var"} of [C] or [C, h, w]), with hostile shapes, layouts (sparse, meta,
    non-contiguous), dtypes and values."""
    shape = draw(st.sampled_from([(STAT_CHANNELS,), (STAT_CHANNELS, STAT_GRID, STAT_GRID), (STAT_CHANNELS, 1, 9),
                                  (STAT_CHANNELS + 1,), (STAT_CHANNELS, STAT_GRID), ()]))
    tensors = {}
    for key in ("mean", "var"):
        t = torch.rand(shape, dtype=torch.float64) + (0.1 if key == "var" else -0.5)
        value = draw(st.sampled_from(["ok", "ok", "nan", "negative", "zero"]))
        if value != "ok" and t.numel():
            t.view(-1)[0] = {"nan": float("nan"), "negative": -1.0, "zero": 0.0}[value]
        layout = draw(st.sampled_from(["dense", "dense", "transposed", "sparse", "meta", "int", "bool"]))
        if layout == "transposed" and t.dim() >= 2:
            t = t.transpose(-1, -2).contiguous().transpose(-1, -2)  # dense, strided, not contiguous
        elif layout == "sparse" and t.dim() >= 1:
            t = t.to_sparse()
        elif layout == "meta":
            t = torch.empty(shape, device="meta")
        elif layout in ("int", "bool"):
            t = t.to(torch.int64 if layout == "int" else torch.bool)
        tensors[key] = t
    return draw(st.sampled_from([tensors, {"mean": tensors["mean"]}, {"stats": tensors}]))


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@given(stat_files())
def test_hostile_stat_files_give_the_models_normalisation_or_one_clear_error(stats):
    """model.latent_stats.read_latent_stats on RAE-style stat.pt files: either finite (C,) or (h * w, C) statistics
    for this model's grid with std > 0, or ValueError (sparse and meta tensors, wrong grids, NaN, var < 0, ints)."""
    from stage1.model.latent_stats import read_latent_stats

    with tempfile.TemporaryDirectory() as tmp, no_hang():
        path = os.path.join(tmp, "stat.pt")
        torch.save(stats, path)
        try:
            mean, std = read_latent_stats(path, STAT_CHANNELS, grid=STAT_GRID)
        except ValueError as err:
            assert str(err)
            event("stat.pt: refused")
            return
    event("stat.pt: read")
    assert mean.shape == std.shape and mean.shape in ((STAT_CHANNELS,), (STAT_GRID * STAT_GRID, STAT_CHANNELS))
    assert mean.isfinite().all() and std.isfinite().all() and (std > 0).all()


RAE_DECODER = dict(latent=32, hidden=16, layers=1, heads=2, intermediate=32)  # for the tiny DINOv2: 32 channels
RAE_SIZE_KEYS = {"decoder_hidden_size": "hidden", "decoder_num_hidden_layers": "layers",
                 "decoder_num_attention_heads": "heads", "decoder_intermediate_size": "intermediate"}


@st.composite
def rae_releases(draw) -> tuple[object, str, object, dict | None]:
    """RAE's release of a tiny decoder (its weights as model.pt or safetensors, a ViT-MAE config.json) with one
    hostile edit to the weights (wrapped names, a whole model's keys, a tensor missing, unknown, reshaped, cast,
    non-contiguous, sparse, meta, NaN / Inf, integer, not a tensor, a key not a string) and one to the config (a size
    missing, of another type, zero, huge, another head count; another activation, eps or qkv_bias; not an object).
    Returns (what to save, its suffix, the config, the RAE state the decoder must hold if the release loads)."""
    from rae_reference import ReferenceDecoder, randomize

    sizes = RAE_DECODER
    reference = randomize(ReferenceDecoder(sizes["latent"], sizes["hidden"], sizes["layers"], sizes["heads"],
                                           sizes["intermediate"], patch_size=8, num_patches=16), seed=1)
    state = reference.rae_state_dict()
    saved, loads_as = dict(state), dict(state)
    key = draw(st.sampled_from(sorted(state)))
    edit = draw(st.sampled_from(["none", "none", "wrapped", "whole model", "non-contiguous", "bfloat16", "float64",
                                 "missing", "unknown", "reshaped", "sparse", "meta", "nan", "inf", "int64",
                                 "not a tensor", "int key", "a list"]))
    value = state[key]
    if edit == "wrapped":
        prefix = draw(st.sampled_from(["module.", "_orig_mod.", "decoder.", "module.decoder."]))
        saved = {prefix + k: v for k, v in state.items()}
    elif edit == "whole model":
        saved["encoder.layer.0.weight"] = torch.ones(3)
    elif edit == "non-contiguous" and value.dim() >= 2:
        saved[key] = value.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif edit in ("bfloat16", "float64"):
        saved[key] = value.to(getattr(torch, edit))
        loads_as[key] = saved[key].float()
    elif edit == "missing":
        del saved[key]
    elif edit == "unknown":
        saved["decoder_mask_token"] = torch.zeros(1, 1, sizes["hidden"])
    elif edit == "reshaped":
        saved[key] = torch.cat([value.flatten(), torch.zeros(1)])
    elif edit == "sparse":
        saved[key] = value.to_sparse()
    elif edit == "meta":
        saved[key] = torch.empty(value.shape, device="meta")
    elif edit in ("nan", "inf"):
        saved[key] = value.clone()
        saved[key].view(-1)[0] = float(edit)
    elif edit == "int64":
        saved[key] = value.long()
    elif edit == "not a tensor":
        saved[key] = 0.5
    elif edit == "int key":
        saved[0] = saved.pop(key)
    elif edit == "a list":
        saved = [saved]
    changed = edit not in ("none", "wrapped", "whole model", "non-contiguous", "bfloat16", "float64")
    suffix = ".pt" if edit in ("non-contiguous", "sparse", "meta", "not a tensor", "int key", "a list") else draw(
        st.sampled_from([".pt", ".safetensors"]))

    config = {"model_type": "vit_mae", "hidden_act": "gelu", "layer_norm_eps": 1e-12, "qkv_bias": True,
              **{k: sizes[v] for k, v in RAE_SIZE_KEYS.items()}}
    target = draw(st.sampled_from(["none", "none", *RAE_SIZE_KEYS, "hidden_act", "layer_norm_eps", "qkv_bias",
                                   "not an object"]))
    if target in RAE_SIZE_KEYS:
        config[target] = draw(st.sampled_from([None, "16", 16.5, True, 0, -2, 1, 4, 2**20, 10**6, "absent"]))
        if config[target] == "absent":
            del config[target]
    elif target == "hidden_act":
        config[target] = draw(st.sampled_from(["relu", None, 1]))
    elif target == "layer_norm_eps":
        config[target] = draw(st.sampled_from([1e-6, 1, "abc", None, 0, -1.0, [1e-6], float("inf")]))
    elif target == "qkv_bias":
        config[target] = draw(st.sampled_from([False, "false", 0, None]))
    elif target == "not an object":
        config = list(config.items())
    return saved, suffix, config, None if changed else loads_as


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@given(rae_releases())
def test_hostile_rae_releases_decode_as_raes_decoder_or_are_one_clear_error(dinov2_dir, release):
    """VQRAE.from_rae (the path RAE's released decoders enter by) on hostile weights and configs: the model's decoder
    paints what RAE's GeneralDecoder built from that config paints with those weights (to 1e-5), or ValueError
    before any decoder is built. A release whose weights were edited out of shape is never accepted."""
    from rae_reference import ReferenceDecoder
    from safetensors.torch import save_file as save_safetensors

    saved, suffix, config, loads_as = release
    with tempfile.TemporaryDirectory() as tmp, no_hang():
        weights, config_dir = os.path.join(tmp, "model" + suffix), os.path.join(tmp, "config")
        if suffix == ".safetensors":
            save_safetensors({k: v.contiguous() for k, v in saved.items()}, weights)
        else:
            torch.save(saved, weights)
        os.makedirs(config_dir)
        with open(os.path.join(config_dir, "config.json"), "w") as f:
            json.dump(config, f)
        try:
            model = VQRAE.from_rae(weights, config_dir, encoder_config_path=dinov2_dir, encoder_input_size=IMAGE_SIZE,
                                   decoder_patch_size=8)
        except ValueError as err:
            assert str(err)
            event("RAE release: refused")
            return
    event("RAE release: loaded")
    assert loads_as is not None, "weights edited out of shape were accepted"
    sizes = {**RAE_DECODER, **{v: config.get(k, RAE_DECODER[v]) for k, v in RAE_SIZE_KEYS.items()}}
    reference = ReferenceDecoder(sizes["latent"], sizes["hidden"], sizes["layers"], sizes["heads"],
                                 sizes["intermediate"], patch_size=8, num_patches=16,
                                 eps=float(config.get("layer_norm_eps", 1e-12)))
    reference.load_rae_state_dict(loads_as).eval()
    z = torch.randn(2, 16, RAE_DECODER["latent"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model.decoder.eval()(z, (4, 4)) - reference(z)).abs().max().item()
    assert diff <= 1e-5, diff


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers(-3, 3) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=8)


@given(st.one_of(st.fixed_dictionaries({}, optional={"image_mean": json_values, "image_std": json_values}),
                 st.fixed_dictionaries({"image_mean": st.lists(st.floats(-2, 2), min_size=3, max_size=3),
                                        "image_std": st.lists(st.floats(0, 2), min_size=3, max_size=3)}),
                 json_values))
def test_hostile_preprocessor_configs_give_finite_statistics_or_one_clear_error(config):
    """model.encoders.read_image_stats on an encoder folder's preprocessor_config.json: three means from -1000 to 1000,
    stds from 1e-6 to 1000 (the family's defaults where a key is absent), or ValueError."""
    from stage1.model.encoders import read_image_stats

    with tempfile.TemporaryDirectory() as tmp, no_hang():
        with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
            json.dump(config, f)
        try:
            mean, std = read_image_stats(tmp, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        except ValueError as err:
            assert str(err)
            event("preprocessor: refused")
            return
    event("preprocessor: read")
    assert len(mean) == len(std) == 3 and all(abs(v) <= 1000 for v in mean + std) and min(std) >= 1e-6


VAR_TEST_SCALES, VAR_TEST_K = (1, 2, 3), 8


@given(st.lists(st.tuples(st.sampled_from([1, 2, 3, 4, 9]), st.sampled_from(["flat", "map", "float", "list"]),
                          st.integers(-2, VAR_TEST_K + 1), st.integers(1, 3)), max_size=5))
def test_hostile_scale_code_lists_are_whole_scales_in_range_or_one_clear_error(parts):
    """model.var.check_scale_codes (what VARTokenizer's idxBl_to_img, teacher forcing take): VAR's per-scale codes,
    in hostile orders, lengths, batches, dtypes and values: the flat codes of whole scales in order inside the
    vocabulary, or ValueError."""
    from stage1.model.quantizers.base import CodeLayout
    from stage1.model.var import check_scale_codes

    layout = CodeLayout(VAR_TEST_K, scales=VAR_TEST_SCALES, codebooks=len(VAR_TEST_SCALES))
    given_codes = []
    for side, form, value, batch in parts:
        codes = torch.full((batch, side * side), value)
        given_codes.append(codes.float() if form == "float" else codes.tolist() if form == "list"
                           else codes.reshape(batch, side, side) if form == "map" else codes)
    try:
        flats = check_scale_codes(layout, given_codes)
    except ValueError as err:
        assert str(err)
        event("scale codes: refused")
        return
    event("scale codes: accepted")
    assert [f.shape[1] for f in flats] == [s * s for s in VAR_TEST_SCALES[: len(flats)]]
    assert len({f.shape[0] for f in flats}) == 1 and all(0 <= int(f.min()) and int(f.max()) < VAR_TEST_K
                                                         for f in flats)


@given(st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(0, 5)),
       st.sampled_from(["long", "int32", "uint8", "float", "bool", "list"]), st.integers(-2, 66),
       st.one_of(st.none(), st.lists(st.one_of(st.integers(-1, 5), st.floats(0, 5), st.none()), max_size=5)),
       st.booleans(), st.sampled_from(["grid", "flat"]))
def test_hostile_code_grids_decode_through_the_llamagen_adapter_or_are_one_clear_error(model, counts, dtype, value,
                                                                                       shape, channel_first, form):
    """LlamaGenTokenizer.decode_code (what LlamaGen's samplers and Halton-MaskGIT call) on codes of hostile counts,
    dtypes and values, with hostile `shape` lists: images in [-1, 1], one per code grid, painted at the decoder's
    patch per code, or ValueError."""
    from stage1 import LlamaGenTokenizer

    b, h, w = counts
    codes = torch.full((b, h, w) if form == "grid" else (b, h * w), value)
    codes = codes.tolist() if dtype == "list" else codes.to(getattr(torch, dtype))
    tokenizer = LlamaGenTokenizer(model.model)
    try:
        with no_hang():
            images = tokenizer.decode_code(codes, shape, channel_first)
    except ValueError as err:
        assert str(err)
        event("adapter codes: refused")
        return
    event("adapter codes: decoded")
    if shape is not None:  # LlamaGen's [B, C, h, w], or [B, h, w, C]
        b, h, w = (shape[0], shape[2], shape[3]) if channel_first else shape[:3]
    elif form == "flat":  # a flat list of codes must form a square grid
        h = w = math.isqrt(h * w)
    patch = model.model.config.decoder.patch_size
    assert images.shape == (b, 3, h * patch, w * patch) and b > 0
    assert images.min() >= -1 and images.max() <= 1 and 0 <= value < model.model.layout.vocab_size


@given(st.sampled_from(["single", "residual", "grouped", "multiscale", "simvq", "gumbel"]),
       st.sampled_from([1, 2, 16, 256]), st.sampled_from([2, 1024, 2**16, 2**20]), st.sampled_from([8, 64, 1024]))
def test_a_configs_product_is_built_within_the_bound_or_refused_before_allocating(kind, depth, codes, dim):
    """model.quantizers.build_quantizer on config products each field of which is within its own bound: over
    MAX_QUANTIZER_ELEMENTS it is one ValueError before the kind's constructor runs; the small ones build."""
    from stage1 import QuantizerConfig, build_quantizer
    from stage1.base.limits import MAX_QUANTIZER_ELEMENTS
    from stage1.model.quantizers import QUANTIZERS

    options = {"residual": {"depth": depth}, "grouped": {"groups": 2}, "multiscale": {"scales": (1, 2)}}.get(kind, {})
    config = QuantizerConfig(kind=kind, num_embeddings=codes, **options)
    elements = QUANTIZERS[kind].state_elements(config, dim)
    if elements > MAX_QUANTIZER_ELEMENTS:
        with mock.patch.object(QUANTIZERS[kind], "__init__", side_effect=AssertionError("allocated")), \
                pytest.raises(ValueError, match="more than the 268,435,456 accepted"):
            build_quantizer(config, dim)
        event("config product: refused")
    elif elements <= 1 << 20:
        assert build_quantizer(config, dim).layout.vocab_size > 0
        event("config product: built")


# ======================================================================================================================
# 9. Exports after reruns: every vqrae-tokenize layout against its manifest
# ======================================================================================================================
EXPORT_SIZE = 128  # the tiny encoder (patch 8) at 128 px: a 16 x 16 grid, which LlamaGen's 256 / 16 takes
EXPORT_POOL = ["cat/a.png", "cat/b.png", "dog/c.png", "dog/d.png", "dog/e.png"]


@pytest.fixture(scope="module")
def export_model(dinov2_dir, tmp_path_factory):
    from helpers import tiny_vqrae

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("export_model") / "model"
    tiny_vqrae(dinov2_dir, encoder_input_size=EXPORT_SIZE).save_pretrained(path)
    return str(path)


@st.composite
def export_runs(draw) -> tuple[str, list[tuple[frozenset, int, str]]]:
    """A layout and the runs of vqrae-tokenize into one --out: each over some of EXPORT_POOL's images, in shards of
    1 to 3, fresh, with --restart, resumed, or interrupted at its n-th file written (then run again as it was)."""
    fmt = draw(st.sampled_from(["llamagen", "maskgit", "wds", "jsonl", "memmap"]))
    run = st.tuples(st.frozensets(st.sampled_from(EXPORT_POOL), min_size=1), st.integers(1, 3),
                    st.sampled_from(["resume", "restart", "restart", "interrupt 1", "interrupt 3", "interrupt 6"]))
    return fmt, draw(st.lists(run, min_size=1, max_size=3))


def exported_codes(out: str, fmt: str) -> list[tuple[str | None, int, np.ndarray]]:
    """What a downstream reader of the `fmt` layout in `out` finds, as (image or None where the layout does not name
    it, label, flat codes), in its order: the folders listed, as LlamaGen's, Halton-MaskGIT's and webdataset's
    loaders list them."""
    found = []
    if fmt == "llamagen":
        (codes_dir,) = glob.glob(os.path.join(out, "llamagen", "imagenet*_codes"))
        names = sorted(os.listdir(codes_dir))
        assert names == [f"{i}.npy" for i in range(len(names))], names
        assert sorted(os.listdir(codes_dir.replace("_codes", "_labels"))) == names
        for name in names:
            label = np.load(os.path.join(codes_dir.replace("_codes", "_labels"), name))
            found.append((None, int(label[0]), np.load(os.path.join(codes_dir, name))[0, 0]))
    elif fmt == "maskgit":
        folder = os.path.join(out, "maskgit", "Train")
        names = sorted(os.listdir(folder))
        assert names == [f"{i:07d}.pth" for i in range(len(names))], names
        found = [(None, y, code.reshape(-1)) for _, code, y in read_like_maskgit(folder)]
    elif fmt == "wds":
        for tar_name in sorted(os.listdir(os.path.join(out, "wds"))):
            with tarfile.open(os.path.join(out, "wds", tar_name)) as tar:
                fields = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for key in sorted({name.split(".")[0] for name in fields}):
                found.append((fields[f"{key}.path.txt"].decode(), int(fields[f"{key}.cls"]),
                              np.load(io.BytesIO(fields[f"{key}.vq_feat.npy"])).reshape(-1)))
    elif fmt == "jsonl":
        with open(os.path.join(out, "tokens.jsonl")) as f:
            found = [(line["image"], line["class_id"], np.array(line["tokens"])) for line in map(json.loads, f)]
    else:
        index = json.loads(open(os.path.join(out, "codes_index.json")).read())["images"]
        codes, labels = np.load(os.path.join(out, "codes.npy")), np.load(os.path.join(out, "labels.npy"))
        assert len(index) == len(codes) == len(labels)
        found = [(path, int(label), code.reshape(-1)) for path, label, code in zip(index, labels, codes, strict=True)]
    return found


def assert_export_is_its_manifest(out: str, fmt: str) -> None:
    manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
    expected = [(entry["path"], entry["label"], np.load(os.path.join(out, entry["shard"]))[entry["row"]].reshape(-1))
                for entry in manifest["images"]]
    found = exported_codes(out, fmt)
    assert len(found) == len(expected), (len(found), len(expected))
    for (path, label, codes), (want_path, want_label, want_codes) in zip(found, expected, strict=True):
        assert path in (None, want_path) and label == want_label and np.array_equal(codes, want_codes), want_path


@contextlib.contextmanager
def killed_at_write(n: int):
    """A process killed as its n-th file (every file is written under a temporary name and renamed) would be renamed:
    that file and every later one are never written."""
    renamed, real_replace = [0], os.replace

    def replace(source, target):
        renamed[0] += 1
        if renamed[0] >= n:
            raise KeyboardInterrupt
        real_replace(source, target)

    with mock.patch("os.replace", replace), contextlib.suppress(KeyboardInterrupt):
        yield


@given(export_runs())
def test_every_export_is_its_manifest_after_reruns_restarts_and_interruptions(export_model, runs):
    """vqrae-tokenize --format F, run again into the same --out over other images, with --restart, resumed, or
    interrupted between two files it writes (a kill) and run again: after every run that finishes, the layout holds
    exactly the manifest's images, in its order, with their codes and labels (the downstream loaders list the
    folders, so a file of an earlier run is an image the user removed); a run that cannot go on is one error line
    that leaves a finished export as it was."""
    fmt, steps = runs
    with tempfile.TemporaryDirectory() as tmp, no_hang(60):
        tree, out = os.path.join(tmp, "tree"), os.path.join(tmp, "tokens")
        finished = False
        for images, shard_size, mode in steps:
            shutil.rmtree(tree, ignore_errors=True)
            for i, name in enumerate(EXPORT_POOL):
                if name in images:
                    os.makedirs(os.path.join(tree, os.path.dirname(name)), exist_ok=True)
                    pixels = smooth_images(1, size=EXPORT_SIZE, seed=i)[0].permute(1, 2, 0).numpy()
                    Image.fromarray((pixels * 255).astype(np.uint8)).save(os.path.join(tree, name))
            argv = ["--model", export_model, "--data", tree, "--out", out, "--format", fmt, "--shard-size",
                    str(shard_size), "--num-workers", "0", "--device", "cpu"] + (["--restart"] * (mode == "restart"))
            if mode.startswith("interrupt"):
                with killed_at_write(int(mode.split()[1])):
                    run_command(tokenize.main, argv)
                finished = False  # the same command again, as a user would after a kill
            code, stderr = run_command(tokenize.main, argv)
            if code == 0:
                assert_export_is_its_manifest(out, fmt)
                finished = True
                event(f"export run: finished ({mode.split()[0]})")
            else:
                assert_one_error(code, stderr, "vqrae-tokenize")
                note(stderr)
                event(f"export run: refused ({mode.split()[0]})")
                if finished:
                    assert_export_is_its_manifest(out, fmt)


# ======================================================================================================================
# The bugs this suite found, one minimal reproducer each, all fixed now: regression tests. (One found and not yet
# fixed is marked xfail(strict=True) here until it is: strict, so that its fix fails the run until the mark goes.)
# ======================================================================================================================
def _pax_tar(path: str, members: list[tuple[str, bytes, dict]]) -> str:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, pax in members:
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(data), pax
            tar.addfile(info, io.BytesIO(data))
    return path


def test_index_shard_does_not_loop_on_a_negative_pax_size(tmp_path):
    """Found: index_shard looped forever on a member whose pax size is -1536, which sends tarfile (before 3.12.12,
    CVE-2025-8194) back to the pax header itself."""
    shard = _pax_tar(str(tmp_path / "loop.tar"), [("a.txt", b"hello", {}), ("b.png", b"x" * 10, {"size": "-1536"})])
    with no_hang(3):
        entries = tar_shards.index_shard(shard)
    assert entries[-1][3] is not None and "negative size" in entries[-1][3]


def test_index_shard_refuses_a_negative_pax_size(tmp_path):
    """Found: a pax size of -1024 gave a problem-free entry of negative size, and TarIndex[name] then raised
    os.pread's ValueError instead of UnreadableImageError."""
    shard = _pax_tar(str(tmp_path / "neg.tar"), [("a.txt", b"hello", {}), ("b.png", b"x" * 10, {"size": "-1024"})])
    entries = tar_shards.index_shard(shard)
    assert all(size >= 0 for _, _, size, problem in entries if problem is None), entries
    index = tar_shards.TarIndex([shard])
    for name in index:
        with pytest.raises(UnreadableImageError):
            index[name]


def test_read_shard_does_not_spin_on_a_size_far_past_the_end(tmp_path):
    """Found: one member declaring 10^15 bytes (a pax size; GNU's base-256 size field declares as much) kept
    read_shard busy for as long as tarfile's stream seek read on past the end of the file (~1.5 s per 10 GB: about
    40 hours here)."""
    shard = _pax_tar(str(tmp_path / "huge.tar"), [("a.png", b"x", {"size": str(10**15)})])
    with no_hang(3):
        samples = tar_shards.read_shard(shard)
    assert [s.data for s in samples] == [None]


def test_sparse_members_cannot_amplify_a_tar(tmp_path):
    """Found: GNU sparse members (pax GNU.sparse.map / GNU.sparse.size) made read_shard return zeros up to
    MAX_IMAGE_BYTES each, more than the tar holds (10 kB -> 6 MB here, 768 MiB at the real bound), and index_shard
    read other bytes for them than read_shard."""
    with tarfile.open(tmp_path / "sparse.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"s{i}.png")
            info.size, info.pax_headers = 1, {"GNU.sparse.map": "0,1", "GNU.sparse.size": str(2_000_000)}
            tar.addfile(info, io.BytesIO(b"x"))
    shard = str(tmp_path / "sparse.tar")
    samples = tar_shards.read_shard(shard)
    assert sum(len(s.data or b"") for s in samples) <= os.path.getsize(shard)
    assert all(problem is not None for *_, problem in tar_shards.index_shard(shard))


def test_tar_names_stay_unique_when_one_looks_like_a_renamed_one(tmp_path):
    """Found: a path.txt ending in '#<n>' took the name read_shard gives a later repeated name, so two samples
    shared one name (and one was lost from SampleImages / TarIndex)."""
    png = png_bytes(0)
    with tarfile.open(tmp_path / "names.tar", "w") as tar:
        for key, name in (("k0", b"a.png#2"), ("k1", b"a.png"), ("k2", b"a.png")):
            for fld, data in (("png", png), ("path.txt", name)):
                info = tarfile.TarInfo(f"{key}.{fld}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    names = [s.name for s in tar_shards.read_shard(str(tmp_path / "names.tar"))]
    assert len(set(names)) == len(names), names  # was ['a.png#2', 'a.png', 'a.png#2']


@pytest.mark.parametrize("which", ["manifest.json", "config.json"])
def test_deeply_nested_json_is_one_clear_error(which, tokens_dir, model_dir, tmp_path):
    """Found: json's RecursionError on 200 kB of nested lists escaped base.atomic.read_json (manifest.json,
    config.json): vqrae-decode's traceback instead of one error line."""
    shutil.copytree(tokens_dir, tmp_path / "tokens")
    shutil.copytree(model_dir, tmp_path / "model")
    target = tmp_path / ("tokens" if which == "manifest.json" else "model") / which
    target.write_text("[" * 100_000 + "]" * 100_000)
    code, stderr = run_command(decode.main, ["--model", str(tmp_path / "model"), "--tokens", str(tmp_path / "tokens"),
                                             "--out", str(tmp_path / "out")])
    assert_one_error(code, stderr, "vqrae-decode")


@pytest.mark.parametrize("shape", ["(True, 4, 4)", "(9223372036854775808, 4, 4)", "(-1, 2147483648)"])
def test_npy_shard_headers_with_odd_integers_are_one_clear_error(shape, tokens_dir, tmp_path):
    """Found: an .npy shard header with a bool dimension, one of 2^63 or more, or negative ones whose product
    outweighs the header made numpy raise TypeError / OverflowError, which read_manifest let through."""
    shutil.copytree(tokens_dir, tmp_path / "tokens")
    header = ("{'descr': '|u1', 'fortran_order': False, 'shape': " + shape + ", }").encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    (tmp_path / "tokens" / "shard-00000.npy").write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header))
                                                          + header + bytes(32))
    with pytest.raises(ValueError, match="cannot read code shard"):
        token_shards.read_manifest(str(tmp_path / "tokens"))


def test_an_empty_shard_file_is_one_clear_error(model_dir, tokens_dir, tmp_path):
    """Found: a 0-byte .npy shard (a download cut off, a full disk) made np.load raise EOFError: vqrae-decode's
    traceback."""
    shutil.copytree(tokens_dir, tmp_path / "tokens")
    (tmp_path / "tokens" / "shard-00000.npy").write_bytes(b"")
    code, stderr = run_command(decode.main, ["--model", model_dir, "--tokens", str(tmp_path / "tokens"),
                                             "--out", str(tmp_path / "out")])
    assert_one_error(code, stderr, "vqrae-decode")


def test_float8_weights_are_one_clear_error(model_dir, tmp_path):
    """Found: a float tensor stored as float8_e4m3fn (safetensors F8_E4M3) in model.safetensors: torch.isfinite has
    no kernel for it, so load_weights raised NotImplementedError (a traceback in every command)."""
    shutil.copytree(model_dir, tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    state = load_file(weights)
    state["latent_mean"] = state["latent_mean"].to(torch.float8_e4m3fn)
    save_file(state, weights)
    with pytest.raises(ValueError):
        VQRAE.from_pretrained(tmp_path / "model")


@pytest.mark.parametrize("std", [0.0, 1e-40])
def test_a_zero_latent_std_is_refused_or_harmless(model_dir, tmp_path, std):
    """Found: latent_std of 0 (or a denormal) loaded silently: every latent was Inf / NaN and every image
    tokenized to code 0, the failure load_weights refuses NaN weights for."""
    shutil.copytree(model_dir, tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    state = load_file(weights)
    state["latent_std"] = torch.full_like(state["latent_std"], std)
    save_file(state, weights)
    try:
        loaded = VQRAE.from_pretrained(tmp_path / "model")
    except ValueError:
        return
    x = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loaded.features(x)).all()


def test_unknown_encoder_params_are_one_clear_error(model_dir, tokens_dir, tmp_path):
    """Found: config.json's encoder.params with an unknown key was a TypeError from the encoder's __init__, which
    the commands do not catch: a traceback."""
    shutil.copytree(model_dir, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config["encoder"]["params"] = {"bogus": 1}
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    code, stderr = run_command(decode.main, ["--model", str(tmp_path / "model"), "--tokens", tokens_dir,
                                             "--out", str(tmp_path / "out")])
    assert_one_error(code, stderr, "vqrae-decode")


def test_decode_errors_stay_one_line_with_a_newline_in_a_shard_name(model_dir, tokens_dir, tmp_path):
    """Found: errors quoted a manifest's shard name raw, so a newline in it split the one error line in two."""
    shutil.copytree(tokens_dir, tmp_path / "tokens")
    manifest = json.loads((tmp_path / "tokens" / "manifest.json").read_text())
    manifest["images"][0]["shard"] = "x\ny.npy"
    (tmp_path / "tokens" / "manifest.json").write_text(json.dumps(manifest))
    code, stderr = run_command(decode.main, ["--model", model_dir, "--tokens", str(tmp_path / "tokens"),
                                             "--out", str(tmp_path / "out")])
    assert_one_error(code, stderr, "vqrae-decode")


def test_too_elongated_images_are_named(tmp_path):
    """Found: prepare_image's UnreadableImageError names the file, but the resize bound's did not, so
    vqrae-reconstruct with several --image could not say which one is too elongated."""
    Image.new("RGB", (70000, 1)).save(tmp_path / "strip.png")
    with pytest.raises(UnreadableImageError, match="strip.png"):
        prepare_image(str(tmp_path / "strip.png"), 32)


def test_a_shard_list_is_bounded_as_a_whole():
    """Found: MAX_SHARDS bounded each '::' part, not the spec: k parts named up to k x MAX_SHARDS shards, each
    expanded in memory before any was checked."""
    with mock.patch.object(shard_specs, "MAX_SHARDS", 10), pytest.raises(ValueError, match="more than the 10"):
        shard_specs.shard_urls("https://h/{0..9}.tar::https://h/{0..9}.tar::https://h/{0..9}.tar")


def test_rae_query_key_value_of_different_shapes_are_one_clear_error():
    """Found: an RAE decoder file whose query weight was stored flat was torch.cat's RuntimeError ("Tensors must have
    same number of dimensions") in decoder_state_from_rae, before the shapes were compared with the decoder's."""
    from stage1.model.rae import decoder_state_from_rae

    prefix = "decoder_layers.0.attention.attention"
    state = {f"{prefix}.{part}.weight": torch.ones(4, 4) for part in ("query", "key", "value")}
    state[f"{prefix}.query.weight"] = torch.ones(16)
    with pytest.raises(ValueError, match="query, key and value weights are of shapes"):
        decoder_state_from_rae(state)


@pytest.mark.parametrize("codes, shape", [([[0, 1], [2, 3]], None), (torch.zeros(1, 4, dtype=torch.long), []),
                                          (torch.zeros(1, 4, dtype=torch.long), [None, 8, 2, None])])
def test_the_llamagen_adapter_refuses_codes_and_shapes_it_cannot_read(model, codes, shape):
    """Found: decode_code took a list of codes to an AttributeError, a short shape list to an IndexError and a shape
    of None to a TypeError."""
    from stage1 import LlamaGenTokenizer

    with pytest.raises(ValueError, match="codes must be a tensor|shape must be 4 positive integers"):
        LlamaGenTokenizer(model.model).decode_code(codes, shape)

