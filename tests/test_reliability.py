"""Failing clearly, losing nothing, running no code from files: the guarantees in the README."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from helpers import REPO_ROOT, smooth_images, step_logs, tiny_vqrae, torchrun
from helpers import run_training as run
from safetensors.torch import load_file

from stage1 import VQRAE
from stage1.data.datasets import ImageDataset, build_transform
from stage1.train.checkpoint import latest_checkpoint, list_checkpoints
from stage1.train.losses import LossConfig


# ---- NaN / Inf ------------------------------------------------------------------------------------------------
@pytest.fixture
def nan_at(monkeypatch):
    """Make the training loss NaN (through the quantizer's vq_loss) on the given training forward calls (1-based)."""
    calls = {"n": 0}
    original = VQRAE.forward

    def install(bad_calls):
        def forward(self, x, return_loss=False, return_quantizer_losses=False):
            out = original(self, x, return_loss, return_quantizer_losses)
            if return_quantizer_losses:  # training's forward
                calls["n"] += 1
                if calls["n"] in bad_calls:
                    out[1]["vq_loss"] = out[1]["vq_loss"] * float("nan")
            return out

        monkeypatch.setattr(VQRAE, "forward", forward)

    return install


def test_nan_steps_are_skipped_and_counted(train_images, tmp_path, nan_at):
    nan_at({3, 4})
    summary = run(train_images, tmp_path / "run", "train.sample_every=null")
    assert summary["step"] == 8
    logs = step_logs(tmp_path / "run")
    assert [s for s in logs if logs[s]["nonfinite"]] == [3, 4]
    assert logs[8]["nonfinite_steps"] == 2
    weights = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_too_many_nan_steps_stop_the_run_and_keep_the_last_checkpoint(train_images, tmp_path, nan_at):
    nan_at(set(range(5, 100)))
    with pytest.raises(FloatingPointError, match="3 steps in a row had NaN/Inf .*step-0000004"):
        run(train_images, tmp_path / "run", "train.max_nonfinite_steps=3", "train.sample_every=null")
    assert [os.path.basename(p) for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-0000004"]
    good = VQRAE.from_pretrained(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert torch.isfinite(good.quantizer.codebook).all()


# ---- loading never unpickles ----------------------------------------------------------------------------------
class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_in_a_checkpoint_is_refused_without_running(train_images, tmp_path):
    run(train_images, tmp_path / "run", "train.stop_at=4", "train.sample_every=null")
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    marker = tmp_path / "pwned"
    torch.save({"step": Payload(str(marker))}, os.path.join(checkpoint, "trainer_state.pt"))
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        run(train_images, tmp_path / "run", "train.sample_every=null")
    assert not marker.exists()


def test_model_loading_reads_only_safetensors_and_json(dinov2_dir, tmp_path):
    model = tiny_vqrae(dinov2_dir)
    model.save_pretrained(tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    # A pickle disguised under the weights' name is not a safetensors file: refused, nothing runs.
    torch.save({"x": Payload(str(marker))}, tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(Exception):  # noqa: B017  (safetensors' own header error)
        VQRAE.from_pretrained(tmp_path / "ckpt")
    assert not marker.exists()


# ---- crash-safe writes -----------------------------------------------------------------------------------------
WRITER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from helpers import tiny_vqrae
    model = tiny_vqrae({encoder!r})
    big = {{f"decoder.extra{{i}}": torch.randn(512, 1024) for i in range(24)}}  # ~50 MB: slow enough to kill
    model.trainable_state_dict = lambda: {{**dict(model.state_dict()), **big}}
    print("writing", flush=True)
    while True:
        model.save_pretrained({target!r})
    """
)


@pytest.mark.slow  # spawns processes (torchrun / mp.spawn / a killed writer)
def test_killing_a_writer_mid_write_keeps_the_previous_checkpoint(dinov2_dir, tmp_path):
    target = tmp_path / "ckpt"
    good = tiny_vqrae(dinov2_dir)
    good.save_pretrained(target)
    expected = good.eval()(smooth_images(1))
    script = WRITER.format(tests=os.path.dirname(__file__), encoder=dinov2_dir, target=str(target))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for delay in (0.3, 1.0, 2.0):
        writer = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "writing"
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        names = os.listdir(target)
        assert {"config.json", "model.safetensors"} <= set(names)
        leftovers = [n for n in names if n not in ("config.json", "model.safetensors")]
        # Only hidden temporaries (ours: .NAME.*.tmp; safetensors' own: .tmp*) can be left by a kill.
        assert all(n.startswith(".") and ".tmp" in n for n in leftovers), leftovers
        # Whichever complete file is there loads (the killed writer's full version has extra tensors).
        weights = load_file(target / "model.safetensors")
        assert "quantizer.embedding" in weights
    for leftover in [n for n in os.listdir(target) if n.startswith(".")]:
        os.remove(target / leftover)
    good.save_pretrained(target)
    assert torch.equal(VQRAE.from_pretrained(target).eval()(smooth_images(1)), expected)


def test_hidden_temporaries_are_never_taken_for_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".step-0000009.abc.tmp").mkdir(parents=True)
    (root / ".step-0000009.abc.tmp" / "trainer_state.pt").write_bytes(b"partial")
    (root / "step-0000008").mkdir()  # no trainer_state.pt: incomplete
    assert latest_checkpoint(str(root)) is None


def test_metrics_survive_a_torn_last_line(train_images, tmp_path):
    run(train_images, tmp_path / "run", "train.stop_at=4", "train.sample_every=null")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.3')  # a crash mid-write
    run(train_images, tmp_path / "run", "train.sample_every=null")
    assert sorted(step_logs(tmp_path / "run")) == list(range(1, 9))


# ---- bad files ------------------------------------------------------------------------------------------------
def test_unreadable_files_are_skipped(tmp_path, monkeypatch):
    from torchvision.utils import save_image

    for name in ("a.png", "b.png", "c.png"):
        save_image(torch.rand(3, 8, 8), tmp_path / name)
    dataset = ImageDataset(str(tmp_path), build_transform(8, "center_crop"))
    import stage1.data.images

    real_decode = stage1.data.images._decode

    def no_permission(path):  # root reads any file, so the OS refusal is simulated where Pillow would meet it
        if path.endswith("b.png"):
            raise PermissionError(13, "Permission denied", "b.png")
        return real_decode(path)

    monkeypatch.setattr(stage1.data.images, "_decode", no_permission)
    with pytest.warns(UserWarning, match="skipping unreadable image b.png: PermissionError"):
        assert dataset[(1, 0)]["skipped"] == 1


def test_weights_from_another_config_are_refused(dinov2_dir, tmp_path):
    tiny_vqrae(dinov2_dir, num_embeddings=32).save_pretrained(tmp_path / "a")
    tiny_vqrae(dinov2_dir, num_embeddings=64).save_pretrained(tmp_path / "b")
    os.replace(tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors")
    with pytest.raises(ValueError, match=r"quantizer.embedding: file \(32, 32\) vs model \(64, 32\)"):
        VQRAE.from_pretrained(tmp_path / "b")
    os.remove(tmp_path / "b" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="is not a VQRAE checkpoint"):
        VQRAE.from_pretrained(tmp_path / "b")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    config["num_embedings"] = 3
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: unknown config keys \['num_embedings'\]"):
        VQRAE.from_pretrained(tmp_path / "a")


def test_bad_constructor_values(dinov2_dir):
    for kwargs, message in [
        (dict(num_embeddings=0), "quantizer.num_embeddings must be from 1 to 1,048,576, got 0"),
        (dict(num_embeddings=2**21), "quantizer.num_embeddings must be from 1 to 1,048,576, got 2097152"),
        (dict(num_embeddings="8"), r"quantizer.num_embeddings must be an integer, got '8' \(str\)"),
        (dict(vq_decay=1.0), r"decay must be in \[0, 1\)"),
        (dict(commitment_cost=-1.0), "commitment_cost must be >= 0"),
        (dict(decoder_patch_size=0), "decoder.patch_size must be > 0, got 0"),
        (dict(noise_tau=-0.1), "noise_tau must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            tiny_vqrae(dinov2_dir, **kwargs)
    # The reconstruction loss is a training loss term now, configured by the loss group alone.
    with pytest.raises(ValueError, match=r"loss.recon_loss must be one of \['l1', 'l2'\], got 'l3'"):
        LossConfig(recon_loss="l3")


# ---- distributed ------------------------------------------------------------------------------------------------
FAILING_RANK = textwrap.dedent(
    """
    import sys
    from stage1.train.config import load_run_config
    from stage1.train.trainer import Trainer, train
    original = Trainer._train_step
    def failing(self, batches):
        if self.info.rank == 1 and self.step == 2:
            raise RuntimeError("injected failure on rank 1")
        return original(self, batches)
    Trainer._train_step = failing
    train(load_run_config(sys.argv[1:]))
    """
)


@pytest.mark.slow  # spawns processes (torchrun / mp.spawn / a killed writer)
def test_a_failing_rank_brings_the_job_down_with_its_error(train_images, tmp_path):
    script = tmp_path / "failing_train.py"
    script.write_text(FAILING_RANK)
    start = time.time()
    result = torchrun(str(script), "experiment=tiny_test", f"data.path={train_images}",
                      f"results_dir={tmp_path / 'run'}", "dist_timeout_minutes=1", timeout=300, cwd=REPO_ROOT)
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stdout + result.stderr
    assert time.time() - start < 120  # no hang waiting on the dead rank


def write_bomb_png(path, side=20000):
    """A valid 8 x 8 PNG whose header claims side x side pixels (Pillow refuses > 2 x its 89M-pixel limit)."""
    import io
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 40, 200)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", side, side)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    path.write_bytes(bytes(data))


def test_a_decompression_bomb_is_one_error_or_one_skipped_file(train_images, dinov2_dir, tmp_path, capsys):
    """Issue 12, cases 3 and 4: a PNG claiming 20000 x 20000 is an error line for a single-image command, a skipped
    and listed file for folder commands, and skipped by training even among the images of its sample grid."""
    import shutil

    from stage1.cli import evaluate, reconstruct, tokenize

    folder = tmp_path / "images"
    shutil.copytree(train_images, folder)
    write_bomb_png(folder / "class0" / "000_bomb.png")  # sorted first: one of the fixed sample images
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    tiny_vqrae(dinov2_dir).save_pretrained(model_dir)
    bomb = str(folder / "class0" / "000_bomb.png")
    assert reconstruct.main(["--model", str(model_dir), "--image", bomb, "--out", str(tmp_path / "r.png")]) == 2
    err = capsys.readouterr().err
    assert "DecompressionBombError" in err and "Traceback" not in err and not (tmp_path / "r.png").exists()
    assert tokenize.main(["--model", str(model_dir), "--data", str(folder), "--out", str(tmp_path / "tok")]) == 0
    manifest = json.loads((tmp_path / "tok" / "manifest.json").read_text())
    assert [s["path"] for s in manifest["skipped"]] == ["class0/000_bomb.png"] and len(manifest["images"]) == 8
    assert evaluate.main(["--model", str(model_dir), "--data", str(folder), "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["num_images"] == 8
    with pytest.warns(UserWarning, match="skipping unreadable image class0/000_bomb.png: DecompressionBombError"):
        summary = run(str(folder), tmp_path / "run", "train.steps=2", "train.num_samples=2")
    assert summary["step"] == 2


def test_a_damaged_checkpoint_is_passed_over_and_killed_writers_cleaned_up(train_images, tmp_path, capsys):
    """Issue 12, case 7: under resume=auto a checkpoint missing a file gives way to the one before it; a named one
    fails with the file it lacks; hidden step folders of killed writers are removed."""
    run(train_images, tmp_path / "run", "train.stop_at=8", "train.sample_every=null")
    root = tmp_path / "run" / "checkpoints"
    os.remove(root / "step-0000008" / "ema.safetensors")
    with pytest.raises(FileNotFoundError, match=r"lacks \['ema.safetensors'\]"):
        run(train_images, tmp_path / "run", f"train.resume={root / 'step-0000008'}", "train.sample_every=null")
    (root / ".step-0000012.x1y2.tmp").mkdir()
    (root / ".step-0000012.x1y2.tmp" / "model.safetensors").write_bytes(b"partial")
    capsys.readouterr()
    run(train_images, tmp_path / "run", "train.steps=12", "train.sample_every=null")
    printed = capsys.readouterr().out
    assert "passing over" in printed and "step-0000008" in printed and "removed .step-0000012.x1y2.tmp" in printed
    logs = step_logs(tmp_path / "run")
    assert min(s for s in logs if s > 4) == 5  # resumed after step 4, not 8
    assert not any(name.startswith(".step-") for name in os.listdir(root))


def test_a_tar_index_keeps_a_bounded_number_of_shards_open(tmp_path, monkeypatch):
    """A shuffled epoch reads every shard in turn: TarIndex closes the least recently read shard beyond
    MAX_OPEN_SHARDS (a descriptor per shard ran out of open files on ImageNet's ~1300 shards), and reads the same
    bytes after reopening it."""
    import io
    import random
    import tarfile

    from stage1.data import tar_shards

    written = {}
    for shard in range(5):
        with tarfile.open(tmp_path / f"shard-{shard}.tar", "w") as tar:
            for sample in range(3):
                data = os.urandom(100 + sample)
                member = tarfile.TarInfo(f"s{shard}_{sample}.jpg")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
                written[f"s{shard}_{sample}"] = data
    monkeypatch.setattr(tar_shards, "MAX_OPEN_SHARDS", 2)
    before = len(os.listdir("/proc/self/fd"))
    index = tar_shards.TarIndex(sorted(str(p) for p in tmp_path.glob("*.tar")))
    names = list(index) * 2
    random.Random(0).shuffle(names)
    for name in names:
        assert index[name] == written[os.path.splitext(os.path.basename(name))[0]]
        assert len(index._files) <= 2 and len(os.listdir("/proc/self/fd")) <= before + 2
    index.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_full_disk_while_checkpointing_is_one_line_and_the_previous_checkpoint_stays(train_images, tmp_path,
                                                                                      monkeypatch, capsys):
    """Issue 32, point 6: a full disk while the checkpoint of step 4 is written (as safetensors reports it: its own
    error type, not an OSError) ends the run with one error line naming the checkpoint kept; the same command then
    resumes from it."""
    import shutil

    from safetensors import SafetensorError

    import stage1.train.checkpoint as checkpoint
    from stage1.cli.train import main

    argv = ["experiment=tiny_test", f"data.path={train_images}", f"results_dir={tmp_path / 'run'}",
            "train.ckpt_every=2", "train.sample_every=null", "train.keep_last=null"]
    real_save, real_usage, disk = checkpoint.save_training, shutil.disk_usage, {"full": False}

    def save_until_full(directory, *args, **kwargs):
        if os.path.basename(os.path.dirname(directory)) == "checkpoints" and ".step-0000004." in directory:
            disk["full"] = True
            raise SafetensorError("Error while serializing: IoError(No space left on device)")
        return real_save(directory, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr("stage1.train.trainer.save_training", save_until_full)
        patch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=0) if disk["full"]
                      else real_usage(p))
        assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "could not write the checkpoint of step 4" in errors[0], errors
    assert "SafetensorError" in errors[0] and "step-0000002, is whole" in errors[0]
    assert [os.path.basename(c) for c in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-0000002"]
    assert main(argv) == 0
    assert "resumed from" in capsys.readouterr().out


def test_a_trainer_state_without_its_optimizer_is_one_error_naming_the_missing_part(train_images, tmp_path):
    run(train_images, tmp_path / "run", "train.stop_at=4", "train.sample_every=null")
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    state = torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=True)
    del state["optimizer"]
    torch.save(state, os.path.join(checkpoint, "trainer_state.pt"))
    with pytest.raises(ValueError, match=r"trainer_state.pt lacks \['optimizer'\] \(a trainer state holds "
                                         r"\['optimizer', 'scheduler'"):
        run(train_images, tmp_path / "run", "train.sample_every=null")


def test_a_second_training_into_a_running_ones_folder_stops_in_one_line(train_images, tmp_path, capsys):
    """Issue 32, point 8: a second identical training into a running one's results_dir resumed its checkpoint and
    both exited 0 with interleaved metrics; the folder's lock refuses the second writer, and is free once the first
    ends (an OS lock: a killed run holds it no longer)."""
    import fcntl

    from stage1.cli.train import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    argv = ["experiment=tiny_test", f"data.path={train_images}", f"results_dir={run_dir}", "train.steps=2",
            "train.sample_every=null"]
    with open(run_dir / ".lock", "a+") as held:  # another process's training holds it (flock: per open file)
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 12345\n")
        held.flush()
        assert main(argv) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and f"{run_dir} is in use by another training (pid 12345)" in errors[0], errors
        assert sorted(os.listdir(run_dir)) == [".lock"]  # nothing of the second run written
    assert main(argv) == 0  # the lock is free again
