"""RAE's DINO discriminator and DiffAugment, on a tiny random ViT in DINO's checkpoint layout (no download)."""

import os

import pytest
import torch
from helpers import smooth_images
from timm.models.vision_transformer import VisionTransformer

from stage1.model.encoders import IMAGENET_MEAN, IMAGENET_STD
from stage1.train.diffaugment import DiffAugment
from stage1.train.dino_discriminator import DinoDiscriminator


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory):
    """A DINO-layout checkpoint: 64 wide (one 64-d head), 4 blocks, patch 8 at 32 px."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=1, num_classes=0,
                            global_pool="")
    path = str(tmp_path_factory.mktemp("dino") / "dino_vit_tiny.pth")
    torch.save(vit.state_dict(), path)
    return path


def test_features_are_the_frozen_vits_tokens_and_only_the_heads_train(dino_file):
    torch.manual_seed(1)
    disc = DinoDiscriminator(dino_file, kernel_size=3)
    vit = disc.vit[0]
    assert disc.key_depths == (2,) and len(disc.heads) == 2  # depths 5, 8, 11 do not exist in 4 blocks
    assert not any(k.startswith("vit") for k in disc.state_dict())  # checkpoints hold the heads only
    assert {id(p) for p in disc.parameters()}.isdisjoint(id(p) for p in vit.parameters())
    x = smooth_images(2, size=32)
    captured = {}
    hooks = [vit.blocks[i].register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out)) for i in (2, 3)]
    with torch.no_grad():
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        vit.forward_features((x - mean) / std)  # timm's own path through the same weights
        last, depth2 = disc.features(x)
    for hook in hooks:
        hook.remove()
    assert torch.allclose(last, captured[3][:, 1:].transpose(1, 2), atol=1e-6)
    assert torch.allclose(depth2, captured[2][:, 1:].transpose(1, 2), atol=1e-6)
    # A step on the heads: the image gets a gradient, the ViT does not move.
    before = [p.clone() for p in vit.parameters()]
    images = smooth_images(2, size=40).requires_grad_(True)  # resized to the ViT's 32 px inside
    logits = disc(images)
    assert logits.shape == (2, 2 * 16)  # two feature levels x 4 x 4 tokens
    optimizer = torch.optim.SGD(disc.parameters(), lr=0.1)
    logits.mean().backward()
    optimizer.step()
    assert images.grad.abs().sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(before, vit.parameters(), strict=True))


def test_discriminator_and_diffaugment_are_deterministic_under_a_seed(dino_file):
    x = smooth_images(4, size=32, seed=3)
    outputs = []
    for _ in range(2):
        torch.manual_seed(5)
        disc = DinoDiscriminator(dino_file)
        augment = DiffAugment(prob=1.0, cutout=0.25)
        outputs.append((augment(x, torch.Generator().manual_seed(7)), disc(x)))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    other = DiffAugment(prob=1.0, cutout=0.25)(x, torch.Generator().manual_seed(8))
    assert not torch.equal(other, outputs[0][0])
    assert torch.equal(DiffAugment(prob=0.0)(x), x)


def test_diffaugment_slides_zeros_in_by_the_drawn_shift_and_cuts_a_window():
    """On one-channel images of ones, colour is an increasing affine map per image (saturation is a no-op), so the
    pixels that slid in (mid-grey) are exactly those below the image's maximum: |dh| rows and |dw| columns."""
    b, side = 6, 16
    out = DiffAugment(prob=1.0)(torch.ones(b, 1, side, side), torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)  # the same draws, in DiffAugment's order
    torch.rand(3, generator=g)
    draws = torch.rand(7, b, 1, 1, generator=g)
    shift_h = (draws[0] * 5).floor().long().flatten() - 2  # up to side / 8 = 2 either way
    shift_w = (draws[1] * 5).floor().long().flatten() - 2
    slid_in = shift_h.abs() * side + shift_w.abs() * side - shift_h.abs() * shift_w.abs()
    below_max = (out < out.amax(dim=(1, 2, 3), keepdim=True) - 1e-6).flatten(1).sum(1)
    assert torch.equal(below_max, slid_in) and slid_in.any()
    cut = DiffAugment(prob=1.0, cutout=0.5)(torch.ones(b, 1, 8, 8), torch.Generator().manual_seed(3))
    cut_out = (cut == 0.5).flatten(1).sum(1)  # cutout comes last: mid-grey (0 in [-1, 1]) exactly
    assert ((cut_out > 0) & (cut_out <= 16)).all()  # one window of at most 4 x 4
    with pytest.raises(ValueError, match="prob in \\[0, 1\\]"):
        DiffAugment(prob=1.5)


def test_missing_dino_checkpoint_names_the_file_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match="dino_vit_small_patch8_224.pth.*loss.dino_path"):
        DinoDiscriminator(str(tmp_path / "nope.pth"))
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a DINO ViT state dict"):
        DinoDiscriminator(str(tmp_path / "other.pth"))


def test_training_with_raes_dino_discriminator(train_images, tmp_path, dino_file):
    from helpers import run_training, step_logs
    from safetensors.torch import load_file

    run_training(train_images, tmp_path / "run", "loss=rae_dino", f"loss.dino_path={dino_file}",
                 "loss.lpips_random_backbone=true", "loss.lpips_net=alex", "loss.disc_start=2", "train.steps=4",
                 "train.report_reconstructions=false")
    logs = step_logs(tmp_path / "run")
    assert all("d_loss" in logs[s] and torch.isfinite(torch.tensor(logs[s]["d_loss"])) for s in (3, 4))
    assert "d_loss" not in logs[1]
    heads = load_file(os.path.join(tmp_path / "run" / "final" / "..", "checkpoints", "step-0000004",
                                   "discriminator.safetensors"))
    assert heads and all(k.startswith("heads.") for k in heads)
