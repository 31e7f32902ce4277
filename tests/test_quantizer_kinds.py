"""Residual and grouped quantizers: exact values, exact index round trips, every guarantee per codebook."""

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import smooth_images, tiny_vqrae

from stage1 import VQRAE, GroupedQuantizer, QuantizerConfig, ResidualQuantizer, build_quantizer
from stage1.cli import decode, evaluate, tokenize

# Small batches train codebooks that have not started: their start gathers tokens, and says so (test_quantizer.py).
pytestmark = pytest.mark.filterwarnings("ignore:VectorQuantizer. the codebook has not started")

KINDS = {
    "residual": dict(kind="residual", depth=3),
    "grouped": dict(kind="grouped", groups=4),
    "grouped_cosine": dict(kind="grouped", groups=2, cosine=True),
}


def trained(kind: str, k=16, d=8, seed=0):
    """A quantizer of `kind` whose levels have taken a few training steps (codes on the data)."""
    torch.manual_seed(seed)
    q = build_quantizer(QuantizerConfig(num_embeddings=k, **KINDS[kind]), d).train()
    for _ in range(3):
        q(torch.randn(2, 40, d))
    return q.eval()


def test_residual_value_is_the_sum_of_each_levels_code_of_the_residual():
    q = trained("residual")
    z = torch.randn(2, 10, 8)
    out = q(z)
    z_q, idx = out.z_q, out.indices
    assert isinstance(q, ResidualQuantizer) and idx.shape == (2, 10, 3)
    residual, expected = z.clone(), torch.zeros_like(z)
    for level_index, level in enumerate(q.levels):
        codes = torch.cdist(residual.reshape(-1, 8), level.embedding).argmin(1).reshape(2, 10)
        assert torch.equal(idx[..., level_index], codes)
        expected += level.embedding[codes]
        residual -= level.embedding[codes]
    assert torch.equal(z_q, expected)
    assert out.commitment.item() == pytest.approx((z - expected).pow(2).mean().item(), rel=1e-5)


def test_grouped_value_is_each_groups_code_side_by_side():
    q = trained("grouped")
    z = torch.randn(2, 10, 8)
    out = q(z)
    z_q, idx = out.z_q, out.indices
    assert isinstance(q, GroupedQuantizer) and idx.shape == (2, 10, 4)
    for g, level in enumerate(q.levels):
        part = z[..., 2 * g : 2 * g + 2].reshape(-1, 2)
        assert torch.equal(idx[..., g].flatten(), torch.cdist(part, level.embedding).argmin(1))
        assert torch.equal(z_q[..., 2 * g : 2 * g + 2], level.embedding[idx[..., g]])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_index_round_trip_is_exact_and_gradients_pass_straight_through(kind):
    q = trained(kind)
    z = torch.randn(3, 7, 8, requires_grad=True)
    out = q(z)
    z_q, idx = out.z_q, out.indices
    assert torch.equal(q.encode(z), idx)
    assert torch.equal(q.lookup(idx), z_q)
    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward()
    if not q.levels[0].cosine:
        assert torch.equal(z.grad, upstream)
    else:  # cosine: the gradient of the normalisation, per group
        assert z.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bf16_autocast_gives_the_fp32_indices(kind):
    q = trained(kind)
    z = torch.randn(2, 30, 8)
    reference = q.encode(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
        idx = out.indices
        assert torch.equal(q.encode(z), reference)
    assert torch.equal(idx, reference) and out.commitment.dtype == torch.float32


def test_depth_lowers_the_error_of_a_fitted_residual_quantizer():
    torch.manual_seed(0)
    samples = torch.randn(4000, 8)
    errors = []
    for depth in (1, 2, 4):
        q = build_quantizer(QuantizerConfig(kind="residual" if depth > 1 else "single", depth=depth,
                                            num_embeddings=32), 8)
        q.fit(samples, iters=15, tokens_per_update=256)
        errors.append((samples - q.lookup(q.encode(samples))).pow(2).sum(1).mean().item())
    assert errors[1] < 0.8 * errors[0] and errors[2] < 0.5 * errors[0], errors


@pytest.mark.parametrize("values,message", [
    (dict(kind="single", depth=2), r"quantizer.depth must be 1 with kind 'single' \(an option of residual\), got 2"),
    (dict(kind="residual", groups=2), r"quantizer.groups must be 1 with kind 'residual' \(an option of grouped\)"),
    (dict(kind="residual", depth=2, cosine=True), r"quantizer.cosine must be false with kind 'residual'"),
    (dict(kind="residual", depth=0), r"quantizer.depth must be > 0, got 0"),
    (dict(kind="single", scales=[1, 2]), r"quantizer.scales must be \[1, 2, 3, 4, 5, 6, 8, 10, 13, 16\] with kind"),
])
def test_bad_kind_options(values, message):
    with pytest.raises(ValueError, match=message):
        QuantizerConfig(**values)
    with pytest.raises(ValueError, match=r"quantizer.groups \(3\) must divide the latent channels \(8\)"):
        build_quantizer(QuantizerConfig(kind="grouped", groups=3), 8)


# ---- through the model and the commands ------------------------------------------------------------------------
def kind_model(encoder_dir, kind: str) -> VQRAE:
    torch.manual_seed(0)
    base = tiny_vqrae(encoder_dir, num_embeddings=16)
    config = base.config.from_dict({**base.config.to_dict(),
                                    "quantizer": {**base.config.quantizer.to_dict(), **KINDS[kind]}})
    model = VQRAE(config).train()
    model(smooth_images(4, seed=5), return_loss=True)  # first-batch initialisation of every codebook
    return model.eval()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_model_indices_carry_a_codebook_axis_and_round_trip(dinov2_dir, kind, tmp_path):
    model = kind_model(dinov2_dir, kind)
    x = smooth_images(3)
    indices = model.encode_to_indices(x)
    codes = model.layout.position_shape[0]
    assert indices.shape == (3, 4, 4, codes)
    assert torch.equal(model.decode_from_indices(indices), model(x))
    assert torch.equal(model.decode_from_indices(indices.flatten(1, 2)), model(x))  # (B, N, L)
    with pytest.raises(ValueError, match=rf"expected indices of shape \(B, h, w, {codes}\)"):
        model.decode_from_indices(indices[..., :1])  # one code per token where the model makes more
    model.save_pretrained(tmp_path / "m")
    loaded = VQRAE.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(loaded.encode_to_indices(x), indices) and torch.equal(loaded(x), model(x))


def test_shards_and_metrics_carry_the_codebook_axis(dinov2_dir, train_images, tmp_path):
    model = kind_model(dinov2_dir, "residual")
    model.save_pretrained(tmp_path / "m")
    args = ["--model", str(tmp_path / "m"), "--image-size", "32"]
    assert tokenize.main([*args, "--data", train_images, "--out", str(tmp_path / "t")]) == 0
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["grid_shape"] == [4, 4] and manifest["index_shape"] == [4, 4, 3]
    shard = np.load(tmp_path / "t" / "shard-00000.npy")
    assert shard.shape == (8, 4, 4, 3)
    for fmt in ("jsonl", "memmap"):  # every export keeps the codes-per-token axis last
        assert tokenize.main([*args, "--data", train_images, "--out", str(tmp_path / "t"), "--format", fmt]) == 0
    # LlamaGen's GPT has one code per position: refused, with the layouts that keep L.
    assert tokenize.main([*args, "--data", train_images, "--out", str(tmp_path / "t"), "--format", "llamagen"]) == 2
    line = json.loads((tmp_path / "t" / "tokens.jsonl").read_text().splitlines()[0])
    assert line["tokens"] == shard[0].reshape(16, 3).tolist()
    assert np.array_equal(np.load(tmp_path / "t" / "codes.npy", mmap_mode="r"), shard)
    assert decode.main(["--model", str(tmp_path / "m"), "--tokens", str(tmp_path / "t"),
                        "--out", str(tmp_path / "d")]) == 0
    assert len([f for _, _, fs in os.walk(tmp_path / "d") for f in fs]) == 8
    single = tiny_vqrae(dinov2_dir, num_embeddings=16)
    single.save_pretrained(tmp_path / "single")
    assert decode.main(["--model", str(tmp_path / "single"), "--tokens", str(tmp_path / "t"),
                        "--out", str(tmp_path / "d2")]) == 2
    assert evaluate.main([*args, "--data", train_images, "--out", str(tmp_path / "e")]) == 0
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert results["codebooks"] == 3 and results["bits_per_image"] == 16 * 3 * 4  # 16 tokens x 3 codes x 4 bits
    used = len({(level, int(c)) for level in range(3) for c in np.unique(shard[..., level])})
    assert results["codes_used"] == used


# ---- two processes (gloo): every kind keeps identical codebooks -------------------------------------------------
def _train_rank(rank, world, init_file, out_dir, kind, data):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(100 + rank)  # different draws per rank: gathered pools must make them agree
    q = build_quantizer(QuantizerConfig(num_embeddings=8, restart_window=1.0,
                                        **KINDS[kind]), 4 if kind != "grouped" else 8).train()
    for step_data in data:
        q(step_data.chunk(world)[rank].unsqueeze(0))
    torch.save(q.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow  # spawns processes (torchrun / mp.spawn / a killed writer)
@pytest.mark.parametrize("kind", ["residual", "grouped"])
def test_two_ranks_keep_every_codebook_identical(tmp_path, kind):
    torch.manual_seed(0)
    d = 4 if kind != "grouped" else 8
    data = [torch.randn(64, d) + 2 * i for i in range(4)]  # drifting data: restarts fire
    mp.spawn(_train_rank, args=(2, str(tmp_path / "init"), str(tmp_path), kind, data), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert len([k for k in rank0 if k.endswith("embedding")]) > 1
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key


@pytest.mark.parametrize("overrides", [["quantizer.kind=residual", "quantizer.depth=2"],
                                       ["quantizer.kind=grouped", "quantizer.groups=4", "quantizer.cosine=true"]])
def test_training_with_each_kind(train_images, tmp_path, overrides):
    from helpers import run_training, train_metrics

    summary = run_training(train_images, tmp_path / "run", *overrides, "train.steps=2", "train.sample_every=null")
    fit = [m for m in train_metrics(tmp_path / "run") if m.get("codebook_fit")]
    levels = int(overrides[1].split("=")[1])
    assert fit and fit[0]["codes_used"] > 64 * (levels - 1)  # every codebook fitted
    model = VQRAE.from_pretrained(summary["final"])
    assert model.layout.position_shape == (levels,)
