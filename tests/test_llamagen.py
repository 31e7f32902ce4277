"""LlamaGen with no patch: vqrae-tokenize --format llamagen writes what LlamaGen's c2i trainer reads (folder names,
shapes, class ids, the flip views), refuses what it cannot take, and LlamaGenTokenizer gives LlamaGen's VQModel
interface (images in [-1, 1]). The GPT here is a tiny one of our own with LlamaGen's shapes: class token, then the
codes, next-code prediction; the dataset reads the files as LlamaGen's dataset/imagenet.py CustomDataset does."""

import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
from helpers import assert_tokenize_refuses, smooth_images, tiny_vqrae
from PIL import Image
from torch import nn

from stage1 import VQRAE, LlamaGenTokenizer, VQRAEConfig
from stage1.cli import tokenize

SIZE, GRID, K = 128, 16, 64  # the tiny encoder (patch 8) at 128 px: a 16 x 16 grid, LlamaGen's 256 / 16


@pytest.fixture(scope="module")
def llamagen_model(dinov2_dir, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llamagen") / "model"
    tiny_vqrae(dinov2_dir, encoder_input_size=SIZE, num_embeddings=K).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def labelled_tree(tmp_path_factory):
    """Two classes: cat (two images) and dog (one)."""
    root = tmp_path_factory.mktemp("classes")
    pixels = (smooth_images(3, size=SIZE, seed=21).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    for (folder, name), image in zip([("cat", "a.png"), ("cat", "b.png"), ("dog", "c.png")], pixels, strict=True):
        (root / folder).mkdir(exist_ok=True)
        Image.fromarray(image).save(root / folder / name)
    return str(root)


def load_like_llamagen(code_path, image_size):
    """LlamaGen's CustomDataset over n files: views picked only when 'flip' is in the path."""
    feature_dir, label_dir = f"{code_path}/imagenet{image_size}_codes", f"{code_path}/imagenet{image_size}_labels"
    flip = "flip" in feature_dir
    items = []
    for i in range(len(os.listdir(feature_dir))):
        features = np.load(os.path.join(feature_dir, f"{i}.npy"))
        if flip:
            features = features[:, torch.randint(0, features.shape[1], (1,)).item()]
        items.append((torch.from_numpy(features), torch.from_numpy(np.load(os.path.join(label_dir, f"{i}.npy")))))
    return items


class TinyGPT(nn.Module):
    """LlamaGen's c2i GPT in shape: a class embedding (with a null class, for guidance) as the first token, the codes
    after it, causal attention, next-code logits over the codebook."""

    def __init__(self, vocab, num_classes, positions, dim=64):
        super().__init__()
        self.classes = nn.Embedding(num_classes + 1, dim)
        self.codes = nn.Embedding(vocab, dim)
        self.positions = nn.Parameter(torch.randn(1, positions, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def forward(self, codes, labels):  # codes (B, t) with t < positions -> logits for codes 0..t (B, t + 1, vocab)
        x = torch.cat([self.classes(labels)[:, None], self.codes(codes)], 1)
        x = x + self.positions[:, : x.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.head(self.blocks(x, mask=mask, is_causal=True))

    @torch.no_grad()
    def generate(self, labels, length):
        codes = torch.zeros(len(labels), 0, dtype=torch.long)
        for _ in range(length):
            codes = torch.cat([codes, self(codes, labels)[:, -1].argmax(-1, keepdim=True)], 1)
        return codes


def test_llamagen_export_trains_a_gpt_whose_samples_decode(llamagen_model, labelled_tree, tmp_path, capsys):
    out = tmp_path / "tokens"
    argv = ["--model", llamagen_model, "--data", labelled_tree, "--out", str(out), "--format", "llamagen"]
    assert tokenize.main(argv) == 0
    printed = capsys.readouterr().out
    assert (f"--code-path {out / 'llamagen'} --image-size 256 --downsample-size 16 --vocab-size {K} --num-classes 2"
            in printed and "hardcodes ImageNet's 1281167 files" in printed)
    assert "codes of 128 px crops, LlamaGen's extract_codes_c2i.py crops at 256" in printed
    items = load_like_llamagen(str(out / "llamagen"), 256)
    assert [tuple(codes.shape) for codes, _ in items] == [(1, 1, GRID * GRID)] * 3  # un-augmented: one view
    assert [labels.tolist() for _, labels in items] == [[0], [0], [1]]
    model = VQRAE.from_pretrained(llamagen_model)
    shard = np.load(out / "shard-00000.npy")
    assert all(np.array_equal(codes[0, 0].numpy(), shard[i].reshape(-1)) for i, (codes, _) in enumerate(items))

    # LlamaGen's train_c2i.py step on a batch: codes (B, 1, N) -> (B, N), labels (B, 1) -> (B,).
    codes = torch.stack([c for c, _ in items]).reshape(3, -1).long()
    labels = torch.stack([y for _, y in items]).reshape(-1).long()
    torch.manual_seed(0)
    gpt = TinyGPT(K, num_classes=2, positions=GRID * GRID)
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=3e-3)
    losses = []
    for _ in range(120):
        loss = nn.functional.cross_entropy(gpt(codes[:, :-1], labels).flatten(0, 1), codes.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])

    # sample_c2i.py: the GPT's codes for class 1 (the dog, one image: the GPT learnt its codes), then
    # vq_model.decode_code(index_sample, qzshape) with qzshape [B, codebook_embed_dim, h, w], images in [-1, 1].
    tokenizer = LlamaGenTokenizer.from_pretrained(llamagen_model)
    sampled = gpt.generate(torch.tensor([1]), GRID * GRID)
    assert torch.equal(sampled[0], codes[2])
    qzshape = [1, tokenizer.codebook_embed_dim, GRID, GRID]
    images = tokenizer.decode_code(sampled, qzshape)
    assert images.shape == (1, 3, SIZE, SIZE) and images.min() >= -1 and images.max() <= 1
    expected = model.decode_from_indices(sampled.reshape(1, GRID, GRID)) * 2 - 1
    assert torch.equal(images, expected)
    assert torch.equal(tokenizer.decode_code(sampled.reshape(-1), [1, GRID, GRID, 8], channel_first=False), expected)
    # At LlamaGen's --image-size (256 here), which its sample grids and FID batches assume: the model's resize.
    at_256 = LlamaGenTokenizer.from_pretrained(llamagen_model, image_size=256).decode_code(sampled, qzshape)
    resized = model.decode_from_indices(sampled.reshape(1, GRID, GRID), output_size=(256, 256))
    assert at_256.shape == (1, 3, 256, 256) and torch.equal(at_256, resized * 2 - 1)


def test_tokenizer_encodes_as_llamagens_vq_model(llamagen_model):
    """extract_codes_c2i.py: `_, _, [_, _, indices] = vq_model.encode(x)` on images in [-1, 1], reshaped per image."""
    tokenizer = LlamaGenTokenizer.from_pretrained(llamagen_model)
    model = tokenizer.model
    x = smooth_images(2, size=SIZE, seed=22)
    quant, losses, (_, _, indices) = tokenizer.encode(x * 2 - 1)
    expected = model.encode_to_indices(x)
    assert indices.shape == (2 * GRID * GRID,) and torch.equal(indices.reshape(2, GRID, GRID), expected)
    assert losses == (None, None, None, 0)
    with torch.no_grad():
        vectors = model.quantizer.lookup(expected.flatten(1))  # the codes' vectors, as a (B, C, h, w) grid
        assert torch.equal(quant, vectors.transpose(1, 2).reshape(2, -1, GRID, GRID))
        assert torch.equal(tokenizer.decode(quant), model.decode_from_indices(expected) * 2 - 1)
        assert torch.equal(tokenizer(x * 2 - 1)[0], tokenizer.decode(quant))
    assert not tokenizer.train().model.training  # the codebook never moves
    with pytest.raises(ValueError, match="do not fill the shape"):
        tokenizer.decode_code(indices, [3, 8, GRID, GRID])


def test_flip_views_go_to_a_folder_llamagen_picks_them_from(llamagen_model, labelled_tree, tmp_path):
    out = tmp_path / "tokens"
    argv = ["--model", llamagen_model, "--data", labelled_tree, "--out", str(out), "--format", "llamagen",
            "--augment", "flip"]
    assert tokenize.main(argv) == 0
    assert not (out / "llamagen").exists()
    first = np.load(out / "llamagen_flip" / "imagenet256_codes" / "0.npy")
    shard = np.load(out / "shard-00000.npy")
    assert first.shape == (1, 2, GRID * GRID) and np.array_equal(first[0], shard[0].reshape(2, -1))
    items = load_like_llamagen(str(out / "llamagen_flip"), 256)
    assert [tuple(codes.shape) for codes, _ in items] == [(1, GRID * GRID)] * 3  # one view per sample


def test_what_llamagen_cannot_take_is_refused_before_any_work(llamagen_model, model_dir, labelled_tree, dinov2_dir,
                                                              tmp_path, capsys):
    tree = tmp_path / "tree"
    shutil.copytree(labelled_tree, tree)
    shutil.copy(os.path.join(labelled_tree, "dog", "c.png"), tree / "loose.png")  # outside the class folders: -1
    with tarfile.open(tmp_path / "plain.tar", "w") as tar:  # a plain tar of the same tree: known from its headers
        tar.add(tree, arcname=".")
    cases = [
        (["--model", llamagen_model, "--data", str(tree)], r"1 image\(s\) have no class \(label -1"),
        (["--model", llamagen_model, "--data", str(tmp_path / "plain.tar")], r"1 image\(s\) have no class"),
        (["--model", model_dir, "--data", labelled_tree], r"side \[16, 24, 28, 32, 48, 56, 64\].*gives 4x4"),
    ]
    assert_tokenize_refuses(cases, "llamagen", tmp_path, capsys)
    config = tiny_vqrae(dinov2_dir, encoder_input_size=SIZE).config.to_dict()
    config["quantizer"].update(kind="residual", depth=2)
    with pytest.raises(ValueError, match="one code per position"):
        LlamaGenTokenizer(VQRAE(VQRAEConfig.from_dict(config)))


def test_protocol_adm_crops_as_llamagens_extraction(llamagen_model, tmp_path):
    """--protocol adm: ADM's center_crop_arr, as LlamaGen's extract_codes_c2i.py crops (portraits whose crop offset
    rounds differently from a plain center crop), so the export holds LlamaGen's own codes of the images."""
    from stage1.data.images import adm_center_crop, read_image

    pixels = (smooth_images(2, size=224, seed=23).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    (tmp_path / "data" / "a").mkdir(parents=True)
    for i, image in enumerate(pixels):
        Image.fromarray(image[:, 32:192]).save(tmp_path / "data" / "a" / f"{i}.png")  # 160 x 224: 128 x 179
    argv = ["--model", llamagen_model, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "adm"),
            "--protocol", "adm", "--format", "llamagen"]
    assert tokenize.main(argv) == 0
    tokenizer = LlamaGenTokenizer.from_pretrained(llamagen_model)
    for i in range(2):
        crop = adm_center_crop(read_image(str(tmp_path / "data" / "a" / f"{i}.png"))[0], SIZE)
        _, _, (_, _, indices) = tokenizer.encode(crop[None].float() / 127.5 - 1)  # LlamaGen's normalisation
        exported = np.load(tmp_path / "adm" / "llamagen" / "imagenet256_codes" / f"{i}.npy")
        assert np.array_equal(exported[0, 0], indices.numpy())
    assert tokenize.main([*argv[:5], str(tmp_path / "plain"), "--format", "llamagen"]) == 0
    plain = np.stack([np.load(tmp_path / "plain" / "llamagen" / "imagenet256_codes" / f"{i}.npy") for i in range(2)])
    adm = np.stack([np.load(tmp_path / "adm" / "llamagen" / "imagenet256_codes" / f"{i}.npy") for i in range(2)])
    assert not np.array_equal(plain, adm)  # the crops differ (by a pixel's offset, and the resize)


def test_a_rerun_over_a_larger_export_leaves_only_its_own_files(llamagen_model, labelled_tree, tmp_path):
    """Issue 32, point 5: LlamaGen's loader lists the folders, so after --restart over an export of more images the
    folders hold this run's files and nothing else (it would train on images the user removed)."""
    tree = tmp_path / "tree"
    shutil.copytree(labelled_tree, tree)
    out = tmp_path / "tokens"
    argv = ["--model", llamagen_model, "--data", str(tree), "--out", str(out), "--format", "llamagen"]
    assert tokenize.main(argv) == 0
    os.remove(tree / "cat" / "b.png")
    assert tokenize.main([*argv, "--restart"]) == 0
    for kind in ("codes", "labels"):
        assert sorted(os.listdir(out / "llamagen" / f"imagenet256_{kind}")) == ["0.npy", "1.npy"]
    assert [labels.tolist() for _, labels in load_like_llamagen(str(out / "llamagen"), 256)] == [[0], [1]]
