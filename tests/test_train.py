import json
import os
import shutil
import sys
import urllib.error

import pytest
import torch
from helpers import REPO_ROOT, step_logs, torchrun, train_metrics
from helpers import run_training as run
from safetensors.torch import load_file, save_file
from torchvision.utils import save_image

from stage1 import VQRAE
from stage1.data.datasets import ImageDataset, build_transform, find_images
from stage1.train.config import load_run_config
from stage1.train.losses import adaptive_weight, build_lpips
from stage1.train.trainer import train

LOSS_KEYS = ("loss", "recon_loss", "lpips", "vq_loss", "commitment_loss", "perplexity", "codebook_usage",
             "grad_norm", "lr", "g_loss", "adaptive_weight", "d_loss")


def assert_same_losses(expected_dir, actual_dir, steps=range(1, 9)):
    """Every step of `steps` logged once in actual_dir, each loss term equal to expected_dir's (fp32 rounding)."""
    expected, actual = step_logs(expected_dir), step_logs(actual_dir)
    assert sorted(actual) == list(steps)
    for step in steps:
        for key in LOSS_KEYS:
            if key in expected[step]:
                assert actual[step][key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-8), (step, key)


def test_training_writes_loadable_checkpoints_without_the_encoder(train_images, tmp_path):
    summary = run(train_images, tmp_path / "run")
    assert summary["step"] == 8
    model = VQRAE.from_pretrained(summary["final"]).eval()
    assert model.quantizer.num_embeddings == 64
    checkpoints = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert checkpoints == ["step-0000004", "step-0000008"]  # keep_last=2, nothing else left behind
    for name in ("model.safetensors", "ema.safetensors"):
        weights = load_file(tmp_path / "run" / "checkpoints" / "step-0000008" / name)
        assert weights and not any(k.startswith("encoder.") for k in weights)
    raw = load_file(tmp_path / "run" / "checkpoints" / "step-0000008" / "model.safetensors")
    ema = load_file(tmp_path / "run" / "checkpoints" / "step-0000008" / "ema.safetensors")
    assert not torch.equal(raw["decoder.head.weight"], ema["decoder.head.weight"])  # EMA is its own copy
    assert torch.equal(raw["quantizer.embedding"], ema["quantizer.embedding"])
    step_dir = tmp_path / "run" / "checkpoints" / "step-0000008"
    with_ema = VQRAE.from_pretrained(step_dir, weights_name="ema.safetensors")
    assert torch.equal(with_ema.decoder.head.weight, ema["decoder.head.weight"])
    assert torch.equal(VQRAE.from_pretrained(step_dir).decoder.head.weight, raw["decoder.head.weight"])
    # final/ holds the EMA decoder
    assert torch.equal(model.decoder.head.weight, ema["decoder.head.weight"])
    assert sorted(os.listdir(tmp_path / "run" / "samples")) == ["step-0000004.png", "step-0000008.png"]
    assert os.path.isfile(tmp_path / "run" / "reconstructions.png")
    logs = step_logs(tmp_path / "run")
    assert sorted(logs) == list(range(1, 9))
    assert all(0 < logs[s]["codebook_usage"] <= 1 and logs[s]["perplexity"] >= 1 for s in logs)


def test_adversarial_term_starts_after_disc_start(train_images, tmp_path):
    run(train_images, tmp_path / "run", "loss.disc_start=5")
    logs = step_logs(tmp_path / "run")
    for step in range(1, 6):
        assert "g_loss" not in logs[step] and "d_loss" not in logs[step]
        # Before disc_start the total is exactly recon + lpips + vq (weights 1.0 and 0.5 in loss/tiny.yaml).
        expected = logs[step]["recon_loss"] + 0.5 * logs[step]["lpips"] + logs[step]["vq_loss"]
        assert logs[step]["loss"] == pytest.approx(expected, rel=1e-5)
    for step in range(6, 9):
        assert {"g_loss", "d_loss", "adaptive_weight"} <= set(logs[step])
        assert logs[step]["adaptive_weight"] > 0


def test_adaptive_weight_is_the_gradient_norm_ratio():
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    out = layer(x)
    nll, g = out.pow(2).mean(), -out.sum() * 3
    weight = adaptive_weight(nll, g, layer.weight)
    grad_nll = torch.autograd.grad(nll, layer.weight, retain_graph=True)[0]
    grad_g = torch.autograd.grad(g, layer.weight, retain_graph=True)[0]
    assert weight.item() == pytest.approx((grad_nll.norm() / (grad_g.norm() + 1e-4)).item(), rel=1e-6)
    assert not weight.requires_grad
    assert adaptive_weight(nll, g * 1e-9, layer.weight, max_weight=5.0).item() == 5.0


def test_resumed_run_logs_the_same_losses_as_an_uninterrupted_one(train_images, tmp_path):
    run(train_images, tmp_path / "whole")
    interrupted = run(train_images, tmp_path / "split", "train.stop_at=4")
    assert interrupted["step"] == 4 and "final" not in interrupted
    resumed = run(train_images, tmp_path / "split")  # resume=auto picks up checkpoints/step-0000004
    assert resumed["step"] == 8
    assert_same_losses(tmp_path / "whole", tmp_path / "split")  # each step logged once, with the same losses
    a = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    b = load_file(tmp_path / "split" / "final" / "model.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-7), key


def test_resuming_a_checkpoint_of_another_model_names_what_differs(train_images, tmp_path, capsys):
    """Issue 20: a checkpoint whose weights do not fit (another codebook size) is one error naming the differing
    fields and the way out, nothing written; a value that changes no weight's shape is resumed with a note."""
    run(train_images, tmp_path / "run", "train.stop_at=4", "train.sample_every=null")
    before = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    with pytest.raises(ValueError, match=r"is a checkpoint of another model \(it differs in quantizer.num_embeddings "
                                         r"\(64 there, 32 here\)\).*train.resume=null"):
        run(train_images, tmp_path / "run", "quantizer.num_embeddings=32")
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == before
    capsys.readouterr()
    assert run(train_images, tmp_path / "run", "quantizer.decay=0.5", "train.sample_every=null")["step"] == 8
    assert "differs from the checkpoint's in quantizer.decay (0.95 there, 0.5 here)" in capsys.readouterr().out


def test_every_checkpoint_file_gets_the_mode_a_plain_write_gives(train_images, tmp_path):
    """Issue 20: discriminator.safetensors was written 0600 while every other file followed the umask."""
    import stat

    old = os.umask(0o022)
    try:
        run(train_images, tmp_path / "run", "train.stop_at=4", "train.sample_every=null")
    finally:
        os.umask(old)
    step = tmp_path / "run" / "checkpoints" / "step-0000004"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in step.iterdir()}
    assert "discriminator.safetensors" in modes and set(modes.values()) == {0o644}, modes
    # Issue 31, point 5: every file and folder the run wrote, the weights transformers saved included.
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").rglob("*")}
    assert {mode for path, mode in modes.items() if os.path.isfile(tmp_path / path)} == {0o644}, modes
    assert {mode for path, mode in modes.items() if os.path.isdir(tmp_path / path)} == {0o755}, modes


def test_a_fresh_run_into_a_killed_runs_folder_keeps_none_of_its_rows(train_images, tmp_path):
    """Issue 20: the dead run's metrics.jsonl rows stayed (two step-0 rows, overlapping plots)."""
    (tmp_path / "run").mkdir()
    dead = [{"step": 0, "codebook_fit": True, "tokens": 1}, {"step": 3, "loss": 9.0}]
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in dead))
    run(train_images, tmp_path / "run", "train.steps=2", "train.ckpt_every=100", "train.sample_every=null",
        "train.report_reconstructions=false")
    rows = train_metrics(tmp_path / "run")
    assert [r["step"] for r in rows if r.get("codebook_fit")] == [0] and rows[0]["tokens"] != 1
    assert all(r.get("loss") != 9.0 for r in rows) and max(r["step"] for r in rows) == 2


def test_loss_falls_on_a_small_overfit_run(train_images, tmp_path):
    run(train_images, tmp_path / "run", "train.steps=80", "train.ckpt_every=80", "train.sample_every=null",
        "train.warmup_steps=5", "loss.disc_start=1000", "quantizer.num_embeddings=128", "data.augment=center_crop",
        "data.hflip=false")
    logs = step_logs(tmp_path / "run")
    first = sum(logs[s]["recon_loss"] for s in range(1, 6)) / 5
    last = sum(logs[s]["recon_loss"] for s in range(76, 81)) / 5
    assert last < first / 2, (first, last)


@pytest.mark.slow  # spawns processes (torchrun / mp.spawn / a killed writer)
def test_two_processes_with_torchrun_keep_identical_codebooks(train_images, tmp_path):
    result = torchrun(os.path.join(REPO_ROOT, "scripts", "train_stage1.py"), "experiment=tiny_test",
                      f"data.path={train_images}", f"results_dir={tmp_path / 'ddp'}", "train.steps=6",
                      "train.ckpt_every=3", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checks = [m for m in train_metrics(tmp_path / "ddp") if m.get("checkpoint")]
    assert [c["step"] for c in checks] == [3, 6]
    assert all(c["ranks_identical"] for c in checks)
    assert VQRAE.from_pretrained(tmp_path / "ddp" / "final").quantizer.num_embeddings == 64
    assert sorted(step_logs(tmp_path / "ddp")) == list(range(1, 7))


@pytest.mark.parametrize(
    "override,message",
    [
        ("encoder.cls=DINOv9", "encoder.cls must be one of"),
        ("train.lr=-0.001", "train.lr must be > 0, got -0.001"),
        ("train.steps=0", "train.steps must be > 0"),
        ("quantizer.decay=1.5", r"quantizer.decay must be in \[0, 1\)"),
        ("image_size=36", r"encoder_input_size \(36\) must be a multiple of the encoder.s patch size \(8\)"),
    ],
)
def test_bad_config_values_fail_at_start(train_images, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        run(train_images, tmp_path / "bad", override)
    assert not os.path.exists(tmp_path / "bad" / "checkpoints")


def test_missing_or_empty_data_folder_fails_at_start(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images found under"):
        run(str(tmp_path / "empty"), tmp_path / "r1")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(str(tmp_path / "nowhere"), tmp_path / "r2")
    with pytest.raises(ValueError, match="config value missing: data.path"):
        train(load_run_config(["experiment=tiny_test", f"results_dir={tmp_path / 'r3'}"]))


def test_unknown_config_keys_are_rejected():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="lerning_rate"):
        load_run_config(["experiment=tiny_test", "train.lerning_rate=1"])
    # hydra's own advice after a typo, `+key=`, adds the key to the tree: the typed config refuses it.
    with pytest.raises(ValueError, match=r"unknown train config keys \['stepz'\]"):
        load_run_config(["experiment=tiny_test", "data.path=x", "+train.stepz=3"])


def test_unreadable_images_are_skipped_and_counted(train_images, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a.png", "c.png"):
        save_image(torch.rand(3, 16, 16), folder / name)
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    dataset = ImageDataset(str(folder), build_transform(16, "center_crop"))
    assert dataset.paths == ["a.png", "b.png", "c.png"]
    with pytest.warns(UserWarning, match="skipping unreadable image b.png"):
        sample = dataset[(1, 0)]
    assert sample["skipped"] == 1 and sample["image"].shape == (3, 16, 16)
    assert dataset[(0, 0)]["skipped"] == 0


def test_only_regular_files_are_images(tmp_path):
    """Issue 20: a FIFO named like an image blocked vqrae-tokenize forever; only regular files (or links to them) are
    listed, each real file once (issue 32: under its first name in sorted order)."""
    save_image(torch.rand(3, 8, 8), tmp_path / "real.png")
    os.mkfifo(tmp_path / "pipe.png")
    os.symlink(tmp_path / "real.png", tmp_path / "link.png")
    assert find_images(str(tmp_path)) == ["link.png"]
    os.remove(tmp_path / "link.png")
    os.symlink(tmp_path / "real.png", tmp_path / "z-link.png")
    assert find_images(str(tmp_path)) == ["real.png"]


def test_trainings_center_crop_is_the_commands_preprocessing(tmp_path):
    """One center crop: the codebook fit, the sample grid and augment=center_crop see exactly the pixels that
    prepare_image gives vqrae-tokenize and the other commands (it was a bilinear resize beside their bicubic)."""
    from PIL import Image
    from torchvision.transforms import v2

    from stage1.data.images import load_image
    from stage1.data.input_pipeline import prepare_image
    from stage1.data.tar_shards import decode

    g = torch.Generator().manual_seed(4)
    photo = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 9, generator=g), size=(60, 90), mode="bicubic")
    save_image(photo[0].clamp(0, 1), tmp_path / "photo.png")
    Image.open(tmp_path / "photo.png").save(tmp_path / "photo.jpg", quality=90)
    deep = (torch.rand(50, 40, generator=g) * 65535).to(torch.int32).numpy()
    Image.fromarray(deep, mode="I").convert("I;16").save(tmp_path / "deep.png")  # 16-bit grey: floats, not uint8
    dataset = ImageDataset(str(tmp_path), build_transform(24, "center_crop", hflip=False))
    assert dataset.paths == ["deep.png", "photo.jpg", "photo.png"]
    for i, name in enumerate(dataset.paths):
        expected = prepare_image(str(tmp_path / name), 24)[0]
        assert torch.equal(dataset[(i, 0)]["image"], expected), name
        assert torch.equal(build_transform(24, "center_crop", hflip=False)(decode((tmp_path / name).read_bytes())),
                           expected), name  # tar samples too
    # ... where the old bilinear resize was measurably elsewhere.
    old = v2.Compose([v2.Resize(24, antialias=True), v2.CenterCrop(24)])
    assert (old(load_image(str(tmp_path / "photo.png"))[0]) - dataset[(2, 0)]["image"]).abs().max() > 1e-3


def test_a_folder_of_only_unreadable_images_is_one_clear_error(tmp_path):
    """Issue 20: it ended in torch's 'stack expects a non-empty TensorList'."""
    for name in ("a.png", "b.jpg"):
        (tmp_path / "data" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "data" / name).write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="none of data.path's images could be read"):
        run(str(tmp_path / "data"), tmp_path / "run")


def test_lpips_without_its_weights_fails_at_start_with_advice(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    # torchvision fetches backbone weights through torch.hub into $TORCH_HOME: make that download fail.
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match="lpips_random_backbone=true"):
        build_lpips("alex", random_backbone=False)


@pytest.mark.parametrize("encoder", ["tiny_siglip", "tiny_mae"])
def test_other_encoder_families_train(train_images, tmp_path, encoder):
    summary = run(train_images, tmp_path / encoder, f"encoder={encoder}", "train.steps=2", "train.ckpt_every=2",
                  "train.sample_every=null", "train.report_reconstructions=false")
    model = VQRAE.from_pretrained(summary["final"])
    assert model.config.encoder.cls == {"tiny_siglip": "SigLIP2", "tiny_mae": "MAE"}[encoder]


def test_bf16_autocast_training_on_cpu(train_images, tmp_path):
    run(train_images, tmp_path / "bf16", "precision=bf16", "train.steps=4", "train.sample_every=null",
        "train.report_reconstructions=false")
    logs = step_logs(tmp_path / "bf16")
    assert all(torch.isfinite(torch.tensor(logs[s]["loss"])) for s in logs)
    weights = load_file(tmp_path / "bf16" / "final" / "model.safetensors")
    codebook = weights["quantizer.embedding"]
    assert codebook.dtype == torch.float32 and torch.isfinite(codebook).all()


HUB_ENCODERS = [
    ("dinov2_b", "facebook/dinov2-with-registers-base"),
    ("dinov2_plain_b", "facebook/dinov2-base"),
    ("siglip2_b", "google/siglip2-base-patch16-256"),
    ("mae_b", "facebook/vit-mae-base"),
]


@pytest.mark.parametrize("encoder,hub_id", HUB_ENCODERS)
def test_hub_encoders_fail_clearly_offline(train_images, tmp_path, encoder, hub_id):
    from stage1 import EncoderNotAvailableError

    with pytest.raises(EncoderNotAvailableError, match=hub_id) as err:
        run(train_images, tmp_path / encoder, f"encoder={encoder}", "image_size=32")
    message = str(err.value)  # advice that runs with the installed huggingface_hub, and its cause said once
    assert f"run `hf download {hub_id} --local-dir DIR`" in message and message.count("cause:") == 1


def test_training_checkpoints_load_after_the_stats_file_moved(train_images, tmp_path):
    """Checkpoints are written by save_pretrained: the statistics travel in the weights, not by file name."""
    g = torch.Generator().manual_seed(5)
    mean, var = torch.randn(64, generator=g), torch.rand(64, generator=g) + 0.5  # tiny_dinov2: 64 channels
    stats = tmp_path / "stats.safetensors"
    save_file({"mean": mean, "var": var}, str(stats))
    run(train_images, tmp_path / "run", f"normalization_stat_path={stats}", "train.stop_at=4",
        "train.sample_every=null")
    os.rename(stats, tmp_path / "moved.safetensors")
    step_dir = tmp_path / "run" / "checkpoints" / "step-0000004"
    for weights_name in ("model.safetensors", "ema.safetensors"):
        model = VQRAE.from_pretrained(step_dir, weights_name=weights_name)
        assert model.config.normalization_stat_path is None
        assert torch.equal(model.latent_mean, mean)
        assert torch.allclose(model.latent_std, (var + 1e-6).sqrt())


def test_pixel_values_are_checked_on_the_first_batch_only(train_images, tmp_path, monkeypatch):
    """The range check costs a device -> host sync: once per run, not once per step."""
    calls = []
    original = VQRAE.check_images

    def spy(self, x, values=True):
        calls.append(values)
        return original(self, x, values)

    monkeypatch.setattr(VQRAE, "check_images", spy)
    run(train_images, tmp_path / "run", "train.steps=5", "train.sample_every=null",
        "train.report_reconstructions=false")
    assert len(calls) == 1 + 5 and calls.count(True) == 1  # the first batch, then shape checks in 5 forwards


def test_compiled_training_logs_the_eager_losses(train_images, tmp_path, monkeypatch):
    """Issue 13: train.compile=true compiles the encoder's and decoder's forward (traced by dynamo here, with the
    eager backend: inductor's code generation is too slow for the suite) and changes no result; the checkpoints keep
    their tensor names."""
    import stage1.model.vqrae

    monkeypatch.setattr(stage1.model.vqrae, "COMPILE_OPTIONS", {"backend": "eager"})
    run(train_images, tmp_path / "eager", "train.steps=3")
    run(train_images, tmp_path / "compiled", "train.steps=3", "train.compile=true")
    eager, compiled = step_logs(tmp_path / "eager"), step_logs(tmp_path / "compiled")
    for step in (1, 2, 3):
        for key in ("loss", "recon_loss", "vq_loss", "grad_norm"):
            assert compiled[step][key] == pytest.approx(eager[step][key], rel=1e-5, abs=1e-7), (step, key)
    a = load_file(tmp_path / "eager" / "final" / "model.safetensors")
    b = load_file(tmp_path / "compiled" / "final" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_wandb_logging_mirrors_the_metrics_and_resumes_its_run(train_images, tmp_path, monkeypatch):
    """Issue 14: logger=wandb logs every metrics.jsonl scalar to one W&B run per results_dir, resumed with the run
    (a stand-in wandb module records the calls: no account, no network); without the package the run fails at
    start, naming it."""
    import importlib.machinery
    import types

    runs = []

    class FakeRun:
        def __init__(self, **options):
            self.options, self.logged, self.finished = options, {}, False

        def log(self, values, step):
            self.logged.setdefault(step, {}).update(values)

        def finish(self):
            self.finished = True

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **options: runs.append(FakeRun(**options)) or runs[-1]
    fake.util = types.SimpleNamespace(generate_id=lambda: "run-1")
    fake.Image = lambda array: ("image", array.shape)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run(train_images, tmp_path / "r", "logger=wandb", "train.stop_at=4")
    run(train_images, tmp_path / "r", "logger=wandb")
    assert [r.options["id"] for r in runs] == ["run-1", "run-1"] and runs[1].options["resume"] == "allow"
    assert all(r.finished for r in runs) and runs[0].options["config"]["logger"] == "wandb"
    logged = {**runs[0].logged, **runs[1].logged}
    for step, values in step_logs(tmp_path / "r").items():
        assert logged[step]["loss/loss"] == pytest.approx(values["loss"]), step
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ValueError, match=r"logger must be tensorboard, or wandb with the wandb package installed"):
        run(train_images, tmp_path / "r2", "logger=wandb")


def test_training_from_tar_shards_is_training_from_their_folder_and_resumes_exactly(train_images, tmp_path):
    """Issue 14: tar shards made from a folder train exactly as the folder does (the same samples in the same
    order, so the same losses); interrupted and resumed on the tars, the losses are those of the whole run; a
    stream (pipe:) copied once to data.tar_cache trains the same way."""
    from stage1.data.tar_shards import write_shards

    write_shards(train_images, str(tmp_path / "shards"), shard_size=3)  # 8 images: 3 shards, the last of 2
    spec = str(tmp_path / "shards" / "{000000..000002}.tar")

    def train_on(data, results, *overrides):
        return train(load_run_config(["experiment=tiny_test", f"data.path='{data}'", f"results_dir={results}",
                                        "data.num_workers=2", *overrides]))

    train_on(train_images, tmp_path / "folder")
    train_on(spec, tmp_path / "tars", "train.stop_at=4")
    train_on(spec, tmp_path / "tars")  # resume=auto from step 4
    assert_same_losses(tmp_path / "folder", tmp_path / "tars")
    stream = f"pipe:cat {tmp_path / 'shards'}/{{000000..000002}}.tar"  # any URL webdataset opens
    train_on(stream, tmp_path / "stream", f"data.tar_cache={tmp_path / 'cache'}", "train.steps=3")
    assert sorted(os.listdir(tmp_path / "cache")) == ["000000-000000.tar", "000001-000001.tar", "000002-000002.tar"]
    folder, streamed = step_logs(tmp_path / "folder"), step_logs(tmp_path / "stream")
    for step in (1, 2, 3):  # copied once, then read by position: the folder's samples again
        assert streamed[step]["recon_loss"] == pytest.approx(folder[step]["recon_loss"], rel=1e-5), step


def test_a_streamed_training_resumes_exactly_where_it_stopped(train_images, tmp_path):
    """Issue 14: tar shards streamed with no local copy (pipe:, data.tar_cache null) are dealt to the rank x worker
    readers per epoch, each reader shuffling its shards; stopped at step 4 and resumed, the run logs the losses of
    the uninterrupted one (2 workers, 8 steps of 4 images: the readers cross shard and epoch boundaries). Too few
    shards for the readers is one clear error."""
    from stage1.data.tar_shards import write_shards

    write_shards(train_images, str(tmp_path / "shards"), shard_size=2)  # 8 images: 4 shards
    stream = f"pipe:cat {tmp_path / 'shards'}/{{000000..000003}}.tar"

    def train_on(results, *overrides):
        return train(load_run_config(["experiment=tiny_test", f"data.path='{stream}'", f"results_dir={results}",
                                        "data.num_workers=2", *overrides]))

    train_on(tmp_path / "whole")
    train_on(tmp_path / "split", "train.stop_at=4")
    train_on(tmp_path / "split")
    assert_same_losses(tmp_path / "whole", tmp_path / "split")
    with pytest.raises(ValueError, match=r"4 tar shard\(s\) for 5 readers"):
        train_on(tmp_path / "many", "data.num_workers=5")


def test_cpu_threads_count_the_idle_usable_cores_less_workers_and_ranks(monkeypatch):
    """Issue 31, point 1: torch's default (a thread per core) ran the quickstart 2.5x slower on a machine with other
    work. The choice: the usable cores less the share busy now less DataLoader workers, per local rank; and the busy
    share measured is a real one (a busy process beside it shows)."""
    from stage1.base import cpu_threads as ct

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(ct.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(ct, "busy_share", lambda: 0.4)  # 3.2 of 8 cores busy with other work
    threads, why = ct.cpu_threads(None, workers=1, local_processes=2)
    assert threads == (8 - 3 - 1) // 2 == 2 and "8 usable core(s), 3 busy with other work" in why
    monkeypatch.setattr(ct, "busy_share", lambda: 1.0)  # every core busy: still one thread
    assert ct.cpu_threads(None, workers=0, local_processes=1)[0] == 1
    monkeypatch.setattr(ct.os, "sched_getaffinity", lambda pid: {0})  # an affinity mask of one core
    monkeypatch.setattr(ct, "busy_share", lambda: 0.0)
    assert ct.cpu_threads(None, workers=0, local_processes=1)[0] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own choice is kept
    assert ct.cpu_threads(None, 0, 1) == (3, "OMP_NUM_THREADS")
    assert ct.cpu_threads(5, 0, 1) == (5, "train.cpu_threads")
    monkeypatch.undo()
    if os.path.exists("/proc/stat"):
        import subprocess

        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            import time

            time.sleep(0.5)
            share = ct.busy_share()
        finally:
            busy.kill()
        assert share >= 0.8 / (os.cpu_count() or 1), share  # at least most of one core of the machine's


def test_a_cpu_run_prints_its_thread_choice_and_gives_the_callers_back(train_images, tmp_path, capsys):
    before = torch.get_num_threads()
    run(train_images, tmp_path / "run", "train.cpu_threads=1", "train.steps=2", "train.sample_every=null")
    assert "threads: 1 intra-op per process (train.cpu_threads)" in capsys.readouterr().out
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match=r"train.cpu_threads must be from 1 to 1024 or null \(auto\)"):
        load_run_config(["experiment=tiny_test", "data.path=x", "results_dir=r", "train.cpu_threads=0"])


def test_a_resumed_run_takes_the_thread_count_its_checkpoint_was_made_with(train_images, tmp_path, monkeypatch,
                                                                            capsys):
    """The threads chosen from the machine's load may differ when the run resumes; a step's float sums depend on
    them, so the resumed run takes its checkpoint's count (a count the user set is the user's)."""
    import stage1.base.cpu_threads as ct

    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(ct, "usable_cores", lambda: 2)
    monkeypatch.setattr(ct, "busy_share", lambda: 0.5)  # one core busy: 1 thread
    run(train_images, tmp_path / "run", "train.stop_at=4", "train.sample_every=null")
    # A copy whose checkpoint was edited to a million threads (which crash torch): bounded as train.cpu_threads is.
    shutil.copytree(tmp_path / "run", tmp_path / "edited")
    edited = tmp_path / "edited" / "checkpoints" / "step-0000004" / "trainer_state.pt"
    torch.save({**torch.load(edited, weights_only=True), "cpu_threads": 10**6}, edited)
    monkeypatch.setattr(ct, "busy_share", lambda: 0.0)  # an idle machine now: 2 threads, then the checkpoint's 1
    capsys.readouterr()
    run(train_images, tmp_path / "run", "train.sample_every=null")
    out = capsys.readouterr().out
    assert "threads: 2 intra-op per process (2 usable core(s)" in out
    assert "threads: 1 intra-op per process, as the run being resumed had" in out
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-0000008" / "trainer_state.pt", weights_only=True)
    assert state["cpu_threads"] == 1
    run(train_images, tmp_path / "edited", "train.sample_every=null")
    out = capsys.readouterr().out
    assert "resumed from" in out and "as the run being resumed had" not in out
