"""Issue 20: files from other people, one case each (tests/test_fuzz.py generates many more). Every case ends in a
result that is right, a skipped sample that is listed, or one clear error; none allocates what a file declares
before it is checked."""

import io
import json
import os
import re
import shutil
import struct
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from helpers import IMAGE_SIZE, run_training, smooth_images, step_logs, tiny_vqrae
from PIL import Image
from safetensors.torch import save_file

from stage1 import VQRAE
from stage1.base.tensor_files import read_tensor_file
from stage1.cli import decode, fit_codebook, tokenize
from stage1.data import shard_specs, tar_shards
from stage1.data.images import MAX_RESIZED_PIXELS, UnreadableImageError
from stage1.data.input_pipeline import prepare_image
from stage1.data.shard_specs import ShardSpecError, is_tar_source, shard_urls
from stage1.data.tar_shards import TarIndex, index_shard, read_shard


def png_bytes(seed: int = 0, size: int = 24) -> bytes:
    pixels = (smooth_images(1, size=size, seed=seed)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="png")
    return buffer.getvalue()


def write_tar(path, members) -> str:
    """members: (name, bytes) in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return str(path)


# ---- shard specs --------------------------------------------------------------------------------------------------
def test_shard_specs_accept_tars_and_streams_and_refuse_spec_files(tmp_path):
    shards = [write_tar(tmp_path / f"{i}.tar", [("a.png", png_bytes(i))]) for i in range(2)]
    assert shard_urls(str(tmp_path / "{0..1}.tar")) == shards
    assert shard_urls(f"{shards[1]}::{shards[0]}") == shards[::-1]
    assert shard_urls("pipe:cat x.tar::https://host/{0..2}.tar") == [
        "pipe:cat x.tar", "https://host/0.tar", "https://host/1.tar", "https://host/2.tar"]
    # webdataset reads a .yaml "shard" as a list of shards whose entries may be shell commands: never read.
    spec = tmp_path / "evil.yaml"
    spec.write_text("datasets:\n  - name: x\n    shards: ['pipe:touch pwned.tar']\n")
    for data in (str(spec), f"{shards[0]}::{spec}"):
        with pytest.raises(ShardSpecError, match="is not a tar file.*shard spec files such as .yaml are not read"):
            shard_urls(data)
    with pytest.raises(ShardSpecError, match="is a folder"):
        shard_urls(f"{shards[0]}::{tmp_path}")
    with pytest.raises(FileNotFoundError, match=r"tar shard\(s\) not found: .*/2.tar"):
        shard_urls(str(tmp_path / "{0..2}.tar"))
    with pytest.raises(FileNotFoundError, match="does not exist: expected an image folder, or tar shards"):
        shard_urls(str(tmp_path / "nowhere"))
    with pytest.raises(ShardSpecError, match="Unbalanced braces"):
        shard_urls(str(tmp_path / "{0..1.tar"))


def test_a_brace_pattern_is_bounded_before_it_is_expanded():
    # braceexpand lists a range all at once: this one would take all memory. Refused at once, from the pattern.
    with pytest.raises(ShardSpecError, match=r"names up to 1,000,000,000,000 shards, more than the 1,000,000"):
        shard_urls("shards/{000000000000..999999999999}.tar")
    with pytest.raises(ShardSpecError, match=r"up to 1,000,000,000,000 shards"):
        shard_urls("https://host/{0..9999}-{0..9999}-{0..9999}.tar")
    assert shard_specs._count_bound("s/{0..9}/{a,b,c}-{0..99..10}.tar") == 10 * 3 * 10 == len(
        shard_urls("https://h/s/{0..9}/{a,b,c}-{0..99..10}.tar"))


def test_a_folder_named_like_a_tar_is_an_image_folder(tmp_path):
    folder = tmp_path / "photos.tar.d"
    folder.mkdir()
    assert not is_tar_source(str(folder)) and is_tar_source(str(tmp_path / "x.tar"))


# ---- tar shards ---------------------------------------------------------------------------------------------------
def test_bad_samples_are_skipped_and_listed_naming_the_tar_and_the_sample(tmp_path):
    good, other = png_bytes(0), png_bytes(1)
    shard = write_tar(tmp_path / "s.tar", [
        ("a.png", good), ("a.cls", b"3"), ("a.path.txt", b"cats/a.png"),
        ("b.png", other), ("b.cls", b"three"),  # not an integer
        ("c.png", other), ("c.path.txt", b"\xff\xfe.png"),  # not UTF-8
        ("d.png", other), ("d.png", other),  # a field twice (webdataset: a raw tuple in a ValueError)
        ("e.png", other), ("e.path.txt", b"cats/a.png"),  # a name given before
        ("f.cls", b"1"),  # no image
        ("g.png", other), ("g.cls", b"99999999999999999999"),  # no class id fits int64 -> np.int64 would overflow
        ("h.json", b"{}" * 10), ("h.png", good),  # fields not used are not read
    ])
    samples = read_shard(shard)
    assert [(s.name, s.label) for s in samples if s.problem is None] == [("cats/a.png", 3), ("h.png", -1)]
    assert samples[0].data == good and samples[-1].data == good
    problems = {s.name: s.problem for s in samples if s.problem is not None}
    assert all(p.startswith(f"{shard}, sample ") and s_data is None
               for p, s_data in zip(problems.values(), [s.data for s in samples if s.problem], strict=True))
    assert "its cls b'three' is not a class id" in problems["b.png"]
    assert "its path.txt is not UTF-8 text" in problems["c.png"]
    assert "its png is given twice" in problems["d.png"]
    again = next(name for name in problems if name.startswith("cats/a.png#"))  # a name of its own
    assert "a sample before it is also named cats/a.png" in problems[again]
    assert "it has no image field" in problems["f.missing"]
    assert "is not a class id" in problems["g.png"]
    # The indexed reader (training, vqrae-fit-codebook) sees the same samples, names and problems.
    index = TarIndex([shard])
    assert index.names == [s.name for s in samples] and index["cats/a.png"] == good
    with pytest.raises(UnreadableImageError, match="its cls b'three' is not a class id"):
        index["b.png"]


def test_oversized_members_are_never_read(tmp_path, monkeypatch):
    monkeypatch.setattr(tar_shards, "MAX_IMAGE_BYTES", 1000)
    big, small = png_bytes(0, size=64), png_bytes(1, size=4)
    assert len(big) > 1000 > len(small)
    shard = write_tar(tmp_path / "s.tar", [("a.png", big), ("b.png", small)])
    samples = read_shard(shard)
    assert samples[0].data is None and f"its png is {len(big):,} bytes, over the 1,000 accepted" in samples[0].problem
    assert samples[1].data == small and samples[1].problem is None
    assert [entry[3] is None for entry in index_shard(shard)] == [False, True]


def test_a_truncated_tar_keeps_the_samples_before_the_break(tmp_path):
    full = write_tar(tmp_path / "full.tar", [(f"{i}.png", png_bytes(i)) for i in range(3)])
    with open(full, "rb") as f:
        data = f.read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: 512 + len(png_bytes(0)) + 512 + 100])  # the second image's data cut short
    samples = read_shard(str(cut))
    assert samples[0].name == "0.png" and samples[0].data == png_bytes(0)
    assert samples[-1].name == f"{cut} (after sample 1)" and samples[-1].data is None
    assert "is damaged or ends early after 1 sample(s)" in samples[-1].problem
    assert "the rest of the shard is skipped" in samples[-1].problem
    # A header whose size lies beyond the file: the indexed reader lists it, reads nothing.
    liar = bytearray(data)
    liar[124:136] = b"77777777777\0"  # the first member's size field (octal): 8 GiB
    struct.pack_into("8s", liar, 148, b"        ")  # the checksum is recomputed over spaces
    liar[148:156] = (b"%06o\0 " % sum(liar[:512]))
    (tmp_path / "liar.tar").write_bytes(bytes(liar))
    entries = index_shard(str(tmp_path / "liar.tar"))
    assert entries and all(problem is not None for *_, problem in entries)
    assert all(problem is not None for problem in (s.problem for s in read_shard(str(tmp_path / "liar.tar"))))
    for junk in (b"", b"not a tar at all" * 100):
        (tmp_path / "junk.tar").write_bytes(junk)
        assert [s.data for s in read_shard(str(tmp_path / "junk.tar"))] in ([], [None])


def test_vqrae_tokenize_lists_bad_samples_and_goes_on(model_dir, tmp_path):
    shard = write_tar(tmp_path / "s.tar", [("a.png", png_bytes(0)), ("a.cls", b"1"),
                                           ("b.png", png_bytes(1)), ("b.cls", b"x"), ("c.png", png_bytes(2))])
    out = tmp_path / "tokens"
    assert tokenize.main(["--model", model_dir, "--data", shard, "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(e["path"], e["label"]) for e in manifest["images"]] == [("a.png", 1), ("c.png", -1)]
    assert [s["path"] for s in manifest["skipped"]] == ["b.png"]
    assert f"{shard}, sample b: its cls b'x' is not a class id" in manifest["skipped"][0]["reason"]


# ---- images -------------------------------------------------------------------------------------------------------
def test_an_image_too_elongated_to_resize_is_unreadable_not_a_memory_explosion(tmp_path):
    # 1 x 70000 pixels: small, but at 256 px on its shorter side, 256 x 17.9 million.
    Image.new("RGB", (70000, 1), (200, 10, 10)).save(tmp_path / "strip.png")
    with pytest.raises(UnreadableImageError, match=f"too elongated.*more than {MAX_RESIZED_PIXELS:,} pixels"):
        prepare_image(str(tmp_path / "strip.png"), 256)
    for crop in ("center", "adm"):  # a long image within the bound is fine
        Image.new("RGB", (600, 20), (200, 10, 10)).save(tmp_path / "wide.png")
        image, _ = prepare_image(str(tmp_path / "wide.png"), 32, crop=crop)
        assert image.shape == (3, 32, 32) and abs(image[0].mean().item() - 200 / 255) < 0.01


# ---- sizes a file declares ----------------------------------------------------------------------------------------
def test_config_json_sizes_are_checked_against_its_weights_before_anything_is_built(model_dir, tmp_path):
    import shutil

    for key, value in (("hidden_size", 65536), ("num_hidden_layers", 100000), ("patch_size", 4096)):
        folder = tmp_path / key
        shutil.copytree(model_dir, folder)
        config = json.loads((folder / "config.json").read_text())
        config["decoder"][key] = value
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="describes a decoder and codebook of at least|at most 1e"):
            VQRAE.from_pretrained(folder)  # at once: nothing of these sizes is allocated
    folder = tmp_path / "codes"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantizer"]["num_embeddings"] = 1 << 30
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantizer.num_embeddings must be from 1 to 1,048,576"):
        VQRAE.from_pretrained(folder)


def test_an_encoder_folder_must_hold_the_weights_its_config_describes(dinov2_dir, tmp_path):
    import shutil

    big = tmp_path / "big"
    shutil.copytree(dinov2_dir, big)
    config = json.loads((big / "config.json").read_text())
    config.update(hidden_size=65536, intermediate_size=262144, num_hidden_layers=64)
    (big / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="its config.json describes 64 layers of width 65536"):
        tiny_vqrae(str(big))
    # Weights missing from the folder would be random numbers in transformers: refused, naming them.
    partial = tmp_path / "partial"
    shutil.copytree(dinov2_dir, partial)
    from safetensors.torch import load_file

    state = load_file(partial / "model.safetensors")
    del state["embeddings.patch_embeddings.projection.weight"]
    state["padding"] = torch.zeros(10_000)  # so the layers still fit in what the file holds
    save_file(state, partial / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks 1 weight\(s\).*projection.weight.*would be random"):
        tiny_vqrae(str(partial))


def test_manifest_image_size_and_shard_headers_are_bounded(model_dir, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png_bytes(0, size=IMAGE_SIZE))
    tokens = tmp_path / "tokens"
    assert tokenize.main(["--model", model_dir, "--data", str(images), "--out", str(tokens)]) == 0
    manifest = json.loads((tokens / "manifest.json").read_text())
    manifest["image_size"] = 10**9  # vqrae-decode would paint 10^9 x 10^9 pixels
    (tokens / "manifest.json").write_text(json.dumps(manifest))
    assert decode.main(["--model", model_dir, "--tokens", str(tokens), "--out", str(tmp_path / "out")]) == 2
    assert "manifest.image_size must be from 1 to 8,192, got 1000000000" in capsys.readouterr().err
    manifest["image_size"] = IMAGE_SIZE
    (tokens / "manifest.json").write_text(json.dumps(manifest))
    # A shard header declaring 10^12 rows over a file of a few bytes: mapped, never allocated.
    shard = tokens / manifest["images"][0]["shard"]
    array = np.load(shard)
    header = {"descr": array.dtype.str, "fortran_order": False, "shape": (10**12, *array.shape[1:])}
    with open(shard, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(array.tobytes())
    assert decode.main(["--model", model_dir, "--tokens", str(tokens), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read code shard" in err and not (tmp_path / "out").exists()


def test_torch_files_are_read_only_as_torch_save_writes_them(tmp_path):
    torch.save({"w": torch.arange(4.0)}, tmp_path / "plain.pt")
    assert torch.equal(read_tensor_file(str(tmp_path / "plain.pt"), "stats")["w"], torch.arange(4.0))
    # The same file with its entries deflated: torch.load would inflate any size (a zip bomb). Refused.
    with zipfile.ZipFile(tmp_path / "plain.pt") as src, zipfile.ZipFile(tmp_path / "bomb.pt", "w",
                                                                        zipfile.ZIP_DEFLATED) as dst:
        for entry in src.infolist():
            dst.writestr(entry.filename, src.read(entry.filename))
    with pytest.raises(ValueError, match="holds compressed entries.*which torch.save never writes"):
        read_tensor_file(str(tmp_path / "bomb.pt"), "stats")
    torch.save({"w": torch.arange(4.0)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="is not a torch zip file"):
        read_tensor_file(str(tmp_path / "legacy.pt"), "stats")


def test_image_size_arguments_are_bounded(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_code:
        tokenize.main(["--model", model_dir, "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                       "--image-size", "100000"])
    assert exit_code.value.code == 2
    assert "expected a side from 1 to 8192 pixels, got '100000'" in capsys.readouterr().err


def test_training_reads_past_bad_tar_samples(tmp_path):
    from stage1.data.datasets import build_transform
    from stage1.data.tar_shards import TarImageDataset, TarStream

    shard = write_tar(tmp_path / "s.tar", [("a.png", png_bytes(0)), ("a.cls", b"x"), ("b.png", png_bytes(1))])
    transform = build_transform(16, "center_crop", hflip=False)
    indexed = TarImageDataset(shard, transform)
    with pytest.warns(UserWarning, match="skipping unreadable image a.png"):
        first = indexed[(0, 0)]  # a: its cls is junk, so b stands in, and the skip is counted
    assert first["skipped"] == 1 and torch.equal(first["image"], indexed[(1, 0)]["image"])
    with pytest.warns(UserWarning, match=r"skipping unreadable image a.png: .*its cls b'x' is not a class id"):
        streamed = [sample["skipped"] for sample in TarStream([shard], transform).for_rank(0, 1, 1, 1, epochs=1)]
    assert sorted(streamed) == [0, 1]


def test_a_model_card_reads_a_foreign_train_config_without_failing(tmp_path):
    from stage1.model.hub import training_summary

    (tmp_path / "final").mkdir()
    for text, expected in (("train: {steps: 10, batch_size: 4}", {"steps": 10, "batch_size": 4}),
                           ("- a list", None), ("train: [1, 2]", None), ("train: {steps: '10'}", None),
                           ("{unclosed", None)):
        (tmp_path / "train_config.yaml").write_text(text)
        assert training_summary(str(tmp_path / "final")) == expected


def test_latent_stats_and_rae_decoders_must_be_finite(tmp_path):
    from stage1.model.latent_stats import read_latent_stats
    from stage1.model.rae import read_rae_decoder

    good = {"mean": torch.zeros(8), "var": torch.ones(8)}
    torch.save(good, tmp_path / "stat.pt")
    mean, std = read_latent_stats(str(tmp_path / "stat.pt"), 8)
    assert torch.allclose(std, torch.full((8,), (1 + 1e-5) ** 0.5))
    for name, bad in (("nan", {"var": torch.full((8,), float("nan"))}), ("negative", {"var": -torch.ones(8)}),
                      ("inf", {"mean": torch.full((8,), float("inf"))})):
        torch.save({**good, **bad}, tmp_path / f"{name}.pt")
        with pytest.raises(ValueError, match="must be finite and var >= 0"):
            read_latent_stats(str(tmp_path / f"{name}.pt"), 8)
    torch.save({**good, "var": torch.ones(8, dtype=torch.int64)}, tmp_path / "int.pt")
    with pytest.raises(ValueError, match="must be floating-point tensors"):
        read_latent_stats(str(tmp_path / "int.pt"), 8)
    torch.save({"decoder_embed.weight": torch.tensor([[1.0, float("nan")]])}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"must be finite floating-point tensors; \['decoder_embed.weight'\]"):
        read_rae_decoder(str(tmp_path / "model.pt"))


def test_codes_outside_the_codebook_are_refused_before_anything_is_decoded(model_dir, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(png_bytes(i, size=IMAGE_SIZE))
    tokens = tmp_path / "tokens"
    assert tokenize.main(["--model", model_dir, "--data", str(images), "--out", str(tokens), "--shard-size", "2",
                          "--index-dtype", "int32"]) == 0
    shard = tokens / "shard-00001.npy"  # the second shard: vqrae-decode would have written the first's images
    codes = np.load(shard)
    codes[0, 0, 0] = 64  # the codebook has 64 codes
    np.save(shard, codes)
    assert decode.main(["--model", model_dir, "--tokens", str(tokens), "--out", str(tmp_path / "out"),
                        "--batch-size", "1"]) == 2
    assert re.search(r"shard-00001.npy holds codes from \d+ to 64, outside the manifest.s codebook of 64",
                     capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_a_trainer_state_is_read_like_every_torch_file(tmp_path):
    from stage1.train.checkpoint import STATE_NAME, read_state

    torch.save({"step": 3, "rng": torch.arange(3)}, tmp_path / STATE_NAME)
    assert read_state(str(tmp_path))["step"] == 3
    with zipfile.ZipFile(tmp_path / STATE_NAME) as src:
        entries = {entry.filename: src.read(entry.filename) for entry in src.infolist()}
    with zipfile.ZipFile(tmp_path / STATE_NAME, "w", zipfile.ZIP_DEFLATED) as dst:
        for name, data in entries.items():
            dst.writestr(name, data)
    with pytest.raises(ValueError, match="trainer state .* holds compressed entries"):
        read_state(str(tmp_path))
    torch.save([1, 2], tmp_path / STATE_NAME)
    with pytest.raises(ValueError, match="is not a trainer state"):
        read_state(str(tmp_path))


def test_a_symlink_loop_in_an_image_folder_yields_each_real_image_once(tmp_path):
    """Issue 32, point 7: a link back up the tree yielded one photo 41 times (again/again/.../rocket.jpg); two names
    of one file are one image, under its first name in sorted order."""
    import os
    import shutil

    from helpers import REPO_ROOT

    from stage1.data.datasets import find_images

    (tmp_path / "a").mkdir()
    shutil.copy(os.path.join(REPO_ROOT, "assets", "rocket.jpg"), tmp_path / "a" / "rocket.jpg")
    os.symlink(tmp_path, tmp_path / "a" / "again")  # a loop
    os.symlink(tmp_path / "a" / "rocket.jpg", tmp_path / "link.jpg")  # a second name for the same file
    (tmp_path / "b").mkdir()
    shutil.copy(os.path.join(REPO_ROOT, "assets", "chelsea.jpg"), tmp_path / "b" / "chelsea.jpg")
    assert find_images(str(tmp_path)) == ["a/rocket.jpg", "b/chelsea.jpg"]


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")  # torch's, on loading one
@pytest.mark.parametrize("kind", ["sparse", "meta"])
def test_sparse_or_meta_tensors_in_rae_files_are_one_error(tmp_path, kind):
    """Issue 32, point 2: weights_only loads sparse and meta tensors, which then crashed deep in torch
    (aten::ne.Scalar on SparseCPU, Tensor.item() on meta); every torch file is read densely or refused."""
    from stage1.model.latent_stats import read_latent_stats
    from stage1.model.rae import read_rae_decoder

    odd = torch.eye(8).to_sparse() if kind == "sparse" else torch.empty(8, 8, device="meta")
    torch.save({"mean": odd[0] if kind == "meta" else odd, "var": torch.ones(8)}, tmp_path / "stat.pt")
    torch.save({"decoder_embed.weight": odd}, tmp_path / "model.pt")
    expected = "a meta tensor" if kind == "meta" else "a torch.sparse_coo tensor"
    with pytest.raises(ValueError, match=rf"stat.pt: mean is {expected}"):
        read_latent_stats(str(tmp_path / "stat.pt"), 8)
    with pytest.raises(ValueError, match=rf"model.pt: decoder_embed.weight is {expected}"):
        read_rae_decoder(str(tmp_path / "model.pt"))


def test_tensors_that_do_not_hold_their_values_or_of_odd_dtypes_are_one_error(tmp_path):
    """A second probe of issue 32's RAE files: a stride-0 view of one float standing for 10^13 (a few-KB file whose
    isfinite allocated 40 TB), float8 tensors (isfinite is not implemented for them), 0-dim query / key / value
    (torch.cat's RuntimeError), a stat.pt key that is not a string (a TypeError in the error message), and a legacy
    torch file with a zip's end record appended (zipfile took it for a zip, torch read it as legacy)."""
    import io

    from stage1.model.latent_stats import read_latent_stats
    from stage1.model.rae import decoder_state_from_rae, read_rae_decoder

    torch.save({"decoder_embed.weight": torch.zeros(1).expand(100000, 100000, 1000)}, tmp_path / "expanded.pt")
    with pytest.raises(ValueError, match=r"decoder_embed.weight of shape \[100000, 100000, 1000\] is a view of 4 "
                                         r"bytes"):
        read_rae_decoder(str(tmp_path / "expanded.pt"))
    torch.save({"mean": torch.zeros(8).to(torch.float8_e4m3fn), "var": torch.ones(8)}, tmp_path / "float8.pt")
    with pytest.raises(ValueError, match="mean is torch.float8_e4m3fn; expected one of"):
        read_latent_stats(str(tmp_path / "float8.pt"), 8)
    prefix = "decoder_layers.0.attention.attention"
    with pytest.raises(ValueError, match="expected one shape of at least one dimension"):
        decoder_state_from_rae({f"{prefix}.{part}.bias": torch.tensor(0.5) for part in ("query", "key", "value")})
    torch.save({1: torch.zeros(8), "var": torch.ones(8)}, tmp_path / "int_key.pt")
    with pytest.raises(ValueError, match=r"must hold tensors 'mean' and 'var' \(or 'std'\); found \['1', 'var'\]"):
        read_latent_stats(str(tmp_path / "int_key.pt"), 8)
    legacy = io.BytesIO()
    torch.save({"decoder_embed.weight": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    (tmp_path / "legacy.pt").write_bytes(legacy.getvalue() + b"PK\x05\x06" + b"\0" * 18)
    with pytest.raises(ValueError, match="is not a torch zip file"):
        read_rae_decoder(str(tmp_path / "legacy.pt"))
    # Views that hold their values are read as they are: a transposed weight, a slice of a larger storage.
    base = torch.arange(12.0).reshape(3, 4)
    torch.save({"t": base.T, "row": base[1]}, tmp_path / "views.pt")
    read = read_tensor_file(str(tmp_path / "views.pt"), "views")
    assert torch.equal(read["t"], base.T) and torch.equal(read["row"], base[1])


def test_weights_must_be_finite_as_the_model_holds_them(model_dir, dinov2_dir, tmp_path):
    """A second probe of issue 32: a float64 codebook entry of 1e300 is finite in the file and Inf in float32 (PSNR
    nan, exit 0), and an encoder with NaN weights gave every image one code."""
    from safetensors.torch import load_file

    shutil.copytree(model_dir, tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    state = load_file(weights)
    state["quantizer.embedding"] = state["quantizer.embedding"].double()
    state["quantizer.embedding"][0, 0] = 1e300
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"NaN or Inf in \['quantizer.embedding'\]"):
        VQRAE.from_pretrained(tmp_path / "model")
    shutil.copytree(dinov2_dir, tmp_path / "encoder")
    encoder_weights = tmp_path / "encoder" / "model.safetensors"
    state = load_file(encoder_weights)
    name = next(k for k in state if "patch_embeddings.projection.weight" in k)
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, encoder_weights)
    with pytest.raises(ValueError, match="has NaN or Inf weights in .*patch_embeddings"):
        tiny_vqrae(str(tmp_path / "encoder"))


def test_a_file_name_that_is_not_utf8_is_written_printable(tmp_path):
    """A second probe of issue 32: one image named with a byte that is not UTF-8 stopped vqrae-make-shards ("'utf-8'
    codec can't encode character '\\udce9'") without naming it; its path.txt is now written as \\xNN, and the
    sample reads back."""
    from stage1.data.tar_shards import write_shards

    folder = os.fsencode(tmp_path / "images")
    os.makedirs(folder)
    with open(folder + b"/caf\xe9.png", "wb") as f:
        f.write(png_bytes(3, size=IMAGE_SIZE))
    (shard,) = write_shards(os.fsdecode(folder), str(tmp_path / "shards"), 10)
    (sample,) = read_shard(shard)
    assert sample.name == "caf\\xe9.png" and sample.data == png_bytes(3, size=IMAGE_SIZE)


def test_an_image_file_past_the_size_bound_is_not_read_into_a_shard(tmp_path, monkeypatch):
    """A second probe of issue 32: vqrae-make-shards read every image file whole (a 7 GB sparse one was a MemoryError);
    one past MAX_IMAGE_BYTES is left out unread, and its sample is listed as having no image when read back."""
    from stage1.data.tar_shards import write_shards

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "big.png").write_bytes(png_bytes(4, size=IMAGE_SIZE))
    (tmp_path / "images" / "small.png").write_bytes(png_bytes(5, size=2))
    monkeypatch.setattr(tar_shards, "MAX_IMAGE_BYTES", len(png_bytes(5, size=2)))
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    (shard,) = write_shards(str(tmp_path / "images"), str(tmp_path / "shards"), 10)
    assert not any(path.endswith("big.png") for path in opened)
    monkeypatch.undo()
    samples = read_shard(shard)
    assert [(s.name, s.data is None) for s in samples] == [("big.png", True), ("small.png", False)]


def test_json_and_yaml_are_read_from_regular_files_only(tmp_path):
    """A second probe: a FIFO named classes.json, results.json or a searchpath's x.yaml blocked its reader forever."""
    from stage1.base.atomic import read_json, read_yaml

    os.mkfifo(tmp_path / "classes.json")
    os.mkfifo(tmp_path / "x.yaml")
    with pytest.raises(ValueError, match="classes.json is not a regular file"):
        read_json(tmp_path / "classes.json")
    with pytest.raises(ValueError, match="x.yaml is not a regular file"):
        read_yaml(tmp_path / "x.yaml")


def test_per_position_statistics_must_be_the_models_grid(tmp_path):
    """Issue 32, point 2: [64, 8, 32] for a 16 x 16 grid holds 256 positions too, and was accepted silently."""
    from stage1.model.latent_stats import read_latent_stats

    torch.save({"mean": torch.zeros(4, 8, 32), "var": torch.ones(4, 8, 32)}, tmp_path / "stat.pt")
    with pytest.raises(ValueError, match=r"per-position statistics of shape \[4, 8, 32\] are not this model's 16 x 16 "
                                         r"grid: expected \[4, 16, 16\]"):
        read_latent_stats(str(tmp_path / "stat.pt"), 4, grid=16)
    torch.save({"mean": torch.zeros(4, 16, 16), "var": torch.ones(4, 16, 16)}, tmp_path / "good.pt")
    assert read_latent_stats(str(tmp_path / "good.pt"), 4, grid=16)[0].shape == (256, 4)


def test_a_configs_codebook_memory_is_bounded_before_anything_is_allocated(dinov2_dir, tmp_path):
    """Issue 32, point 1: a residual depth of 16 (or many per-scale codebooks) at a large K allocated until the
    allocator failed; the product of the kind's sizes is bounded, each field alone being within its own bound. A
    huge (sparse) config.json is refused by its size before it is read."""
    from stage1 import VQRAE

    with pytest.raises(ValueError, match=r"quantizer 'residual' would hold 536,870,912 numbers \(2.0 GiB in fp32\) for "
                                         r"32-channel latents, more than the 268,435,456 accepted"):
        tiny_vqrae(dinov2_dir, quantizer_kind="residual", depth=16, num_embeddings=2**20)
    folder = tmp_path / "model"
    folder.mkdir()
    with open(folder / "config.json", "wb") as f:
        f.truncate(8 << 30)  # 8 GiB of holes: nothing is written to disk
    with pytest.raises(ValueError, match=r"config.json is 8,589,934,592 bytes, more than the 1,048,576 accepted"):
        VQRAE.from_pretrained(folder)


def test_a_nan_float_tiff_and_any_decoder_error_are_listed_skips(model_dir, tmp_path, monkeypatch, capsys):
    """Issue 32, point 8: a 32-bit float TIFF of NaN stopped a whole tokenize run without naming the file, and
    Pillow's plugins raised NotImplementedError / AttributeError / ... as tracebacks: each is an unreadable image,
    skipped and listed, and the run goes on."""
    from PIL import Image

    from stage1.data.images import UnreadableImageError, read_image

    images = tmp_path / "images"
    images.mkdir()
    (images / "good.png").write_bytes(png_bytes(1, size=IMAGE_SIZE))
    Image.fromarray(np.full((IMAGE_SIZE, IMAGE_SIZE), np.nan, dtype=np.float32)).save(images / "nan.tif")
    out = tmp_path / "tokens"
    assert tokenize.main(["--model", model_dir, "--data", str(images), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["path"] for e in manifest["images"]] == ["good.png"]
    assert [(s["path"], "NaN or Inf" in s["reason"]) for s in manifest["skipped"]] == [("nan.tif", True)]
    # The codebook fit and training (a torch.multinomial traceback in both) skip it too, and say so.
    for i in range(3):
        (images / f"more{i}.png").write_bytes(png_bytes(2 + i, size=IMAGE_SIZE))
    assert fit_codebook.main(["--model", model_dir, "--data", str(images), "--out", str(tmp_path / "fit"),
                              "--tokens-per-image", "16", "--iters", "1"]) == 0
    assert "(1 unreadable, skipped: codebook_fit.json lists them)" in capsys.readouterr().out
    fit = json.loads((tmp_path / "fit" / "codebook_fit.json").read_text())
    assert [s["path"] for s in fit["skipped_on_rank0"]] == ["nan.tif"]
    with pytest.warns(UserWarning, match="skipping unreadable image nan.tif: ValueError: F image with NaN or Inf"):
        run_training(str(images), tmp_path / "run", "train.steps=2", "train.batch_size=5",
                     "train.report_reconstructions=false")
    assert max(m["skipped_images"] for m in step_logs(tmp_path / "run").values()) >= 1
    for error in (NotImplementedError("a BLP encoding"), AttributeError("'NoneType' has no 'tile'"),
                  RuntimeError("plugin")):
        def broken(self, error=error):
            raise error

        monkeypatch.setattr(Image.Image, "load", broken)
        with pytest.raises(UnreadableImageError, match=type(error).__name__):
            read_image(str(images / "good.png"))


BILLION_LAUGHS = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"] + [
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]" for i in range(8)])


def test_a_yaml_of_nested_aliases_is_one_error_wherever_it_is_read(tmp_path, capsys, monkeypatch):
    """Issue 32, point 8: a 400-byte YAML of nested aliases (a billion laughs) as an experiment reached through
    hydra.searchpath hung or crashed --cfg job, and as a decoder config was a MemoryError."""
    from stage1 import VQRAE
    from stage1.cli.train import main
    from stage1.model.presets import CONFIG_DIR

    assert len(BILLION_LAUGHS) < 700
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "laughs.yaml").write_text("# @package _global_\n" + BILLION_LAUGHS + "\n")
    argv = [f"hydra.searchpath=[file://{tmp_path}]", "experiment=laughs", "data.path=x", "results_dir=r", "--cfg",
            "job"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "laughs.yaml stands for more than 65,536 values once its aliases" in err
    package = tmp_path / "site" / "laughing_configs"  # the same file in an installed package, through pkg://
    shutil.copytree(tmp_path / "experiment", package / "experiment")
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert main(["hydra.searchpath=[pkg://laughing_configs]", *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "laughs.yaml stands for more than 65,536 values" in err, err
    # A second probe found ways around the walk, each of which hung: a folder with a space in a quoted searchpath,
    # a linked experiment folder, a namespace package (no __init__.py), and a choice climbing out of its group.
    spaced, linked = tmp_path / "sp a", tmp_path / "linked"
    shutil.copytree(tmp_path / "experiment", spaced / "experiment")
    linked.mkdir()
    os.symlink(tmp_path / "experiment", linked / "experiment")
    namespace = tmp_path / "site" / "laughing_namespace"
    shutil.copytree(tmp_path / "experiment", namespace / "experiment")
    for searchpath in (f'"file://{spaced}"', f"file://{linked}", "pkg://laughing_namespace"):
        assert main([f"hydra.searchpath=[{searchpath}]", *argv[1:]]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "laughs.yaml stands for more than 65,536 values" in err, (searchpath, err)
    climb = os.path.relpath(tmp_path / "experiment" / "laughs", CONFIG_DIR + "/experiment")
    assert main([f"experiment={climb}", *argv[2:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "climbs out of the experiment folder" in err, err
    (tmp_path / "decoder.yaml").write_text(BILLION_LAUGHS)
    with pytest.raises(ValueError, match="decoder.yaml stands for more than 65,536 values"):
        VQRAE(encoder_cls="Dinov2withNorm", encoder_config_path="x", decoder_config_path=str(tmp_path / "decoder.yaml"))


@pytest.mark.parametrize("edit", ["missing entry", "empty object", "labels not ints"])
def test_a_shard_listing_edited_by_hand_is_one_error_on_resume(model_dir, tmp_path, capsys, edit):
    """Issue 32, point 7: on a resume, a listing with an entry missing was accepted silently, and `{}` in its place
    was a KeyError."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        (images / f"{i}.png").write_bytes(png_bytes(i, size=IMAGE_SIZE))
    out = tmp_path / "tokens"
    argv = ["--model", model_dir, "--data", str(images), "--out", str(out), "--shard-size", "2"]
    assert tokenize.main(argv) == 0
    listing = json.loads((out / "shard-00001.json").read_text())
    edited = {"missing entry": {**listing, "images": listing["images"][:1], "labels": listing["labels"][:1]},
              "empty object": {}, "labels not ints": {**listing, "labels": ["a", "b"]}}[edit]
    (out / "shard-00001.json").write_text(json.dumps(edited))
    capsys.readouterr()
    assert tokenize.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # beside the progress bar
    assert len(errors) == 1 and "shard-00001.json must list the shard's 2 image(s)" in errors[0], errors
