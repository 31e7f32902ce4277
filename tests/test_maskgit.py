"""Masked generation on our codes (issue 30): vqrae-tokenize --format maskgit writes Halton-MaskGIT's layout
(valeoai/Halton-MaskGIT extract_vq_features.py: Train/ and Eval/ of numbered pickles {"code": uint16 (h, w), "y": int}),
read back here by a reader written from that documented format; LlamaGenTokenizer is its `ae` (decode_code on
(B, h, w) codes, encode as its extractor unpacks it); a tiny masked transformer of our own with its shapes (mask token
= codebook size, class conditioning, every token a target) trains on the export and samples with a Halton order."""

import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from helpers import ArraysOnly, assert_tokenize_refuses, read_like_maskgit, smooth_images, tiny_vqrae
from PIL import Image
from torch import nn

from stage1 import VQRAE, LlamaGenTokenizer
from stage1.cli import tokenize

SIZE, GRID, K = 128, 16, 64  # the tiny encoder (patch 8) at 128 px: a 16 x 16 grid


@pytest.fixture(scope="module")
def maskgit_model(dinov2_dir, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("maskgit") / "model"
    tiny_vqrae(dinov2_dir, encoder_input_size=SIZE, num_embeddings=K).save_pretrained(path)
    return str(path)


def image_tree(root, names, seed):
    pixels = (smooth_images(len(names), size=SIZE, seed=seed).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    for (folder, name), image in zip(names, pixels, strict=True):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        Image.fromarray(image).save(os.path.join(root, folder, name))
    return str(root)


def halton_order(side: int) -> list[int]:
    """Grid positions in the order of the 2-D Halton sequence (bases 2 and 3), each once: Halton-MaskGIT's schedule
    reveals tokens in this low-discrepancy order, spread over the image at every step."""
    def radical_inverse(i, base):
        value, f = 0.0, 1.0 / base
        while i:
            value, i, f = value + f * (i % base), i // base, f / base
        return value

    order, seen, i = [], set(), 1
    while len(order) < side * side:
        cell = int(radical_inverse(i, 2) * side) * side + int(radical_inverse(i, 3) * side)
        if cell not in seen:
            seen.add(cell)
            order.append(cell)
        i += 1
    return order


class TinyMaskGIT(nn.Module):
    """Halton-MaskGIT's transformer in shape: codebook_size + 1 token embeddings (the last is the mask), learned
    positions, the class added to every token, bidirectional attention, logits over codebook_size + 1."""

    def __init__(self, codebook_size, num_classes, positions, dim=64):
        super().__init__()
        self.tokens = nn.Embedding(codebook_size + 1, dim)
        self.classes = nn.Embedding(num_classes + 1, dim)  # + the dropped class, for guidance
        self.positions = nn.Parameter(torch.randn(1, positions, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, codebook_size + 1)

    def forward(self, codes, labels):  # (B, h, w) with masked positions at codebook_size -> (B, h * w, K + 1)
        x = self.tokens(codes.flatten(1)) + self.positions + self.classes(labels)[:, None]
        return self.head(self.blocks(x))


def test_maskgit_export_trains_a_masked_transformer_whose_halton_samples_decode(maskgit_model, tmp_path, capsys):
    train = image_tree(tmp_path / "train", [("cat", "a.png"), ("cat", "b.png"), ("dog", "c.png")], seed=31)
    held = image_tree(tmp_path / "val", [("cat", "d.png"), ("dog", "e.png")], seed=32)
    root = tmp_path / "maskgit"
    for data, split in ((train, "train"), (held, "eval")):
        argv = ["--model", maskgit_model, "--data", data, "--out", str(tmp_path / f"tokens-{split}"), "--format",
                "maskgit", "--split", split, "--maskgit-root", str(root)]
        assert tokenize.main(argv) == 0
    printed = capsys.readouterr().out
    assert (f"--data-folder {root}/ --vqgan-folder {maskgit_model} --img-size {SIZE} --f-factor 8 --codebook-size {K} "
            f"--mask-value {K} --nb-class 1000" in printed)
    assert sorted(os.listdir(root)) == ["Eval", "Train", "classes.json"]
    items, held_items = read_like_maskgit(root / "Train"), read_like_maskgit(root / "Eval")
    assert [name for name, _, _ in items] == ["0000000.pth", "0000001.pth", "0000002.pth"]
    assert [y for _, _, y in items] == [0, 0, 1] and [y for _, _, y in held_items] == [0, 1]
    assert all(code.dtype == np.uint16 and code.shape == (GRID, GRID) for _, code, _ in items + held_items)
    shard = np.load(tmp_path / "tokens-train" / "shard-00000.npy")
    assert all(np.array_equal(code, shard[i]) for i, (_, code, _) in enumerate(items))

    # Its `ae`: the extractor's `_, _, [_, _, code] = ae.encode(img)` gives these codes; decode_code paints them.
    ae = LlamaGenTokenizer.from_pretrained(maskgit_model, image_size=SIZE)
    model = VQRAE.from_pretrained(maskgit_model)
    images = torch.stack([torch.from_numpy(np.array(Image.open(os.path.join(train, c, n)))).permute(2, 0, 1)
                          for c, n in (("cat", "a.png"), ("cat", "b.png"), ("dog", "c.png"))]).float() / 255
    _, _, (_, _, flat) = ae.encode(images * 2 - 1)
    codes = torch.stack([torch.from_numpy(code.astype(np.int32)) for _, code, _ in items]).long()
    assert torch.equal(flat.reshape(3, GRID, GRID), codes) and ae.codebook_size == K

    # Its training step: a random share of each grid masked (mask value = codebook size), every token a target.
    labels = torch.tensor([y for _, _, y in items])
    torch.manual_seed(0)
    net = TinyMaskGIT(K, num_classes=2, positions=GRID * GRID)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(500):
        ratio = torch.rand(3, 1, 1).clamp_min(0.05)
        masked = torch.where(torch.rand(3, GRID, GRID) < ratio, torch.full_like(codes, K), codes)
        loss = nn.functional.cross_entropy(net(masked, labels).flatten(0, 1), codes.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])

    # Its sampler: from an all-mask canvas, reveal the positions in Halton order over 8 steps (argmax here), then
    # clamp to the codebook and ae.decode_code(code (B, h, w)). The dog class has one image: the net learnt its codes.
    canvas, order = torch.full((1, GRID, GRID), K), halton_order(GRID)
    with torch.no_grad():
        for chunk in torch.tensor(order).chunk(8):
            prediction = net(canvas, torch.tensor([1]))[..., :K].argmax(-1)
            canvas.view(1, -1)[:, chunk] = prediction[:, chunk]
    assert torch.equal(canvas[0], codes[2])
    sample = ae.decode_code(canvas.clamp(0, K - 1))
    assert sample.shape == (1, 3, SIZE, SIZE) and sample.min() >= -1 and sample.max() <= 1
    assert torch.equal(sample, model.decode_from_indices(canvas) * 2 - 1)


def test_the_files_name_only_numpy_arrays_and_stale_ones_go(maskgit_model, tmp_path):
    """numpy 2 pickles arrays through numpy._core, which Halton-MaskGIT's numpy < 1.26 cannot import: the export names
    numpy.ndarray and numpy.dtype only. A rerun with fewer images leaves no file of the earlier export behind."""
    data = image_tree(tmp_path / "data", [("a", "0.png"), ("a", "1.png"), ("b", "2.png")], seed=33)
    out = tmp_path / "tokens"
    argv = ["--model", maskgit_model, "--data", data, "--out", str(out), "--format", "maskgit"]
    assert tokenize.main(argv) == 0
    with open(out / "maskgit" / "Train" / "0000000.pth", "rb") as f:
        raw = f.read()
    assert b"numpy._core" not in raw and b"numpy.core" not in raw
    assert ArraysOnly(io.BytesIO(raw)).load()["y"] == 0
    os.remove(os.path.join(data, "a", "1.png"))  # the same classes, one image fewer
    assert tokenize.main([*argv, "--restart"]) == 0
    assert [name for name, _, _ in read_like_maskgit(out / "maskgit" / "Train")] == ["0000000.pth", "0000001.pth"]
    # One class fewer, and an Eval split exported into OUT before: --restart discards OUT/maskgit as the earlier
    # tokenization's (its classes.json refused the run, and its Eval files would have stayed).
    assert tokenize.main([*argv, "--split", "eval", "--restart"]) == 0
    shutil.rmtree(os.path.join(data, "b"))
    assert tokenize.main([*argv, "--restart"]) == 0
    assert sorted(os.listdir(out / "maskgit")) == ["Train", "classes.json"]
    assert json.loads((out / "maskgit" / "classes.json").read_text()) == {"classes": ["a"]}
    assert [(name, y) for name, _, y in read_like_maskgit(out / "maskgit" / "Train")] == [("0000000.pth", 0)]


def test_what_maskgit_cannot_take_is_refused_before_any_work(maskgit_model, dinov2_dir, tmp_path, capsys):
    train = image_tree(tmp_path / "train", [("cat", "a.png"), ("dog", "b.png")], seed=34)
    other = image_tree(tmp_path / "other", [("bird", "c.png"), ("cat", "d.png")], seed=35)
    loose = tmp_path / "loose"
    shutil.copytree(train, loose)
    shutil.copy(os.path.join(train, "dog", "b.png"), loose / "x.png")  # outside the class folders: -1
    residual = tmp_path / "residual"
    tiny_vqrae(dinov2_dir, encoder_input_size=SIZE, quantizer_kind="residual", depth=2).save_pretrained(residual)
    root = tmp_path / "root"
    assert tokenize.main(["--model", maskgit_model, "--data", train, "--out", str(tmp_path / "t0"), "--format",
                          "maskgit", "--maskgit-root", str(root)]) == 0
    cases = [
        (["--model", maskgit_model, "--data", str(loose)], r"1 image\(s\) have no class .*Halton-MaskGIT's class"),
        (["--model", str(residual), "--data", train], r"Halton-MaskGIT predicts one code per grid position; these "
                                                      r"codes have 2 per position"),
        (["--model", maskgit_model, "--data", other, "--split", "eval", "--maskgit-root", str(root)],
         r"classes.json lists 2 class folder\(s\) that differ from these 2, so the splits' class ids would not agree"),
    ]
    assert_tokenize_refuses(cases, "maskgit", tmp_path, capsys)
    assert sorted(os.listdir(root)) == ["Train", "classes.json"]  # the first split's export untouched


STAND_IN_TRAINER = '''
import torch


class MaskGIT:  # Halton-MaskGIT's Trainer/cls_trainer.py in outline: its tokenizer from get_network("vqgan-llama")
    def __init__(self, args):
        self.args, self.input_size = args, args.img_size // args.f_factor
        self.ae = self.get_network("vqgan-llama")
        self.sampler = lambda trainer, nb_sample, labels: (trainer.ae.decode_code(
            (labels[:, None, None] + torch.zeros(nb_sample, self.input_size, self.input_size, dtype=torch.long))
            .clamp(0, args.codebook_size - 1)).clamp(-1, 1), [], [])

    def get_network(self, archi):
        raise RuntimeError("LlamaGen's VQ model: what the shim replaces")

    def fit(self):
        self.fitted = True

    def eval(self, sampler, num_images=50_000, **options):
        raise RuntimeError("FID over 50k images: what --samples replaces")
'''
STAND_IN_MAIN = '''
import argparse
from Trainer.cls_trainer import MaskGIT
parser = argparse.ArgumentParser()
for flag in ("--vqgan-folder", "--img-size", "--f-factor", "--codebook-size", "--nb-class"):
    parser.add_argument(flag, type=str if flag == "--vqgan-folder" else int)
parser.add_argument("--test-only", action="store_true")
args = parser.parse_args()
args.device, args.is_master = "cpu", True
maskgit = MaskGIT(args)
if not args.test_only:
    maskgit.fit()
print("metrics", maskgit.eval(sampler=maskgit.sampler, num_images=50_000))
'''


def test_the_launcher_puts_the_tokenizer_in_halton_maskgits_trainer(maskgit_model, tmp_path):
    """scripts/halton_maskgit.py on a stand-in checkout with Halton-MaskGIT's names (Trainer/cls_trainer.py MaskGIT,
    get_network("vqgan-llama"), eval; main.py building it from its flags): its trainer gets LlamaGenTokenizer of
    --vqgan-folder at --img-size, and --samples writes its sampler's images in place of the FID evaluation."""
    import subprocess
    import sys

    from helpers import REPO_ROOT

    checkout = tmp_path / "Halton-MaskGIT"
    (checkout / "Trainer").mkdir(parents=True)
    (checkout / "Trainer" / "__init__.py").write_text("")
    (checkout / "Trainer" / "cls_trainer.py").write_text(STAND_IN_TRAINER)
    (checkout / "main.py").write_text(STAND_IN_MAIN)
    samples = tmp_path / "samples.png"
    command = [sys.executable, os.path.join(REPO_ROOT, "scripts", "halton_maskgit.py"), "--samples", str(samples),
               "--labels", "3,5", "--", "main.py", "--vqgan-folder", maskgit_model, "--img-size", "96",
               "--f-factor", "6", "--codebook-size", str(K), "--nb-class", "1000"]
    done = subprocess.run(command, cwd=checkout, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "metrics {'FID': nan, 'IS': nan}" in done.stdout and "2 samples of classes [3, 5]" in done.stdout
    grid = torch.from_numpy(np.array(Image.open(samples))).permute(2, 0, 1).float() / 255
    model = VQRAE.from_pretrained(maskgit_model)
    codes = torch.tensor([3, 5])[:, None, None].expand(2, GRID, GRID)
    expected = model.decode_from_indices(codes, output_size=(96, 96))  # at --img-size, through the adapter
    # save_image's grid: 2 pixels of padding around each 96 px image, one row.
    painted = torch.stack([grid[:, 2:98, 2:98], grid[:, 2:98, 100:196]])
    assert grid.shape == (3, 100, 198) and (painted - expected).abs().max() <= 1 / 255 + 1e-6


def test_wds_export_puts_the_codes_beside_each_sample_as_its_text_to_image_loader_reads_them(maskgit_model,
                                                                                            tmp_path, capsys):
    """--format wds: LAION-style tars (image, caption txt, json) come back with every field as it was and the codes
    as vq_feat.npy, read here with webdataset's own decoder as Halton-MaskGIT's text-to-image loader reads them; an
    unreadable sample is left out; an image folder gives vqrae-make-shards' samples with their codes."""
    import tarfile

    import webdataset as wds

    from stage1.data.tar_shards import write_sample

    images = (smooth_images(3, size=SIZE, seed=36).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    samples = []
    for i, pixels in enumerate(images):
        png = io.BytesIO()
        Image.fromarray(pixels).save(png, format="png")
        samples.append((f"laion/{i:04d}", {"png": png.getvalue(), "txt": f"a caption {i}".encode(),
                                           "json": f'{{"id": {i}}}'.encode()}))
    samples.insert(1, ("laion/bad", {"png": b"\x89PNG\r\n\x1a\nbroken", "txt": b"never read"}))
    source = tmp_path / "source.tar"
    with tarfile.open(source, "w") as tar:
        for key, fields in samples:
            write_sample(tar, key, fields)
    out = tmp_path / "tokens"
    assert tokenize.main(["--model", maskgit_model, "--data", str(source), "--out", str(out), "--format", "wds"]) == 0
    assert "wds export: " in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    shard = np.load(out / "shard-00000.npy")
    codes_of = {entry["path"]: shard[entry["row"]] for entry in manifest["images"]}
    read = list(wds.WebDataset(str(out / "wds" / "000000.tar"), shardshuffle=False).decode("rgb"))
    assert [sample["__key__"] for sample in read] == ["laion/0000", "laion/0001", "laion/0002"]  # not laion/bad
    for sample, (key, fields) in zip(read, [s for s in samples if s[0] != "laion/bad"], strict=True):
        assert sample["txt"] == fields["txt"].decode() and sample["json"] == json.loads(fields["json"])
        assert np.array_equal(sample["vq_feat.npy"], codes_of[f"{key}.png"]) and sample["vq_feat.npy"].dtype == np.int64
        assert torch.LongTensor(sample["vq_feat.npy"]).shape == (GRID, GRID)  # its loader's conversion
    with tarfile.open(out / "wds" / "000000.tar") as tar:  # the image bytes as they came, not re-encoded
        assert tar.extractfile("laion/0002.png").read() == samples[3][1]["png"]

    folder = image_tree(tmp_path / "folder", [("cat", "a.png"), ("dog", "b.png")], seed=37)
    assert tokenize.main(["--model", maskgit_model, "--data", folder, "--out", str(tmp_path / "f"), "--format",
                          "wds"]) == 0
    read = list(wds.WebDataset(str(tmp_path / "f" / "wds" / "000000.tar"), shardshuffle=False))
    assert [(s["__key__"], s["path.txt"], s["cls"]) for s in read] == [("000000000", b"cat/a.png", b"0"),
                                                                       ("000000001", b"dog/b.png", b"1")]
    assert read[1]["png"] == open(os.path.join(folder, "dog", "b.png"), "rb").read()
    assert np.array_equal(np.load(io.BytesIO(read[1]["vq_feat.npy"])), np.load(tmp_path / "f" / "shard-00000.npy")[1])
    capsys.readouterr()
    assert tokenize.main(["--model", maskgit_model, "--data", folder, "--out", str(tmp_path / "g"), "--format", "wds",
                          "--augment", "flip"]) == 2
    assert "--format wds writes the codes of each image beside it, one view" in capsys.readouterr().err
    assert not (tmp_path / "g").exists() or not list((tmp_path / "g").glob("shard-*"))
    # A rerun into the same folder with fewer shards leaves no tar of the earlier export behind.
    base = ["--model", maskgit_model, "--data", folder, "--out", str(tmp_path / "f"), "--format", "wds", "--restart"]
    assert tokenize.main([*base, "--shard-size", "1"]) == 0
    assert sorted(os.listdir(tmp_path / "f" / "wds")) == ["000000.tar", "000001.tar"]
    assert tokenize.main([*base, "--shard-size", "2"]) == 0
    assert sorted(os.listdir(tmp_path / "f" / "wds")) == ["000000.tar"]
