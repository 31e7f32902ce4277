"""RAE's stage-1 recipe as config choices: the experiments compose into RAE's values, the discriminator warms up
before the decoder's adversarial term, and RAE's resize-then-random-crop augmentation."""

import pytest
import torch
from helpers import run_training, step_logs

from stage1.data.datasets import build_transform
from stage1.train.config import check_files, load_run_config


def test_rae_experiment_is_raes_stage1_config():
    cfg = load_run_config(["experiment=rae_dinov2_b_decxl", "data.path=x", "loss.dino_path=d.pth"])
    model, loss = cfg.model, cfg.loss
    assert model.encoder.path == "facebook/dinov2-with-registers-base" and model.encoder.input_size == 224
    assert model.quantizer.kind == "none" and model.noise_tau == 0.8
    d = model.decoder
    assert (d.hidden_size, d.num_hidden_layers, d.cls_token, d.pos_embed, d.layer_norm_eps, d.pixel_space) == \
        (1152, 28, True, "fixed", 1e-12, "encoder")
    assert loss.disc == "dino" and loss.diffaug_prob == 1.0 and loss.disc_round_fakes
    assert list(loss.disc_betas) == [0.9, 0.95] and loss.disc_weight_decay == 0
    assert loss.disc_update_start < loss.disc_start  # the discriminator warms up first
    t = cfg.train
    assert (t.steps, t.ema_decay, t.grad_clip, list(t.betas), t.weight_decay) == (40032, 0.9978, None, [0.9, 0.95], 0)
    assert (cfg.data.augment, cfg.data.resize, cfg.data.hflip) == ("resize_random_crop", 384, False)


def test_vqrae_experiment_starts_from_an_rae_decoder(tmp_path):
    cfg = load_run_config(["experiment=vqrae_dinov2_b_decxl", "data.path=x"])
    assert cfg.model.quantizer.kind == "single" and cfg.codebook_fit.images > 0
    assert cfg.model.decoder.cls_token and cfg.model.pretrained_decoder_path.endswith("ViTXL_n08/model.pt")
    # RAE's files are checked before the data folder is scanned or a model built: each missing one is named.
    files = {"pretrained_decoder_path": "model.pt", "normalization_stat_path": "stat.pt", "loss.dino_path": "dino.pth"}
    given = []
    for key, name in files.items():
        with pytest.raises(ValueError, match=f"{key} must be an existing file or null"):
            check_files(load_run_config(["experiment=vqrae_dinov2_b_decxl", "data.path=x", *given]))
        (tmp_path / name).write_bytes(b"")
        given.append(f"{key}={tmp_path / name}")
    check_files(load_run_config(["experiment=vqrae_dinov2_b_decxl", "data.path=x", *given]))
    with pytest.raises(ValueError, match="loss.dino_path must be the DINO ViT checkpoint with loss.disc=dino"):
        load_run_config(["experiment=vqrae_dinov2_b_decxl", "data.path=x", "loss.dino_path=null"])


def test_resize_random_crop_is_a_crop_of_the_resized_image():
    image = torch.rand(3, 40, 60)
    torch.manual_seed(3)
    crop = build_transform(16, "resize_random_crop", hflip=False, resize=24)(image)
    resized = torch.nn.functional.interpolate(image[None], size=(24, 36), mode="bicubic", antialias=True,
                                              align_corners=False)[0].clamp(0, 1)  # RAE resizes bicubic
    matches = [(i, j) for i in range(24 - 15) for j in range(36 - 15)
               if torch.allclose(resized[:, i:i + 16, j:j + 16], crop, atol=1e-5)]
    assert crop.shape == (3, 16, 16) and len(matches) == 1
    with pytest.raises(ValueError, match=r"data.resize must be >= image_size \(16\)"):
        load_run_config(["data.path=x", "image_size=16", "data.augment=resize_random_crop", "data.resize=8"])


def test_discriminator_warms_up_before_the_decoders_adversarial_term(train_images, tmp_path):
    run_training(train_images, tmp_path / "run", "loss.disc_update_start=1", "loss.disc_start=3", "train.steps=4",
                 "train.report_reconstructions=false")
    logs = step_logs(tmp_path / "run")
    assert [s for s in sorted(logs) if "d_loss" in logs[s]] == [2, 3, 4]
    assert [s for s in sorted(logs) if "g_loss" in logs[s]] == [4]


def test_discriminator_lr_follows_the_decoders_schedule_with_cosine(train_images, tmp_path):
    from stage1.train.checkpoint import read_state
    from stage1.train.trainer import warmup_cosine

    run_training(train_images, tmp_path / "run", "loss.disc_schedule=cosine", "loss.disc_lr=1e-3",
                 "loss.disc_update_start=0", "train.steps=8", "train.report_reconstructions=false")
    factor = warmup_cosine(2, 8, 1e-4 / 1e-3)  # tiny_test: warmup_steps 2, steps 8, lr 1e-3, min_lr 1e-4
    for step in (4, 8):
        state = read_state(str(tmp_path / "run" / "checkpoints" / f"step-{step:07d}"))
        assert state["disc_optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * factor(step), rel=1e-9)
        assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * factor(step), rel=1e-9)
