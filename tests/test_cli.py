import io
import json
import os
import shutil
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import smooth_images, tiny_vqrae, torchrun
from PIL import Image
from safetensors.torch import load_file

from stage1 import VQRAE
from stage1.cli import decode, evaluate, fit_codebook, latent_stats, push, reconstruct, tokenize
from stage1.cli.common import prepare
from stage1.data.images import psnr, to_uint8

SIZE = 32  # the tiny model's native size: 4x4 codes of an 8 px patch encoder, painted with 8 px patches


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Images in the modes a real folder holds: RGB JPEG, grey, RGBA, 16-bit, palette; not square; nested."""
    root = tmp_path_factory.mktemp("images")
    (root / "nested").mkdir()
    pixels = (smooth_images(5, size=48, seed=3).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    Image.fromarray(pixels[0][:40]).save(root / "rgb.jpg", quality=95)
    Image.fromarray(pixels[1]).convert("L").save(root / "grey.png")
    rgba = Image.fromarray(pixels[2]).convert("RGBA")
    rgba.putalpha(Image.fromarray((np.arange(48 * 48).reshape(48, 48) % 256).astype(np.uint8)))
    rgba.save(root / "alpha.png")
    Image.fromarray((pixels[3][..., 0].astype(np.uint16) * 257)).save(root / "nested" / "deep16.png")
    Image.fromarray(pixels[4]).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "nested" / "palette.png")
    (root / "README.txt").write_text("not an image, ignored")
    return str(root)


def images_as_model_sees_them(folder, names):
    return torch.stack([prepare(os.path.join(folder, n), SIZE)[0] for n in names])


def test_image_modes_are_converted(image_dir):
    assert Image.open(os.path.join(image_dir, "nested", "deep16.png")).mode.startswith("I")
    deep, note = prepare(os.path.join(image_dir, "nested", "deep16.png"), SIZE)
    assert "65536 levels" in note and deep.shape == (3, SIZE, SIZE)
    assert torch.equal(deep[0], deep[1])  # grey -> three equal channels
    _, note = prepare(os.path.join(image_dir, "alpha.png"), SIZE)
    assert "alpha composited on white" in note and f"center-cropped to {SIZE}x{SIZE}" in note


def test_psnr_on_a_known_pair():
    a = torch.full((1, 3, 8, 8), 0.5)
    b = torch.full((1, 3, 8, 8), 0.6)  # MSE 0.01 -> 20 dB
    assert psnr(a, b).item() == pytest.approx(20.0, abs=1e-4)


def test_reconstruct_writes_side_by_side_png(model_dir, image_dir, tmp_path, capsys):
    images = [os.path.join(image_dir, "rgb.jpg"), os.path.join(image_dir, "alpha.png")]
    out = tmp_path / "rec.png"
    argv = ["--model", model_dir, "--image", images[0], "--image", images[1], "--out", str(out)]
    assert reconstruct.main(argv) == 0
    written = Image.open(out)
    assert written.size == (2 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2)  # 2 rows of original | reconstruction
    printed = capsys.readouterr().out
    model = VQRAE.from_pretrained(model_dir).eval()
    x = images_as_model_sees_them(image_dir, ["rgb.jpg", "alpha.png"])
    with torch.no_grad():
        expected = psnr(model(x), x)
    for path, score in zip(images, expected.tolist(), strict=True):
        assert f"{path}: PSNR {score:.2f} dB" in printed
    assert "alpha composited on white" in printed


def test_tokenize_then_decode_reproduces_model_pixels(model_dir, image_dir, tmp_path):
    tokens, decoded = tmp_path / "tokens", tmp_path / "decoded"
    assert tokenize.main(["--model", model_dir, "--data", image_dir, "--out", str(tokens), "--batch-size", "8"]) == 0
    manifest = json.loads((tokens / "manifest.json").read_text())
    names = [e["path"] for e in manifest["images"]]
    assert names == ["alpha.png", "grey.png", "nested/deep16.png", "nested/palette.png", "rgb.jpg"]
    assert manifest["codebook_size"] == 64 and manifest["grid_shape"] == [4, 4] and manifest["image_size"] == SIZE
    codes = np.load(tokens / "shard-00000.npy")
    assert codes.dtype == np.uint8 and codes.shape == (5, 4, 4)  # 64 codes fit in a byte
    assert decode.main(["--model", model_dir, "--tokens", str(tokens), "--out", str(decoded),
                        "--batch-size", "8"]) == 0
    model = VQRAE.from_pretrained(model_dir).eval()
    x = images_as_model_sees_them(image_dir, names)
    with torch.no_grad():
        assert torch.equal(torch.from_numpy(codes.astype(np.int64)), model.encode_to_indices(x))
        expected = to_uint8(model(x))
    for i, name in enumerate(names):
        png = np.asarray(Image.open(decoded / (os.path.splitext(name)[0] + ".png")).convert("RGB"))
        assert np.array_equal(png, expected[i].permute(1, 2, 0).numpy()), name


def test_interrupted_tokenize_resumes_to_identical_bytes(model_dir, image_dir, tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    args = ["--model", model_dir, "--data", image_dir, "--shard-size", "2", "--batch-size", "2"]
    assert tokenize.main([*args, "--out", str(whole)]) == 0
    assert tokenize.main([*args, "--out", str(broken)]) == 0
    # What a kill after the first shard leaves: shard 0 complete, a writer's temporary, nothing else.
    for name in os.listdir(broken):
        if name.startswith(("shard-00001", "shard-00002", "manifest")):
            os.remove(broken / name)
    (broken / ".shard-00001.npy.abc123.tmp").write_bytes(b"partial")
    assert tokenize.main([*args, "--out", str(broken)]) == 0
    finished = sorted(n for n in os.listdir(whole))
    assert finished == ["manifest.json", *[f"shard-0000{i}.{e}" for i in range(3) for e in ("json", "npy")],
                        "tokenize_run.json"]
    for name in finished:
        assert (whole / name).read_bytes() == (broken / name).read_bytes(), name


def test_tokenize_refuses_a_folder_of_another_run(model_dir, image_dir, tmp_path):
    args = ["--model", model_dir, "--data", image_dir, "--out", str(tmp_path / "t")]
    assert tokenize.main([*args, "--shard-size", "2"]) == 0
    assert tokenize.main([*args, "--shard-size", "3"]) == 2


def test_decode_with_the_wrong_model_fails_before_any_work(model_dir, image_dir, dinov2_dir, tmp_path, capsys):
    tokens = tmp_path / "tokens"
    assert tokenize.main(["--model", model_dir, "--data", image_dir, "--out", str(tokens)]) == 0
    other = tmp_path / "other"
    tiny_vqrae(dinov2_dir, num_embeddings=32).save_pretrained(other)
    out = tmp_path / "decoded"
    assert decode.main(["--model", str(other), "--tokens", str(tokens), "--out", str(out)]) == 2
    assert "codebook of 64 codes, the model has 32" in capsys.readouterr().err
    assert not out.exists()
    wider = tmp_path / "wider"
    tiny_vqrae(dinov2_dir, encoder_input_size=48).save_pretrained(wider)
    assert decode.main(["--model", str(wider), "--tokens", str(tokens), "--out", str(out)]) == 2
    assert "[4, 4] code grids, the model makes [6, 6]" in capsys.readouterr().err
    assert not out.exists()
    manifest = json.loads((tokens / "manifest.json").read_text())  # a multi-scale manifest for this one-grid model
    (tokens / "manifest.json").write_text(json.dumps({**manifest, "scales": [1, 2, 4], "index_shape": [21]}))
    rows = np.load(tokens / "shard-00000.npy").shape[0]
    np.save(tokens / "shard-00000.npy", np.zeros((rows, 21), dtype=np.uint8))
    assert decode.main(["--model", model_dir, "--tokens", str(tokens), "--out", str(out)]) == 2
    assert ("the shards hold multi-scale codes (scales [1, 2, 4]), the model makes one code grid (no scales)"
            in capsys.readouterr().err)
    assert not out.exists()


def test_evaluate_writes_every_metric(model_dir, image_dir, tmp_path):
    out = tmp_path / "eval"
    assert evaluate.main(["--model", model_dir, "--data", image_dir, "--out", str(out), "--limit", "4"]) == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("psnr", "ssim", "lpips", "rfid", "codebook_usage", "codes_used", "perplexity", "bits_per_image",
                "entropy_bits_per_image", "num_images", "grid_shape", "codebook_size", "notes"):
        assert key in results, key
    assert results["num_images"] == 4 and results["bits_per_image"] == 16 * 6  # 4x4 codes of log2(64) bits
    names = ["alpha.png", "grey.png", "nested/deep16.png", "nested/palette.png"]
    model = VQRAE.from_pretrained(model_dir).eval()
    x = images_as_model_sees_them(image_dir, names)
    with torch.no_grad():
        rec, codes = model(x), model.encode_to_indices(x)
    by_hand = (10 * torch.log10(1 / ((rec - x) ** 2).flatten(1).mean(1))).mean().item()
    assert results["psnr"] == pytest.approx(by_hand, rel=1e-5)
    assert results["codes_used"] == codes.unique().numel()
    assert results["codebook_usage"] == pytest.approx(codes.unique().numel() / 64)
    assert 0 < results["ssim"] <= 1
    # Offline: no LPIPS backbone and no Inception weights, said so, and the rest still ran.
    assert results["lpips"] is None and "backbone" in results["notes"]["lpips"]
    assert results["rfid"] is None and "--fid-weights" in results["notes"]["rfid"]
    assert Image.open(out / "code_usage.png").size == (800, 300)


def test_evaluate_computes_rfid_from_a_local_inception_file(model_dir, image_dir, tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    # A real Inception-v3, randomly initialised (its weights are a download): build it without loading.
    with monkeypatch.context() as m:
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        inception = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "inception.pth"
    torch.save(torch.nn.Module.state_dict(inception), weights)
    out = tmp_path / "eval"
    argv = ["--model", model_dir, "--data", image_dir, "--out", str(out), "--fid-weights", str(weights)]
    assert evaluate.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert isinstance(results["rfid"], float) and results["rfid"] >= 0 and "rfid" not in results["notes"]


def test_evaluate_refuses_a_pickle_with_code(model_dir, image_dir, tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    evil = tmp_path / "evil.pth"
    torch.save({"weights": Payload()}, evil)
    argv = ["--model", model_dir, "--data", image_dir, "--out", str(tmp_path / "eval"), "--fid-weights", str(evil)]
    assert evaluate.main(argv) == 2
    assert "refusing to unpickle" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "eval").exists()


def test_latent_stats_match_a_direct_computation(dinov2_dir, image_dir, tmp_path):
    out = tmp_path / "stats.safetensors"
    argv = ["--encoder", dinov2_dir, "--data", image_dir, "--out", str(out), "--image-size", "32", "--batch-size", "2"]
    assert latent_stats.main(argv) == 0
    stats = load_file(out)
    from stage1 import build_encoder

    encoder = build_encoder("Dinov2withNorm", dinov2_dir)
    names = ["alpha.png", "grey.png", "nested/deep16.png", "nested/palette.png", "rgb.jpg"]
    tokens = encoder(images_as_model_sees_them(image_dir, names)).flatten(0, 1).double()
    assert int(stats["count"]) == tokens.shape[0]
    assert torch.allclose(stats["mean"].double(), tokens.mean(0), atol=1e-5)
    assert torch.allclose(stats["var"].double(), tokens.var(0, unbiased=False), atol=1e-5)
    # The file is what normalization_stat_path reads: latents come out standardised per channel.
    model = tiny_vqrae(dinov2_dir, normalization_stat_path=str(out), reshape_to_2d=False).eval()
    z = model.features(images_as_model_sees_them(image_dir, names)).flatten(0, 1)
    assert torch.allclose(z.mean(0), torch.zeros(32), atol=1e-3)
    assert torch.allclose(z.var(0, unbiased=False), torch.ones(32), atol=1e-3)


def test_latent_stats_of_a_model_are_taken_at_its_size(model_dir, image_dir, tmp_path):
    """Issue 21: --model takes the model's encoder at the model's encoder.input_size (32 here, not 224), so
    per-position statistics fit it; the same numbers as --encoder with that size."""
    by_model, by_encoder = tmp_path / "model.safetensors", tmp_path / "encoder.safetensors"
    assert latent_stats.main(["--model", model_dir, "--data", image_dir, "--out", str(by_model), "--per-position"]) == 0
    encoder = VQRAE.from_pretrained(model_dir).config.encoder.path
    assert latent_stats.main(["--encoder", encoder, "--data", image_dir, "--out", str(by_encoder), "--per-position",
                              "--image-size", "32"]) == 0
    stats, reference = load_file(by_model), load_file(by_encoder)
    assert stats["mean"].shape == (32, 4, 4) and all(torch.equal(stats[k], reference[k]) for k in reference)
    tiny_vqrae(encoder, normalization_stat_path=str(by_model))  # fits the model's grid


def test_bad_inputs_give_one_clear_line_and_no_output(model_dir, image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert tokenize.main(["--model", model_dir, "--data", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "does not exist: expected an image folder" in capsys.readouterr().err and not out.exists()
    empty = tmp_path / "no-images"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    assert evaluate.main(["--model", model_dir, "--data", str(empty), "--out", str(out)]) == 2
    assert "no images found" in capsys.readouterr().err and not out.exists()
    assert reconstruct.main(["--model", model_dir, "--image", str(empty / "nope.png"), "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err and not out.exists()
    (empty / "broken.png").write_bytes(b"not really a png")
    assert reconstruct.main(["--model", model_dir, "--image", str(empty / "broken.png"), "--out", str(out)]) == 2
    assert "cannot read image" in capsys.readouterr().err and not out.exists()
    assert decode.main(["--model", model_dir, "--tokens", str(empty), "--out", str(out)]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert reconstruct.main(["--model", str(tmp_path / "no-model"), "--image", "x.png", "--out", str(out)]) == 2
    model = ["--model", model_dir, "--data", image_dir, "--out", str(out)]
    for command, argv in ((tokenize, [*model, "--batch-size", "0"]), (tokenize, [*model, "--shard-size", "-3"]),
                          (evaluate, [*model, "--limit", "0"]), (fit_codebook, [*model, "--images", "0"]),
                          (fit_codebook, [*model, "--tokens-per-image", "0"]),
                          (latent_stats, ["--encoder", model_dir, "--data", image_dir, "--out", str(out / "s.pt"),
                                          "--limit", "0"])):
        with pytest.raises(SystemExit) as stop:  # a usage error, checked once, by the parser, before any work
            command.main(argv)
        assert stop.value.code == 2 and "expected a positive integer" in capsys.readouterr().err and not out.exists()
    for command, argv, expected in (
            (reconstruct, ["--model", model_dir, "--image", "x.png", "--out", str(out), "--image-size", "0"],
             "expected a positive integer, got '0'"),  # was: silently the model's own size
            (tokenize, [*model, "--image-size", "-8"], "expected a positive integer"),
            (latent_stats, ["--encoder", model_dir, "--data", image_dir, "--out", str(out / "s.pt"), "--image-size",
                            "0"], "expected a positive integer"),
            (fit_codebook, [*model, "--iters", "-1"], "expected an integer >= 0, got '-1'"),
            (tokenize, [*model, "--crop-range", "0.9"], "expected a number from 1 to 4, got '0.9'"),
            (tokenize, [*model, "--crop-range", "nan"], "expected a number from 1 to 4, got 'nan'"),
            (tokenize, [*model, "--crop-range", "100"], "expected a number from 1 to 4, got '100'")):
        with pytest.raises(SystemExit) as stop:
            command.main(argv)
        assert stop.value.code == 2 and expected in capsys.readouterr().err and not out.exists()
    from stage1.cli import make_shards

    with pytest.raises(SystemExit) as stop:
        make_shards.main(["--data", image_dir, "--out", str(out), "--shard-size", "0"])
    assert stop.value.code == 2 and "expected a positive integer" in capsys.readouterr().err and not out.exists()


def test_unreadable_images_are_skipped_by_tokenize(model_dir, image_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(image_dir, data)
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    assert tokenize.main(["--model", model_dir, "--data", str(data), "--out", str(tmp_path / "t")]) == 0
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["num_images"] == 5 and [s["path"] for s in manifest["skipped"]] == ["corrupt.png"]


@pytest.mark.parametrize("command", ["vqrae-reconstruct", "vqrae-tokenize", "vqrae-decode", "vqrae-evaluate",
                                     "vqrae-latent-stats", "vqrae-fit-codebook"])
def test_console_entry_points_are_installed(command):
    executable = os.path.join(os.path.dirname(sys.executable), command)
    result = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage:" in result.stdout


@pytest.mark.slow  # spawns processes (torchrun / mp.spawn / a killed writer)
def test_tokenize_on_two_ranks_gives_the_same_bytes(model_dir, image_dir, tmp_path):
    args = ["--model", model_dir, "--data", image_dir, "--shard-size", "2"]
    assert tokenize.main([*args, "--out", str(tmp_path / "one")]) == 0
    result = torchrun("-m", "stage1.cli.tokenize", *args, "--out", str(tmp_path / "two"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(os.listdir(tmp_path / "one"))
    assert names == sorted(os.listdir(tmp_path / "two"))
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_index_dtype_must_hold_the_codebook(dinov2_dir, image_dir, tmp_path, capsys):
    big = tmp_path / "big"
    tiny_vqrae(dinov2_dir, num_embeddings=300).save_pretrained(big)
    out = tmp_path / "t"
    assert tokenize.main(["--model", str(big), "--data", image_dir, "--out", str(out), "--index-dtype", "uint8"]) == 2
    assert "--index-dtype uint8 holds at most 256 codes, but the model's codebook has 300" in capsys.readouterr().err
    assert not (out / "shard-00000.npy").exists()
    assert tokenize.main(["--model", str(big), "--data", image_dir, "--out", str(tmp_path / "auto")]) == 0
    assert np.load(tmp_path / "auto" / "shard-00000.npy").dtype == np.uint16


def test_fit_codebook_writes_the_model_with_a_codebook_fitted_to_the_folder(model_dir, image_dir, tmp_path, capsys):
    out = tmp_path / "fitted"
    argv = ["--model", model_dir, "--data", image_dir, "--out", str(out), "--tokens-per-image", "16", "--iters", "8",
            "--batch-size", "2"]
    assert fit_codebook.main(argv) == 0
    assert "fitted 1 codebook(s) of 64 codes to 80 latent tokens of 5 images" in capsys.readouterr().out
    original, fitted = VQRAE.from_pretrained(model_dir).eval(), VQRAE.from_pretrained(out).eval()
    record = json.loads((out / "codebook_fit.json").read_text())
    assert record["tokens"] == 5 * 16 and record["kmeans_distortion"][0][-1] < record["kmeans_distortion"][0][0]
    # Only the codebook (and its EMA state) changed; it now fits the folder's latents far better.
    weights_a, weights_b = load_file(os.path.join(model_dir, "model.safetensors")), load_file(out / "model.safetensors")
    changed = sorted(k for k in weights_a if not torch.equal(weights_a[k], weights_b[k]))
    assert changed == ["quantizer.ema_cluster_size", "quantizer.ema_embed_sum", "quantizer.embedding",
                       "quantizer.initialized"]
    x = images_as_model_sees_them(image_dir, ["alpha.png", "grey.png", "nested/deep16.png", "nested/palette.png",
                                              "rgb.jpg"])
    with torch.no_grad():
        tokens = original.encode_tokens(x)[0].flatten(0, 1)
        error = {name: (m.quantizer(tokens.unsqueeze(0)).commitment).item()
                 for name, m in [("original", original), ("fitted", fitted)]}
    assert error["fitted"] < 0.5 * error["original"], error
    # Every token of the 4x4 grids went into the fit: its distortion (a squared norm per token) is the fitted
    # model's commitment loss (a mean per channel) on them, times the 32 channels.
    assert record["distortion"] / 32 == pytest.approx(error["fitted"], rel=1e-4)
    # The original is never written over, nor its encoder (a second probe of issue 32: --out naming the encoder's
    # folder overwrote its config.json and weights, and the model could not load any more).
    encoder_dir = json.loads(open(os.path.join(model_dir, "config.json")).read())["encoder"]["path"]
    for out in (model_dir, encoder_dir):
        assert fit_codebook.main([*argv[:4], "--out", out]) == 2
        assert "is the model's own folder or its encoder's" in capsys.readouterr().err
    assert push.main(["--model", model_dir, "--repo", "a/b", "--stage", encoder_dir]) == 2
    assert "--stage" in capsys.readouterr().err and VQRAE.from_pretrained(model_dir) is not None
    (tmp_path / "listed").mkdir()  # a config.json that is no object is the model loader's to name, in one line
    (tmp_path / "listed" / "config.json").write_text("[1]")
    assert fit_codebook.main(["--model", str(tmp_path / "listed"), *argv[2:4], "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.count("vqrae-fit-codebook: error:") == 1
    # Too few tokens for the codebook: the advice names this command's flags, not training's keys.
    assert fit_codebook.main([*argv[:4], "--out", str(tmp_path / "few"), "--tokens-per-image", "4"]) == 2
    err = capsys.readouterr().err
    assert "sampled 20 tokens for 64 codes: raise --images (with more images in --data) or --tokens-per-image" in err
    assert "codebook_fit." not in err and not (tmp_path / "few").exists()


def test_decode_refuses_manifest_paths_outside_its_folders(model_dir, image_dir, tmp_path, capsys):
    """Issue 12, case 1: a manifest is an exchanged file; its image paths must land inside --out and its shards
    inside --tokens, or nothing is written."""
    tokens = tmp_path / "tokens"
    assert tokenize.main(["--model", model_dir, "--data", image_dir, "--out", str(tokens)]) == 0
    good = json.loads((tokens / "manifest.json").read_text())
    out = tmp_path / "deep" / "out"
    cases = [("path", "../../escaped.jpg", "outside the output folder"),
             ("path", str(tmp_path / "absolute.jpg"), "outside the output folder"),
             ("path", "nested/../../../sneaky.jpg", "outside the output folder"),
             ("shard", "../tokens/shard-00000.npy", "names a shard outside its folder")]
    # A second probe of issue 32: paths that cannot all be written were found after some PNGs were.
    cases += [("path", "x" * 300 + ".jpg", "a part longer than 255 bytes"),
              ("path", os.path.splitext(good["images"][1]["path"])[0] + ".png/b.jpg",
               "both as an image's PNG and as a folder of others")]
    for field, value, message in cases:
        manifest = json.loads(json.dumps(good))
        manifest["images"][0][field] = value
        (tokens / "manifest.json").write_text(json.dumps(manifest))
        assert decode.main(["--model", model_dir, "--tokens", str(tokens), "--out", str(out)]) == 2, value
        assert message in capsys.readouterr().err
        assert not out.exists() and not list(tmp_path.rglob("*.png")), value
    (tokens / "manifest.json").write_text("{not json")
    assert decode.main(["--model", model_dir, "--tokens", str(tokens), "--out", str(out)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


def test_decode_checks_every_manifest_field_against_its_shards_before_writing(model_dir, image_dir, tmp_path,
                                                                              capsys):
    """Issue 19 (one owner of the token-shard format) and 20: entries, types and the shards' own layout are checked
    by token_shards.read_manifest before any image is written (a row of -1 decoded the shard's last row)."""
    tokens = tmp_path / "tokens"
    assert tokenize.main(["--model", model_dir, "--data", image_dir, "--out", str(tokens)]) == 0
    good = json.loads((tokens / "manifest.json").read_text())
    out = tmp_path / "out"
    capsys.readouterr()

    def entry(**changes):
        return {**good, "images": [{**good["images"][0], **changes}, *good["images"][1:]]}

    cases = [
        (entry(row=-1), "bad entry"),
        (entry(row="0"), "bad entry"),
        (entry(row=5), "is row 5 of shard-00000.npy, which holds 5 rows"),
        ({**good, "codebook_size": "64"}, "manifest.codebook_size must be an integer, got '64' (str)"),
        ({**good, "grid_shape": [2, 8], "index_shape": [2, 8]}, "the manifest says uint8 rows of [2, 8]"),
        ({**good, "dtype": "int64"}, "holds uint8 rows of shape [4, 4], the manifest says int64"),
        ({**good, "num_images": 9}, "manifest.num_images must be the number of images (5), got 9"),
        ({k: v for k, v in good.items() if k != "views"}, "manifest config lacks keys ['views']"),
        (entry(shard="shard-00009.npy"), "cannot read code shard"),
    ]
    for manifest, message in cases:
        (tokens / "manifest.json").write_text(json.dumps(manifest))
        assert decode.main(["--model", model_dir, "--tokens", str(tokens), "--out", str(out)]) == 2, message
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not out.exists()
    (tokens / "manifest.json").write_text(json.dumps(good))
    assert decode.main(["--model", model_dir, "--tokens", str(tokens), "--out", str(out)]) == 0
    assert len(list(out.rglob("*.png"))) == 5


def test_tokenize_resumes_only_the_same_tokenization(model_dir, image_dir, dinov2_dir, tmp_path, capsys):
    """Issue 12, case 2: another folder with as many images, or changed weights at the same model path, is refused
    (one error, nothing mixed); --restart starts afresh."""
    import shutil

    out = tmp_path / "t"
    assert tokenize.main(["--model", model_dir, "--data", image_dir, "--out", str(out)]) == 0
    before = (out / "shard-00000.npy").read_bytes()
    other = tmp_path / "other_images"  # the same number of images, other pictures
    shutil.copytree(image_dir, other)
    for path in other.rglob("*.png"):
        path.rename(path.with_name("x_" + path.name))
    assert tokenize.main(["--model", model_dir, "--data", str(other), "--out", str(out)]) == 2
    assert "differs in ['listing']" in capsys.readouterr().err
    changed = tmp_path / "changed"  # new weights at the same path
    shutil.copytree(model_dir, changed)
    assert tokenize.main(["--model", str(changed), "--data", image_dir, "--out", str(tmp_path / "c")]) == 0
    torch.manual_seed(1)
    tiny_vqrae(dinov2_dir).save_pretrained(changed)
    assert tokenize.main(["--model", str(changed), "--data", image_dir, "--out", str(tmp_path / "c")]) == 2
    assert "differs in ['codes_fingerprint']" in capsys.readouterr().err
    assert (out / "shard-00000.npy").read_bytes() == before  # nothing was touched
    assert tokenize.main(["--model", model_dir, "--data", str(other), "--out", str(out), "--restart"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(os.path.basename(e["path"]).startswith("x_") for e in manifest["images"] if e["path"].endswith(".png"))


def test_outputs_are_checked_before_any_work(image_dir, tmp_path, capsys):
    """Issue 12, case 6: --out that is the wrong kind of thing, or cannot be made, is one error before the model is
    even loaded (here it does not exist, so any later check would name the model instead)."""
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    model = str(tmp_path / "no_model")
    image = os.path.join(image_dir, "rgb.jpg")
    cases = [
        (evaluate, ["--data", image_dir, "--out", str(a_file)], "is a file; expected a folder"),
        (tokenize, ["--data", image_dir, "--out", str(a_file / "sub")], "is a file, so a folder cannot be made"),
        (reconstruct, ["--image", image, "--out", str(tmp_path)], "is a folder; expected a file"),
        (reconstruct, ["--image", image, "--out", str(a_file / "x.png")], "is a file, so a file cannot be made"),
        (decode, ["--tokens", image_dir, "--out", str(a_file)], "is a file; expected a folder"),
        (fit_codebook, ["--data", image_dir, "--out", str(a_file)], "is a file; expected a folder"),
    ]
    for command, argv, message in cases:
        assert command.main(["--model", model, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert latent_stats.main(["--encoder", model, "--data", image_dir, "--out", str(tmp_path)]) == 2
    assert "is a folder; expected a file" in capsys.readouterr().err


def test_exif_orientation_gifs_and_progress_in_images(model_dir, tmp_path, capsys):
    """Issue 12, case 11: a photo with an EXIF orientation is turned upright (and said so), a .gif is an image to
    the folder commands as to reconstruct, and tokenize's progress bar counts images."""
    from stage1.data.datasets import find_images
    from stage1.data.images import load_image

    pixels = (smooth_images(1, size=48, seed=5)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)[:, :32]
    upright = Image.fromarray(pixels)  # 32 wide, 48 high
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: viewers rotate it by 90 degrees clockwise
    folder = tmp_path / "images"
    folder.mkdir()
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / "camera.png", exif=exif)
    loaded, note = load_image(str(folder / "camera.png"))
    assert loaded.shape == (3, 48, 32) and "turned upright (EXIF orientation 6)" in note
    assert torch.allclose(loaded, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    upright.save(folder / "anim.gif")
    assert find_images(str(folder)) == ["anim.gif", "camera.png"]
    assert tokenize.main(["--model", model_dir, "--data", str(folder), "--out", str(tmp_path / "t")]) == 0
    err = capsys.readouterr().err
    assert "2/2" in err and "image" in err and "Loading weights" not in err
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert [e["path"] for e in manifest["images"]] == ["anim.gif", "camera.png"]


def test_help_and_usage_errors_answer_before_torch_is_imported():
    """Issue 12, case 11: every console script parses its arguments before its work module (torch, transformers,
    timm) is imported, so --help and a usage error answer at once; the scripts are the ones pyproject.toml names."""
    import tomllib

    scripts = tomllib.loads(open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml")).read())
    scripts = scripts["project"]["scripts"]
    assert scripts.pop("vqrae-train") == "stage1.cli.train:vqrae_train"  # hydra's overrides: tested on its own
    assert len(scripts) == 8 and all(target.startswith("stage1.cli.arguments:") for target in scripts.values())
    probe = """
import contextlib, io, json, sys
from stage1.cli import arguments
found = {}
for script, target in json.loads(sys.argv[1]).items():
    for argv, expected in ((["--help"], 0), (["--no-such-flag"], 2)):
        sys.argv = [script, *argv]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                getattr(arguments, target.split(":")[1])()
                code = "returned"
            except SystemExit as exit:
                code = exit.code
        found[f"{script} {argv[0]}"] = [code == expected, (out.getvalue() + err.getvalue()).split()[:2]]
print(json.dumps({"results": found, "heavy": sorted(set(sys.modules) & {"torch", "transformers", "timm"})}))
"""
    run = subprocess.run([sys.executable, "-c", probe, json.dumps(scripts)], capture_output=True, text=True,
                         timeout=60)
    report = json.loads(run.stdout)
    assert report["heavy"] == [], report
    light = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['vqrae-train', '--help']; "
                            "from stage1.cli.train import vqrae_train; code = vqrae_train(); "
                            "print(code, sorted(set(sys.modules) & {'torch', 'transformers', 'timm'}))"],
                           capture_output=True, text=True, timeout=60)
    assert light.stdout.startswith("usage: vqrae-train") and light.stdout.splitlines()[-1] == "0 []", light.stdout
    for script in scripts:  # help shows the script's own usage line; a bad flag exits 2 with it
        assert report["results"][f"{script} --help"] == [True, ["usage:", script]], report
        assert report["results"][f"{script} --no-such-flag"] == [True, ["usage:", script]], report


def test_offline_lpips_says_why_without_trying_a_download(tmp_path, monkeypatch, capfd):
    """Issue 12, case 11: offline (HF_HUB_OFFLINE=1, as the tests run) and without the backbone in torchvision's
    cache, LPIPS fails with the advice at once: no 'Downloading ...' line, no network attempt."""
    from stage1.train.losses import build_lpips

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(RuntimeError, match="vgg16-397923af.pth is not in torchvision's cache"):
        build_lpips("vgg")
    assert "Downloading" not in capfd.readouterr().err
    # Online as far as the settings say, but no network (issue 31, point 8): one quiet try, then one line of what is
    # missing and how to get it.
    import huggingface_hub.constants
    import torch.hub

    tries = []

    def no_network(url, destination, progress=True):
        tries.append((url, progress))
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(RuntimeError) as err:
        build_lpips("vgg")
    assert tries == [("https://download.pytorch.org/models/vgg16-397923af.pth", False)]
    message = str(err.value)
    assert "\n" not in message and "torchvision.models.vgg16(weights='IMAGENET1K_V1')" in message
    assert f"copy vgg16-397923af.pth into {tmp_path / 'hub' / 'checkpoints'}/" in message
    assert "Downloading" not in capfd.readouterr().err


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # 3 readers on 2 cores: meant
def test_workers_change_nothing_but_speed(model_dir, image_dir, tmp_path, capsys):
    """Issue 13: images read by worker processes or threads come in the same batches and order, with the same step
    outputs, as read in-process (an unreadable file skipped and listed alike); tokenize writes the same bytes with any
    worker count, and a run resumed with another worker count finishes to those bytes too."""
    from stage1.data.datasets import find_images
    from stage1.data.input_pipeline import ImageFiles, collate, image_batches

    data = tmp_path / "data"
    shutil.copytree(image_dir, data)
    (data / "nested" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    names = find_images(str(data))
    chunks = [names[i : i + 2] for i in range(0, len(names), 2)]

    def step(images):  # threads finish out of order: the slowest batch first
        time.sleep(0.05 * (images.sum().item() % 3))
        return images.mean(dim=(1, 2, 3))

    serial = list(image_batches(str(data), chunks, SIZE, num_workers=0, step=step))
    for readers in ("processes", "threads"):
        parallel = list(image_batches(str(data), chunks, SIZE, num_workers=3, step=step, readers=readers))
        assert [b.names for b in serial] == [b.names for b in parallel] == [[n for n in c if "broken" not in n]
                                                                            for c in chunks]
        assert [b.skipped for b in serial] == [b.skipped for b in parallel] != [[]] * len(chunks)
        for a, b in zip(serial, parallel, strict=True):
            assert torch.equal(a.images, b.images) and torch.equal(a.output, b.output), readers
            assert torch.equal(b.output, b.images.mean(dim=(1, 2, 3)))
    # Readers send 8-bit images as uint8 (a quarter of the bytes), floats when a batch holds a deeper one; either
    # way the batches handed out are the single-image path's floats.
    files = ImageFiles(str(data), names, SIZE)
    assert files[names.index("rgb.jpg")][0].dtype == torch.uint8
    assert collate([files[names.index("rgb.jpg")], files[names.index("nested/deep16.png")]]).images.is_floating_point()
    assert torch.equal(torch.cat([b.images for b in serial]), images_as_model_sees_them(
        str(data), [n for b in serial for n in b.names]))

    def tokenize_with(workers, out):
        argv = ["--model", model_dir, "--data", str(data), "--out", str(out), "--shard-size", "2",
                "--batch-size", "1", "--num-workers", str(workers)]
        assert tokenize.main(argv) == 0

    tokenize_with(0, tmp_path / "serial")
    tokenize_with(3, tmp_path / "parallel")
    files = sorted(os.listdir(tmp_path / "serial"))
    assert files == sorted(os.listdir(tmp_path / "parallel")) and len(files) > 6
    for name in files:
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "parallel" / name).read_bytes(), name
    os.remove(tmp_path / "parallel" / "shard-00001.json")  # shard 1 unfinished: done again, by 2 workers
    tokenize_with(2, tmp_path / "parallel")
    assert "resuming: 2 of 3 shard(s) already done" in capsys.readouterr().out
    for name in files:
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "parallel" / name).read_bytes(), name
    with pytest.raises(SystemExit):  # a usage error, before any work
        tokenize.main(["--model", model_dir, "--data", str(data), "--out", str(tmp_path / "x"),
                       "--num-workers", "-1"])
    assert "expected 'auto' or a number of workers >= 0" in capsys.readouterr().err


def test_cpu_threads_run_each_step_on_one_core_and_give_the_cores_back(image_dir):
    """Issue 13: on the CPU each reader thread runs its batch's step with one intra-op thread; torch's thread count
    comes back when the batches end, when the consumer stops early, and when a step fails (its error reaching the
    consumer)."""
    from stage1.data.datasets import find_images
    from stage1.data.input_pipeline import image_batches

    names = find_images(image_dir)
    chunks = [names[i : i + 1] for i in range(len(names))]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        batches = list(image_batches(image_dir, chunks, SIZE, num_workers=2, step=lambda x: seen.append(
            torch.get_num_threads())))
        assert len(batches) == len(chunks) and seen == [1] * len(chunks) and torch.get_num_threads() == 2
        stream = image_batches(image_dir, chunks, SIZE, num_workers=2, step=lambda x: x.sum())
        next(stream)
        assert torch.get_num_threads() == 1
        stream.close()  # stopped after one batch
        assert torch.get_num_threads() == 2

        def failing(images):
            raise RuntimeError("out of memory, say")

        with pytest.raises(RuntimeError, match="out of memory, say"):
            list(image_batches(image_dir, chunks, SIZE, num_workers=2, step=failing))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_8bit_images_resize_as_uint8_within_the_stated_tolerance_of_a_float_resize():
    """Issue 13: 8-bit pixels are resized by torchvision's uint8 kernel (8x faster); the result stays within
    12 / 255 of the float resize at its worst pixel (where the kernel clips a bicubic overshoot between its two
    passes), under 1 / 255 on average, PSNR > 54 dB (images.resize_center_crop)."""
    from stage1.data.images import read_image, resize_center_crop, to_unit_float

    for name in sorted(os.listdir(os.path.join(os.path.dirname(__file__), "..", "assets"))):
        if name.endswith(".jpg"):
            pixels, _ = read_image(os.path.join(os.path.dirname(__file__), "..", "assets", name))
            assert pixels.dtype == torch.uint8
            for size in (64, 128, 224):
                fast, exact = resize_center_crop(pixels, size), resize_center_crop(to_unit_float(pixels), size)
                assert fast.dtype == torch.uint8 and exact.dtype == torch.float32  # each in its own kind
                fast = to_unit_float(fast)
                assert fast.shape == exact.shape == (3, size, size)
                diff = (fast - exact).abs()
                assert diff.max() <= 12 / 255 and diff.mean() < 1 / 255, (name, size)
                assert psnr(fast[None], exact[None]) > 54, (name, size)
                assert not torch.equal(fast, exact)  # the uint8 kernel really ran


def test_jpegs_decode_to_pillows_pixels_turned_as_their_exif_says(tmp_path, monkeypatch):
    """Issue 13: JPEGs are decoded by TorchCodec (libjpeg-turbo, no PIL copies); every kind gives Pillow's own pixels
    exactly, each EXIF orientation turns them as ImageOps.exif_transpose does (and the note says so only then), and
    a truncated one is an UnreadableImageError with a clean reason."""
    from PIL import ImageOps

    from stage1.data import images
    from stage1.data.images import UnreadableImageError, read_image

    photo = Image.open(os.path.join(os.path.dirname(__file__), "..", "assets", sorted(
        n for n in os.listdir(os.path.join(os.path.dirname(__file__), "..", "assets")) if n.endswith(".jpg"))[0]))
    photo = photo.convert("RGB").crop((0, 0, 96, 64))
    kinds = {"420": dict(quality=90), "progressive": dict(quality=75, progressive=True), "444": dict(subsampling=0)}
    for name, options in kinds.items():
        photo.save(tmp_path / f"{name}.jpg", **options)
    photo.convert("L").save(tmp_path / "grey.jpg")
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        photo.save(tmp_path / f"turned{orientation}.jpg", exif=exif)
    decoded = {}
    for path in sorted(tmp_path.iterdir()):
        pixels, note = read_image(str(path))
        decoded[path.name] = pixels
        with Image.open(path) as image:
            expected = torch.from_numpy(np.array(ImageOps.exif_transpose(image).convert("RGB"))).permute(2, 0, 1)
        assert pixels.dtype == torch.uint8 and torch.equal(pixels, expected), path.name
        turned = path.stem.startswith("turned") and path.stem != "turned1"
        assert ("turned upright" in note) == turned and (f"EXIF orientation {path.stem[-1]}" in note) == turned, note
        assert note.startswith(("L" if path.stem == "grey" else "RGB") + f" {pixels.shape[2]}x{pixels.shape[1]}")
    assert read_image(str(tmp_path / "turned6.jpg"))[0].shape == (3, 96, 64)  # stored 96 x 64, seen upright
    # A file far larger than its pixels (junk after the image) is left to Pillow, which reads only what it decodes.
    (tmp_path / "junk.jpg").write_bytes((tmp_path / "420.jpg").read_bytes() + bytes(3 * 96 * 64 + 1))
    expected = read_image(str(tmp_path / "420.jpg"))[0]
    monkeypatch.setattr(images, "_JPEG_EXTRAS", 0)
    monkeypatch.setattr(images, "decode_jpeg", lambda *_, **__: pytest.fail("the tensor decoder was called"))
    assert torch.equal(read_image(str(tmp_path / "junk.jpg"))[0], expected)
    monkeypatch.undo()
    # Where TorchCodec does not load (torch < 2.11), Pillow decodes every JPEG: the same pixels.
    monkeypatch.setattr(images, "decode_jpeg", None)
    assert all(torch.equal(read_image(str(tmp_path / name))[0], pixels) for name, pixels in decoded.items())
    monkeypatch.undo()
    whole = (tmp_path / "420.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # a whole header, half the scan
    with pytest.raises(UnreadableImageError, match="^OSError: Image is incomplete or truncated$"):
        read_image(str(tmp_path / "cut.jpg"))


def test_compile_flag_gives_the_same_codes_and_attention_runs_on_sdpa(model_dir, image_dir, tmp_path, monkeypatch):
    """Issue 13: --compile (dynamo with the eager backend here) writes the same shards; the encoder attends with
    transformers' sdpa implementation and the decoder's blocks with torch's fused attention."""
    import stage1.model.vqrae

    model = VQRAE.from_pretrained(model_dir)
    assert model.encoder.model.config._attn_implementation == "sdpa"
    assert all(block.attn.fused_attn for block in model.decoder.blocks)
    monkeypatch.setattr(stage1.model.vqrae, "COMPILE_OPTIONS", {"backend": "eager"})
    for flags, out in (([], "eager"), (["--compile"], "compiled")):
        assert tokenize.main(["--model", model_dir, "--data", image_dir, "--out", str(tmp_path / out), *flags]) == 0
    for name in os.listdir(tmp_path / "eager"):
        assert (tmp_path / "eager" / name).read_bytes() == (tmp_path / "compiled" / name).read_bytes(), name
    compiled = VQRAE.from_pretrained(model_dir).compile_parts()
    assert compiled.decoder._compiled_call_impl is not None  # compiled in place ...
    assert sorted(compiled.state_dict()) == sorted(model.state_dict())  # ... under the same tensor names


def test_token_exports_read_back_to_the_codes_and_class_labels(model_dir, class_tree, tmp_path):
    """Issue 14: jsonl and memmap exports hold each image's codes and ImageFolder class id as the shards do, and
    those codes decode to the model's own reconstruction of the image (llamagen: tests/test_llamagen.py)."""
    from stage1.cli.arguments import tokenize_parser
    from stage1.data.token_exports import FORMATS

    # The light parser spells the formats out (it imports no numpy); they are the exporter's.
    assert tuple(next(a.choices for a in tokenize_parser()._actions if a.dest == "format")) == FORMATS
    out = tmp_path / "tokens"
    for fmt in ("shards", "jsonl", "memmap"):  # later runs resume (nothing to do) and export
        assert tokenize.main(["--model", model_dir, "--data", class_tree, "--out", str(out), "--format", fmt]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == ["cat", "dog"] and manifest["views"] == 1
    names = [e["path"] for e in manifest["images"]]
    assert names == ["cat/a.png", "cat/b.png", "dog/c.png", "root.png"]
    assert [e["label"] for e in manifest["images"]] == [0, 0, 1, -1]
    shard = np.load(out / "shard-00000.npy")  # (4, 4, 4)
    lines = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    assert [(d["image"], d["class_id"]) for d in lines] == list(zip(names, [0, 0, 1, -1], strict=True))
    assert all(d["tokens"] == shard[i].reshape(-1).tolist() for i, d in enumerate(lines))
    memmap = np.load(out / "codes.npy", mmap_mode="r")
    assert isinstance(memmap, np.memmap) and np.array_equal(memmap, shard)
    assert np.load(out / "labels.npy").tolist() == [0, 0, 1, -1]
    assert json.loads((out / "codes_index.json").read_text())["images"] == names
    model = VQRAE.from_pretrained(model_dir).eval()
    x = images_as_model_sees_them(class_tree, names)
    exported = torch.tensor([d["tokens"] for d in lines]).reshape(4, 4, 4)
    with torch.no_grad():
        assert torch.equal(model.decode_from_indices(exported), model.decode_from_indices(model.encode_to_indices(x)))


def test_augmented_tokenization_codes_every_view(model_dir, class_tree, tmp_path):
    """Issue 14: --augment flip codes each image and its mirror, --augment ten-crop the ten crops of a center crop
    1.1x the size (LlamaGen's views); the jsonl export holds them as [views][h * w] and vqrae-decode paints the
    first view."""
    from torchvision.transforms import v2

    model = VQRAE.from_pretrained(model_dir).eval()
    names = ["cat/a.png", "cat/b.png", "dog/c.png", "root.png"]
    x = images_as_model_sees_them(class_tree, names)
    big = torch.stack([prepare(os.path.join(class_tree, n), int(SIZE * 1.1))[0] for n in names])
    with torch.no_grad():
        expected = {"flip": torch.stack([model.encode_to_indices(v) for v in (x, x.flip(-1))], 1),
                    "ten-crop": torch.stack([model.encode_to_indices(v) for v in v2.functional.ten_crop(big, SIZE)], 1)}
    for augment, views in (("flip", 2), ("ten-crop", 10)):
        out = tmp_path / augment
        argv = ["--model", model_dir, "--data", class_tree, "--out", str(out), "--augment", augment,
                "--format", "jsonl"]
        assert tokenize.main(argv) == 0
        shard = np.load(out / "shard-00000.npy")
        assert shard.shape == (4, views, 4, 4) and np.array_equal(shard, expected[augment].numpy())
        first = json.loads((out / "tokens.jsonl").read_text().splitlines()[0])["tokens"]
        assert first == shard[0].reshape(views, 16).tolist()
    assert decode.main(["--model", model_dir, "--tokens", str(tmp_path / "flip"), "--out", str(tmp_path / "png")]) == 0
    with torch.no_grad():
        painted = model.decode_from_indices(expected["flip"][:1, 0])[0]
    assert torch.equal(to_uint8(painted), v2.functional.pil_to_tensor(Image.open(tmp_path / "png" / "cat" / "a.png")))


def adm_reference(pil_image, image_size):
    """ADM's center_crop_arr, as guided-diffusion's image_datasets.py writes it (the reference for the parity)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def test_adm_protocol_crops_as_adm_and_saves_npz_batches(model_dir, tmp_path):
    """Issue 14: --protocol adm crops every image exactly as ADM's center_crop_arr (pixel for pixel, on sizes that
    halve and that do not), reads the ImageNet val layout (class folders, .JPEG), says so in results.json, and
    --save-npz writes the uint8 arrays external FID suites read."""
    from stage1.data.images import adm_center_crop, read_image

    val = tmp_path / "val"
    photos = ["chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    for i, (name, size) in enumerate(zip(photos, [(1100, 770), (300, 500), (65, 64)], strict=True)):
        (val / f"n0000000{i}").mkdir(parents=True)
        photo = Image.open(os.path.join(os.path.dirname(__file__), "..", "assets", name)).convert("RGB")
        photo.resize(size, Image.BICUBIC).save(val / f"n0000000{i}" / f"ILSVRC2012_val_{i:08d}.JPEG", quality=95)
    files = sorted(val.rglob("*.JPEG"))
    for path in files:
        pixels, _ = read_image(str(path))
        expected = torch.from_numpy(adm_reference(Image.open(path).convert("RGB"), SIZE)).permute(2, 0, 1)
        assert torch.equal(adm_center_crop(pixels, SIZE), expected), path.name
    out = tmp_path / "eval"
    argv = ["--model", model_dir, "--data", str(val), "--out", str(out), "--protocol", "adm", "--save-npz"]
    assert evaluate.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["num_images"] == 3 and "ADM's center_crop_arr" in results["protocol"]
    originals, reconstructions = (np.load(out / f"{name}.npz")["arr_0"] for name in ("originals", "reconstructions"))
    assert originals.dtype == reconstructions.dtype == np.uint8 and originals.shape == (3, SIZE, SIZE, 3)
    for path, saved in zip(files, originals, strict=True):
        assert np.array_equal(saved, adm_reference(Image.open(path).convert("RGB"), SIZE))
    model = VQRAE.from_pretrained(model_dir).eval()
    x = torch.from_numpy(originals).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        rec = model(x)
    assert np.array_equal(reconstructions, to_uint8(rec).permute(0, 2, 3, 1).numpy())
    assert results["psnr"] == pytest.approx(psnr(rec, x).mean().item(), rel=1e-5)
    assert not list(out.glob(".*tmp"))  # the memory maps are gone


def test_push_uploads_a_model_that_loads_back_from_its_repo_id(model_dir, image_dir, tmp_path, monkeypatch, capsys):
    """Issue 14: vqrae-push stages the weights, config, the local encoder (nobody else could reach it), a model card
    with the evaluation and a sample grid, and uploads them (to a stand-in for the Hub here: no network); the repo id
    then loads the same model through from_pretrained's Hub path."""
    import huggingface_hub

    import stage1.model.pretrained
    from stage1.cli import push

    hub, calls = tmp_path / "hub", []

    class FakeHub:  # records the calls and keeps the upload in a local folder
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message=None):
            shutil.copytree(folder_path, hub / repo_id)
            return "https://huggingface.co/someone/tiny/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    assert evaluate.main(["--model", model_dir, "--data", image_dir, "--out", str(tmp_path / "eval")]) == 0
    assert reconstruct.main(["--model", model_dir, "--image", os.path.join(image_dir, "rgb.jpg"),
                             "--out", str(tmp_path / "grid.png")]) == 0
    argv = ["--model", model_dir, "--repo", "someone/tiny", "--results", str(tmp_path / "eval" / "results.json"),
            "--samples", str(tmp_path / "grid.png"), "--private"]
    assert push.main(argv) == 0
    assert calls == [("create_repo", "someone/tiny", True, True)]
    repo = hub / "someone" / "tiny"
    assert sorted(os.listdir(repo)) == ["README.md", "config.json", "encoder", "model.safetensors", "samples.png"]
    card = (repo / "README.md").read_text()
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert 'VQRAE.from_pretrained("someone/tiny")' in card and "one EMA codebook of 64 codes" in card
    assert f"| PSNR (dB) | {results['psnr']:.4g} |" in card and "(samples.png)" in card
    # Rendered as Markdown, every table row keeps its value (an unescaped `||z - z_q||` split the row, and the
    # renderer dropped the cells past the header's two: the value).
    from markdown_it import MarkdownIt

    rows, row = [], []
    for token in MarkdownIt("commonmark").enable("table").parse(card.split("---", 2)[2]):
        if token.type == "inline" and row is not None:
            row.append(token.content)
        elif token.type == "tr_open":
            row = []
        elif token.type == "tr_close":
            rows.append(row)
            row = None
    assert len(rows) > 8 and all(len(cells) == 2 and all(cells) for cells in rows), rows
    distortion = f"{results['latent_relative_distortion']:.4g}"
    assert ["latent distortion ||z - z_q||^2 / var(z)", distortion] in rows
    # The repo id, through the Hub path of from_pretrained (files and the encoder folder served from the upload).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # a Hub to ask, faked below
    monkeypatch.setattr(stage1.model.pretrained, "cached_file", lambda repo_id, name, **_: str(hub / repo_id / name))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, allow_patterns, **_: str(hub / repo_id))
    loaded, original = VQRAE.from_pretrained("someone/tiny").eval(), VQRAE.from_pretrained(model_dir).eval()
    x = images_as_model_sees_them(image_dir, ["rgb.jpg", "alpha.png"])
    with torch.no_grad():
        assert torch.equal(loaded.encode_to_indices(x), original.encode_to_indices(x))
        assert torch.equal(loaded(x), original(x))
    capsys.readouterr()
    assert push.main(["--model", model_dir, "--repo", "no-slash"]) == 2
    assert "must be 'user/name'" in capsys.readouterr().err
    old_umask = os.umask(0o022)
    try:
        assert push.main(["--model", model_dir, "--repo", "a/b", "--stage", str(tmp_path / "staged")]) == 0
    finally:
        os.umask(old_umask)
    assert (tmp_path / "staged" / "README.md").is_file() and len(calls) == 1  # staged only: nothing sent
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in
             (tmp_path / "staged").rglob("*")}  # the staged encoder's weights too (transformers wrote them 0600)
    assert "staged/encoder/model.safetensors" in modes and set(modes.values()) == {0o644, 0o755}, modes
    bad = ["--model", model_dir, "--repo", "a/b", "--stage", str(tmp_path / "bad"), "--samples", "no-such.png"]
    assert push.main(bad) == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # checked before the model is written there


def test_push_card_metadata_is_the_hubs(model_dir, tiny_encoders, tmp_path):
    """Issue 21: the card's metadata is huggingface_hub's (ModelCard reads it back): the license of the encoder
    family's weights (MAE's are CC-BY-NC) unless --license, the encoder as base_model when it is a Hub id, the
    datasets, and the evaluation as model-index results with results.json's values."""
    from huggingface_hub import ModelCard

    from stage1.cli import push

    results = {"psnr": 21.5, "ssim": 0.61, "rfid": 3.25, "codebook_usage": 0.9, "latent_cosine": 0.8,
               "lpips": None, "num_images": 8, "image_size": 32}
    (tmp_path / "results.json").write_text(json.dumps(results))
    argv = ["--model", model_dir, "--repo", "someone/tiny", "--results", str(tmp_path / "results.json"),
            "--datasets", "ILSVRC/imagenet-1k", "--stage", str(tmp_path / "staged")]
    assert push.main(argv) == 0
    data = ModelCard.load(tmp_path / "staged" / "README.md").data
    assert (data.license, data.library_name, data.pipeline_tag) == ("apache-2.0", "vqrae", "image-feature-extraction")
    assert data.datasets == ["ILSVRC/imagenet-1k"] and data.base_model is None  # a local encoder: no Hub id
    scores = {r.metric_type: r.metric_value for r in data.eval_results}
    assert scores == {k: v for k, v in results.items() if k in ("psnr", "ssim", "rfid", "codebook_usage",
                                                                 "latent_cosine")}
    assert {r.dataset_type for r in data.eval_results} == {"ILSVRC/imagenet-1k"}
    # An MAE encoder: its family's non-commercial license, unless --license says otherwise.
    mae = tiny_vqrae(tiny_encoders["mae"][1], encoder_cls="MAE")
    mae.save_pretrained(tmp_path / "mae")
    assert push.main(["--model", str(tmp_path / "mae"), "--repo", "a/b", "--stage", str(tmp_path / "s1")]) == 0
    assert ModelCard.load(tmp_path / "s1" / "README.md").data.license == "cc-by-nc-4.0"
    assert push.main(["--model", str(tmp_path / "mae"), "--repo", "a/b", "--stage", str(tmp_path / "s2"),
                      "--license", "other", "--base-model", "facebook/vit-mae-base"]) == 0
    data = ModelCard.load(tmp_path / "s2" / "README.md").data
    assert (data.license, data.base_model, data.eval_results) == ("other", "facebook/vit-mae-base", None)


def test_tar_shards_read_as_the_folder_they_were_made_from(model_dir, class_tree, tmp_path, capsys):
    """Issue 14: vqrae-make-shards keeps every image's bytes, path and class id; tokenize, evaluate, latent-stats and
    fit-codebook read the shards (a brace pattern, a :: list) to the folder's results: the same code shards byte for
    byte, the same labels, scores, statistics and fitted codebook; a resumed tokenize skips finished tars; a corrupt
    sample is skipped and listed."""
    import tarfile

    from stage1.cli import make_shards
    from stage1.data.tar_shards import read_shard

    shards = tmp_path / "shards"
    assert make_shards.main(["--data", class_tree, "--out", str(shards), "--shard-size", "2"]) == 0
    assert sorted(os.listdir(shards)) == ["000000.tar", "000001.tar"]
    samples = read_shard(str(shards / "000000.tar")) + read_shard(str(shards / "000001.tar"))
    assert [(s.name, s.label) for s in samples] == [("cat/a.png", 0), ("cat/b.png", 0), ("dog/c.png", 1),
                                                    ("root.png", -1)]
    assert all(s.data == open(os.path.join(class_tree, s.name), "rb").read() for s in samples)
    spec = str(shards / "{000000..000001}.tar")
    for data, out in ((class_tree, "folder"), (spec, "tars")):
        argv = ["--model", model_dir, "--data", data, "--out", str(tmp_path / out), "--shard-size", "2"]
        assert tokenize.main(argv) == 0
    for name in ("shard-00000.npy", "shard-00001.npy", "shard-00000.json", "shard-00001.json"):
        assert (tmp_path / "folder" / name).read_bytes() == (tmp_path / "tars" / name).read_bytes(), name
    folder, tars = (json.loads((tmp_path / out / "manifest.json").read_text()) for out in ("folder", "tars"))
    assert folder["images"] == tars["images"] and tars["classes"] is None
    os.remove(tmp_path / "tars" / "shard-00001.json")
    capsys.readouterr()
    assert tokenize.main(["--model", model_dir, "--data", spec, "--out", str(tmp_path / "tars")]) == 0
    assert "resuming: 1 of 2 shard(s) already done" in capsys.readouterr().out
    redone = (tmp_path / "tars" / "shard-00001.npy").read_bytes()
    assert redone == (tmp_path / "folder" / "shard-00001.npy").read_bytes()
    listed = f"{shards / '000000.tar'}::{shards / '000001.tar'}"
    for data, out in ((class_tree, "eval_folder"), (listed, "eval_tars")):
        assert evaluate.main(["--model", model_dir, "--data", data, "--out", str(tmp_path / out)]) == 0
        assert latent_stats.main(["--encoder", VQRAE.from_pretrained(model_dir).config.encoder.path, "--data", data,
                                  "--out", str(tmp_path / f"{out}.safetensors"), "--image-size", str(SIZE)]) == 0
    a, b = (json.loads((tmp_path / out / "results.json").read_text()) for out in ("eval_folder", "eval_tars"))
    assert a["psnr"] == b["psnr"] and a["num_images"] == b["num_images"] == 4
    sa, sb = (load_file(tmp_path / f"{out}.safetensors") for out in ("eval_folder", "eval_tars"))
    assert all(torch.equal(sa[k], sb[k]) for k in ("mean", "var"))
    for data, out in ((class_tree, "fit_folder"), (spec, "fit_tars")):  # local tars, sampled by position
        assert fit_codebook.main(["--model", model_dir, "--data", data, "--out", str(tmp_path / out),
                                  "--tokens-per-image", "16", "--iters", "2"]) == 0
    fitted = [load_file(tmp_path / out / "model.safetensors") for out in ("fit_folder", "fit_tars")]
    assert torch.equal(fitted[0]["quantizer.embedding"], fitted[1]["quantizer.embedding"])
    broken = tmp_path / "broken.tar"
    with tarfile.open(broken, "w") as tar:
        for name, data in (("0.png", open(os.path.join(class_tree, "root.png"), "rb").read()),
                           ("1.png", b"\x89PNG\r\n\x1a\nbroken")):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    assert evaluate.main(["--model", model_dir, "--data", str(broken), "--out", str(tmp_path / "eval_broken")]) == 0
    results = json.loads((tmp_path / "eval_broken" / "results.json").read_text())
    assert results["num_images"] == 1 and [s["path"] for s in results["skipped_images"]] == ["1.png"]


@pytest.mark.parametrize("fmt", ["jsonl", "memmap", "wds"])
def test_every_export_matches_its_manifest_after_a_restart_over_a_larger_one(model_dir, class_tree, tmp_path, fmt):
    """Issue 32, point 5: after --restart over an export of more images, the layout holds this run's images only."""
    tree = tmp_path / "tree"
    shutil.copytree(class_tree, tree)
    out = tmp_path / "tokens"
    argv = ["--model", model_dir, "--data", str(tree), "--out", str(out), "--format", fmt, "--shard-size", "2"]
    assert tokenize.main(argv) == 0
    os.remove(tree / "dog" / "c.png")
    os.remove(tree / "root.png")
    assert tokenize.main([*argv, "--restart"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    paths = [entry["path"] for entry in manifest["images"]]
    assert paths == ["cat/a.png", "cat/b.png"]
    if fmt == "jsonl":
        assert [json.loads(line)["image"] for line in (out / "tokens.jsonl").read_text().splitlines()] == paths
    elif fmt == "memmap":
        assert np.load(out / "codes.npy").shape[0] == len(np.load(out / "labels.npy")) == 2
        assert json.loads((out / "codes_index.json").read_text())["images"] == paths
    else:
        assert sorted(os.listdir(out / "wds")) == ["000000.tar"]  # the earlier run's second tar is gone


@pytest.mark.parametrize("command", ["decode", "evaluate", "fit_codebook", "latent_stats", "make_shards", "push",
                                     "reconstruct", "tokenize", "train"])
@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package:RuntimeWarning")  # runpy, in-process
def test_every_command_runs_as_a_module(command, capsys, monkeypatch):
    """`python -m stage1.cli.NAME` is the command (a second probe of issue 32: seven of them exited 0 doing nothing):
    here without its required arguments, a usage error."""
    import runpy

    monkeypatch.setattr("sys.argv", [command])
    with pytest.raises(SystemExit) as stop:
        runpy.run_module(f"stage1.cli.{command}", run_name="__main__")
    assert stop.value.code == 2 and "error:" in capsys.readouterr().err


def test_a_resume_is_the_same_tokenization_or_refused(model_dir, class_tree, tmp_path, capsys):
    """A second probe of issue 32: image names holding newlines made two listings one ({a, "b\\nc"} and
    {"a\\nb", c}), shards without their tokenize_run.json (a killed --restart removed it late) were reused even by
    another model, and a resume at another precision mixed bf16 and fp32 codes: each is another tokenization now."""
    images, out = tmp_path / "images", tmp_path / "tokens"
    images.mkdir()
    root_png = open(os.path.join(class_tree, "root.png"), "rb").read()
    for name in ("a.png", "b.png\nc.png"):
        (images / name).write_bytes(root_png)
    argv = ["--model", model_dir, "--data", str(images), "--out", str(out), "--format", "jsonl"]
    assert tokenize.main(argv) == 0
    for name in ("a.png", "b.png\nc.png"):
        os.remove(images / name)
    for name in ("a.png\nb.png", "c.png"):
        (images / name).write_bytes(root_png)
    capsys.readouterr()
    assert tokenize.main(argv) == 2 and "holds shards of another tokenization" in capsys.readouterr().err
    os.remove(out / "tokenize_run.json")
    assert tokenize.main(argv) == 2 and "no record of the tokenization" in capsys.readouterr().err
    assert tokenize.main([*argv, "--restart"]) == 0
    assert [json.loads(line)["image"] for line in (out / "tokens.jsonl").read_text().splitlines()] == \
        ["a.png\nb.png", "c.png"]
    assert json.loads((out / "tokenize_run.json").read_text())["precision"] == "fp32"
    record = json.loads((out / "tokenize_run.json").read_text())
    (out / "tokenize_run.json").write_text(json.dumps({**record, "precision": "bf16"}))  # a run begun on a GPU
    capsys.readouterr()
    assert tokenize.main(argv) == 2 and "'precision'" in capsys.readouterr().err


def test_resumed_shards_are_checked_as_their_readers_check_them(model_dir, class_tree, tmp_path, capsys):
    """A second probe of issue 32: a resume exported shards edited by hand as they were (codes past the codebook went
    to LlamaGen's files, a label of 99 of 2 classes to MaskGIT's); the manifest is checked against them first."""
    out = tmp_path / "tokens"
    argv = ["--model", model_dir, "--data", class_tree, "--out", str(out), "--format", "jsonl", "--shard-size", "2"]
    assert tokenize.main(argv) == 0
    shard = np.load(out / "shard-00000.npy")
    np.save(out / "shard-00000.npy", np.full_like(shard, 200))
    capsys.readouterr()
    assert tokenize.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert errors == ["vqrae-tokenize: error: shard-00000.npy holds codes from 200 to 200, outside the manifest's "
                      "codebook of 64"], err
    np.save(out / "shard-00000.npy", shard)
    listing = json.loads((out / "shard-00001.json").read_text())
    listing["labels"][0] = 99
    (out / "shard-00001.json").write_text(json.dumps(listing))
    assert tokenize.main(argv) == 2
    assert "has label 99, not one of the 2 classes (or -1)" in capsys.readouterr().err


def test_tokenize_keeps_its_inputs_and_export_folders_whole(model_dir, class_tree, tmp_path, capsys):
    """A second probe of issue 32: --restart with --data inside --out (its own wds tars) removed the input; a killed
    export's hidden temporary file stayed in LlamaGen's folder (which its loader lists); --maskgit-root naming a file
    failed after the shards were written, and a classes.json of [] was an AttributeError."""
    out = tmp_path / "tokens"
    base = ["--model", model_dir, "--out", str(out)]
    assert tokenize.main([*base, "--data", class_tree, "--format", "wds"]) == 0
    capsys.readouterr()
    assert tokenize.main([*base, "--data", str(out / "wds" / "000000.tar"), "--format", "wds", "--restart"]) == 2
    assert "lies inside --out" in capsys.readouterr().err and (out / "wds" / "000000.tar").exists()
    leftover = out / "wds" / ".000001.tar.abcd.tmp"
    leftover.write_bytes(b"half a tar")
    assert tokenize.main([*base, "--data", class_tree, "--format", "wds"]) == 0
    assert not leftover.exists()
    (tmp_path / "afile").write_text("x")
    capsys.readouterr()
    folder_tree = tmp_path / "tree"
    shutil.copytree(os.path.join(class_tree, "cat"), folder_tree / "cat")
    for root, message in ((tmp_path / "afile", "is not a folder"), (tmp_path / "listroot", "class folder(s) that "
                                                                                             "differ")):
        if root.name == "listroot":
            root.mkdir()
            (root / "classes.json").write_text("[]")
        assert tokenize.main(["--model", model_dir, "--data", str(folder_tree), "--out",
                              str(tmp_path / f"out_{root.name}"), "--format", "maskgit", "--maskgit-root",
                              str(root)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert not list((tmp_path / f"out_{root.name}").glob("shard-*"))


@pytest.mark.parametrize("field, value", [("split", {"a": 1}), ("data", ["x"]), ("num_images", "12"),
                                          ("image_size", True)])
def test_push_checks_every_results_field_before_staging_anything(model_dir, tmp_path, capsys, field, value):
    """Issue 32, point 8: a results.json whose `split` was an object was a TypeError after the weights were staged."""
    from stage1.cli import push

    results = tmp_path / "results.json"
    results.write_text(json.dumps({"psnr": 21.5, "split": "validation", "num_images": 30, field: value}))
    staged = tmp_path / "staged"
    assert push.main(["--model", model_dir, "--repo", "a/b", "--stage", str(staged), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"results.json: {field} must be" in err, err
    assert not staged.exists() or not os.listdir(staged)
