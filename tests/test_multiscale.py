"""quantizer.kind=multiscale (issue 22): VAR's residual scales on frozen features. Values against an independent
reference of VAR's f_to_idxBl_or_fhat (FoundationVision/VAR models/quant.py, with and without phi), exact index
round trips, prefix decoding, the EMA rule on a shared codebook, the offline fit on whole grids, identical codebooks on
two ranks, and training (phi's included: by gradient, in the EMA copy, resumed exactly)."""

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import smooth_images, tiny_vqrae

from stage1 import VQRAE, QuantizerConfig, build_quantizer
from stage1.base.config_section import ConfigError
from stage1.model.kmeans import fit_kmeans
from stage1.model.quantizers.multiscale import Phi

pytestmark = pytest.mark.filterwarnings("ignore:VectorQuantizer. the codebook has not started")
SCALES, D, K = (1, 2, 3, 5), 6, 16  # a 5 x 5 grid: 1 + 4 + 9 + 25 = 39 codes


def var_phi_index(convs, k, scales):
    """VAR's PhiPartiallyShared / PhiNonShared: scale k of `scales` at k / (scales - 1) takes the conv of the
    nearest of `convs` ticks."""
    ticks = np.linspace(1 / 3 / convs, 1 - 1 / 3 / convs, convs) if convs == 4 else \
        np.linspace(1 / 2 / convs, 1 - 1 / 2 / convs, convs)
    return np.argmin(np.abs(ticks - k / (scales - 1))).item()


def var_phi(convs, k, scales):
    """VAR's Phi (quant_resi 0.5) of scale k: h -> 0.5 h + 0.5 conv3x3(h)."""
    conv = convs[var_phi_index(len(convs), k, len(scales))]
    return lambda h: h * 0.5 + F.conv2d(h, conv.weight, conv.bias, padding=1) * 0.5


def var_reference(f, codebooks, scales, convs=None):
    """VAR's f_to_idxBl_or_fhat on maps f (B, C, S, S) with codebooks[k] (K, C) for scale k (and phi's `convs`):
    per-scale indices (B, s * s) and f_hat after each scale."""
    rest, f_hat, indices, partial = f.clone(), torch.zeros_like(f), [], []
    side = f.shape[-1]
    for k, s in enumerate(scales):
        z = F.interpolate(rest, size=(s, s), mode="area") if s != side else rest
        z = z.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        idx = torch.cdist(z.double(), codebooks[k].double()).argmin(1)
        h = codebooks[k][idx].reshape(f.shape[0], s, s, -1).permute(0, 3, 1, 2)
        h = F.interpolate(h, size=(side, side), mode="bicubic") if s != side else h
        h = var_phi(convs, k, scales)(h) if convs else h
        f_hat, rest = f_hat + h, rest - h
        indices.append(idx.reshape(f.shape[0], s * s))
        partial.append(f_hat.clone())
    return indices, partial


def quantizer(shared=True, k=K, scales=SCALES, seed=0, phi=0):
    """A multi-scale quantizer whose codebooks are set on random data (started, as after a fit), and its phi
    convolutions (if any) random, as after training."""
    q = build_quantizer(QuantizerConfig(kind="multiscale", num_embeddings=k, scales=scales, shared_codebook=shared,
                                        phi=phi), D)
    assert q.shared == shared
    g = torch.Generator().manual_seed(seed)
    for level in q.levels:
        level.set_codebook(torch.randn(k, D, generator=g), torch.ones(k))
    with torch.no_grad():
        for conv in q.phi or []:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.2)
    return q.eval()


def grids(b=3, side=5, seed=1):
    return torch.randn(b, side * side, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shared, phi", [(True, 0), (False, 0), (True, 2), (False, 4)])
def test_codes_and_values_are_vars(shared, phi):
    q = quantizer(shared, phi=phi)
    z = grids()
    maps = z.transpose(1, 2).reshape(3, D, 5, 5)
    indices, partial = var_reference(maps, [q.codebook(k).embedding for k in range(len(SCALES))], SCALES, q.phi)
    codes = q.encode(z)
    assert codes.shape == (3, 39) and torch.equal(codes, torch.cat(indices, 1))
    out = q(z)
    z_q, forward_codes = out.z_q, out.indices
    assert torch.equal(forward_codes, codes)
    expected = partial[-1].flatten(2).transpose(1, 2)
    assert (z_q - expected).abs().max().item() <= 1e-5 and torch.equal(q.lookup(codes), z_q)
    assert out.commitment.item() == pytest.approx(F.mse_loss(z, expected).item(), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # decode paths run under the caller's autocast: phi stays fp32
        assert torch.equal(q.lookup(codes), z_q)
    if phi:  # VAR's: the mean over scales of each prefix's f_hat against the features, in vq_loss
        phi_loss = torch.stack([F.mse_loss(f_hat, maps) for f_hat in partial]).mean()
        assert out.extra["phi_loss"].item() == pytest.approx(phi_loss.item(), rel=1e-5)
        assert out.loss.item() == pytest.approx(0.25 * out.commitment.item() + phi_loss.item(),
                                                         rel=1e-5)
    else:
        assert "phi_loss" not in out.extra
    # Any prefix of whole scales decodes to VAR's f_hat after those scales; the maps split and join back.
    for k in range(1, len(SCALES) + 1):
        prefix = codes[:, : sum(s * s for s in SCALES[:k])]
        assert (q.lookup(prefix) - partial[k - 1].flatten(2).transpose(1, 2)).abs().max().item() <= 1e-5
    maps = q.layout.split(codes)
    assert [tuple(m.shape) for m in maps] == [(3, s, s) for s in SCALES]
    assert torch.equal(torch.cat([m.flatten(1) for m in maps], 1), codes)
    with pytest.raises(ValueError, match="not whole scales"):
        q.lookup(codes[:, :6])
    if not shared:  # a codebook of its own at 1 x 1 has one token per grid to fit on
        with pytest.raises(ValueError, match="4 tokens at scale 1x1 for the 16 codes.*at least 16 images"):
            q.fit(grids(b=4).reshape(-1, D), iters=2, tokens_per_update=1.0)
    # Straight through: the gradient reaches z as the identity.
    z.requires_grad_(True)
    q(z).z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


def test_phi_serves_the_scales_as_vars_and_starts_as_the_identity():
    from stage1.model.quantizers.scales import phi_of_scales

    for n, count in ((10, 4), (4, 4), (13, 4), (10, 1), (10, 10), (7, 3)):
        assert phi_of_scales(n, count) == [var_phi_index(count, k, n) for k in range(n)], (n, count)
    assert phi_of_scales(10, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]  # VAR's own ties (2/9 from 1/12 and 13/36)
    # A fresh phi changes no code and no value: offline fits and a run's start are those of the plain scheme.
    plain, fresh = quantizer(phi=0), build_quantizer(
        QuantizerConfig(kind="multiscale", num_embeddings=K, scales=SCALES, shared_codebook=True, phi=2), D).eval()
    fresh.load_state_dict(plain.state_dict(), strict=False)
    z = grids(seed=5)
    assert torch.equal(fresh.encode(z), plain.encode(z)) and torch.equal(fresh(z).z_q, plain(z).z_q)


def test_phi_learns_by_gradient_and_the_codes_follow_it():
    """Phi's gradients are VAR's: the decoder's (through z_q) and phi_loss's equal autograd through VAR's reference;
    the commitment term has none (VAR's uses f_hat.data). A few steps of vq_loss on fixed codebooks bring f_hat
    nearer the features, and encode() then follows the trained phi."""
    q = quantizer(shared=False, phi=2)
    z = grids(b=16, seed=6)
    maps = z.transpose(1, 2).reshape(16, D, 5, 5)
    codebooks = [level.embedding for level in q.levels]
    weights = list(q.phi.parameters())
    out = q(z)
    z_q = out.z_q
    _, partial = var_reference(maps, codebooks, SCALES, q.phi)
    probe = torch.randn(z_q.shape, generator=torch.Generator().manual_seed(8))  # a decoder's upstream gradient
    expected_phi_loss = torch.stack([F.mse_loss(f_hat, maps) for f_hat in partial]).mean()
    for ours, reference in (((z_q * probe).sum(), (partial[-1].flatten(2).transpose(1, 2) * probe).sum()),
                            (out.extra["phi_loss"], expected_phi_loss)):
        pairs = zip(torch.autograd.grad(ours, weights, retain_graph=True),
                    torch.autograd.grad(reference, weights, retain_graph=True), strict=True)
        for a, b in pairs:
            assert b.abs().sum() > 0 and torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not out.commitment.requires_grad
    with pytest.raises(ConfigError, match=r"for 10 scales: \[1, 2, 3, 4, 5, 6, 7, 8, 10\], got 9"):
        QuantizerConfig(kind="multiscale", phi=9)  # VAR's rule would leave one convolution idle: DDP stops on it

    for conv in q.phi:  # from the identity, as a run starts
        conv.load_state_dict(Phi(D).state_dict())
    optimizer = torch.optim.Adam(weights, lr=1e-2)
    first = None
    for _ in range(30):
        out = q(z)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        first = first if first is not None else out.commitment.item()
    assert q(z).commitment.item() < 0.9 * first
    indices, _ = var_reference(maps, codebooks, SCALES, q.phi)
    assert torch.equal(q.encode(z), torch.cat(indices, 1))


def test_a_shared_codebook_takes_one_ema_update_over_every_scale():
    """N_k <- decay N_k + (1 - decay) n_k and m_k <- decay m_k + (1 - decay) sum z_i over the residuals of all
    scales of the step (the codes found before the update), e_k = m_k / N'_k (Laplace smoothed); code 0 stays the
    zero vector (its hits count)."""
    q = quantizer(shared=True).train()
    level = q.levels[0]
    level.restart_window = 0.0
    z = grids(seed=4)
    before = {name: getattr(level, name).clone() for name in ("ema_cluster_size", "ema_embed_sum")}
    rest, residuals, codes = z.transpose(1, 2).reshape(3, D, 5, 5), [], []
    for s in SCALES:  # the residuals with the codebook before the update
        r = F.interpolate(rest, size=(s, s), mode="area") if s != 5 else rest
        r = r.flatten(2).transpose(1, 2).reshape(-1, D)
        idx = torch.cdist(r, level.embedding).argmin(1)
        h = level.embedding[idx].reshape(3, s, s, D).permute(0, 3, 1, 2)
        rest = rest - (F.interpolate(h, size=(5, 5), mode="bicubic") if s != 5 else h)
        residuals.append(r)
        codes.append(idx)
    r, idx = torch.cat(residuals), torch.cat(codes)
    q(z)
    counts = torch.bincount(idx, minlength=K).float()
    decay = level.decay
    size = before["ema_cluster_size"] * decay + (1 - decay) * counts
    sums = before["ema_embed_sum"] * decay + (1 - decay) * torch.zeros(K, D).index_add_(0, idx, r)
    sums[0] = 0
    assert torch.allclose(level.ema_cluster_size, size, atol=1e-6)
    assert torch.allclose(level.ema_embed_sum, sums, atol=1e-5)
    n = size.sum()
    assert torch.allclose(level.embedding, sums / ((size + level.epsilon) / (n + K * level.epsilon) * n).unsqueeze(1),
                          atol=1e-5)
    assert not level.embedding[0].any()


@pytest.mark.parametrize("shared", [True, False])
def test_the_offline_fit_is_k_means_of_each_scales_residuals(shared):
    """Per-scale codebooks: scale k's is k-means of the residuals the fitted scales before it leave. Shared: k-means
    of every scale's residuals under the codebook of a first fit on the scales' features, the centroid nearest zero
    made code 0 and pinned at zero after each fit."""
    q = build_quantizer(QuantizerConfig(kind="multiscale", num_embeddings=8, scales=SCALES, shared_codebook=shared),
                        D)
    samples = grids(b=40, seed=7).reshape(-1, D)
    q.fit(samples, iters=5, tokens_per_update=100.0, seed=3)
    assert all(bool(level.initialized) for level in q.levels)
    maps = samples.reshape(40, 25, D).transpose(1, 2).reshape(40, D, 5, 5)

    def residuals(codebooks):
        rest, out = maps, []
        for k, s in enumerate(SCALES):
            r = F.interpolate(rest, size=(s, s), mode="area") if s != 5 else rest
            out.append(r.flatten(2).transpose(1, 2))  # (grids, s * s, D)
            if k < len(codebooks):
                idx = torch.cdist(out[-1].reshape(-1, D), codebooks[k]).argmin(1)
                h = codebooks[k][idx].reshape(40, s, s, D).permute(0, 3, 1, 2)
                rest = rest - (F.interpolate(h, size=(5, 5), mode="bicubic") if s != 5 else h)
        return out

    def pinned(centroids):
        centroids, nearest = centroids.clone(), int(centroids.norm(dim=1).argmin())
        centroids[[0, nearest]] = centroids[[nearest, 0]].clone()
        centroids[0] = 0
        return centroids

    if shared:
        first = pinned(fit_kmeans(torch.cat(residuals([]), 1).reshape(-1, D), 8, iters=5, seed=3).centroids)
        second = torch.cat(residuals([first] * len(SCALES)), 1).reshape(-1, D)  # grid by grid
        expected = pinned(fit_kmeans(second, 8, iters=5, seed=4).centroids)
        assert torch.allclose(q.levels[0].embedding, expected, atol=1e-5)
        assert q.levels[0].ema_cluster_size.sum().item() == pytest.approx(100.0 / 25 * 39, rel=1e-4)  # hits/update
    else:
        fitted = [level.embedding for level in q.levels]
        for k, level in enumerate(q.levels):
            expected = fit_kmeans(residuals(fitted[:k])[k].reshape(-1, D), 8, iters=5, seed=3 + k).centroids
            assert torch.allclose(level.embedding, expected, atol=1e-5), k


def test_model_codes_round_trip_and_decode_from_any_prefix(dinov2_dir):
    torch.manual_seed(0)
    model = tiny_vqrae(dinov2_dir, quantizer_kind="multiscale", scales=[1, 2, 4], num_embeddings=16).eval()
    for level in model.quantizer.levels:
        level.initialized.fill_(True)
    x = smooth_images(2)
    maps = model.encode_to_indices(x)
    assert [tuple(m.shape) for m in maps] == [(2, 1, 1), (2, 2, 2), (2, 4, 4)]
    flat = model.encode_to_indices(x, flat=True)
    assert flat.shape == (2, 21) and torch.equal(torch.cat([m.flatten(1) for m in maps], 1), flat)
    whole = model.decode_from_indices(maps)
    assert torch.equal(whole, model(x)) and torch.equal(whole, model.decode_from_indices(flat))
    with torch.no_grad():
        z_q, _, codes = model.quantize(model.features(x))
        assert torch.equal(codes, flat) and torch.equal(model.decode(z_q), whole)
        assert torch.equal(model.encode(x), z_q)
    coarse = model.decode_from_indices(maps[:2])  # scales 1 and 2: a preview
    assert coarse.shape == whole.shape and not torch.equal(coarse, whole)
    assert torch.equal(coarse, model.decode_from_indices(flat[:, :5]))
    for bad, message in (([maps[1]], "first scales"), (flat[:, :3], "not whole scales"),
                         (flat.float(), "integer"), ([m + 16 for m in maps], r"\[0, 15\]")):
        with pytest.raises(ValueError, match=message):
            model.decode_from_indices(bad)
    with pytest.raises(ValueError, match=r"last scale must be the grid's side, e.g. quantizer.scales=\[1, 2, 3, 4\]"):
        tiny_vqrae(dinov2_dir, quantizer_kind="multiscale", num_embeddings=16)  # VAR's 16 on a 4 x 4 grid


def _train_rank(rank, world, init_file, out_dir, shared, phi, data):
    from stage1.base.distributed import wrap_ddp

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(100 + rank)  # different draws per rank: gathered pools must make them agree
    q = build_quantizer(QuantizerConfig(kind="multiscale", num_embeddings=8, scales=SCALES, shared_codebook=shared,
                                        restart_window=1.0, phi=phi), D).train()
    model = wrap_ddp(q, torch.device("cpu")) if phi else q  # phi learns as in training: DDP averages its gradients
    optimizer = torch.optim.SGD(q.parameters(), lr=0.05) if phi else None
    for step_data in data:
        out = model(step_data.chunk(world)[rank])
        if optimizer is not None:
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
    torch.save(q.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize("shared, phi", [(True, 0), (False, 0), (False, 2)])
def test_two_ranks_keep_every_codebook_identical(tmp_path, shared, phi):
    torch.manual_seed(0)
    data = [torch.randn(32, 25, D) + 2 * i for i in range(6)]  # drifting data: restarts fire
    mp.spawn(_train_rank, args=(2, str(tmp_path / "init"), str(tmp_path), shared, phi, data), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(bool(v) for k, v in rank0.items() if k.endswith("initialized"))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    if phi:  # it learned (from the identity), the same on both ranks
        identity = Phi(D).weight
        assert not torch.allclose(rank0["phi.1.weight"], identity, atol=1e-4)


@pytest.mark.parametrize("shared, codes", [("true", 64), ("false", 8)])  # per scale: 8 images give 8 tokens at 1x1
def test_training_fits_and_trains_a_multiscale_model(train_images, tmp_path, shared, codes):
    from helpers import run_training, train_metrics

    summary = run_training(train_images, tmp_path / "run", "quantizer.kind=multiscale", "quantizer.scales=[1,2,4]",
                           f"quantizer.shared_codebook={shared}", f"quantizer.num_embeddings={codes}",
                           "train.steps=2", "train.sample_every=null")
    fit = [m for m in train_metrics(tmp_path / "run") if m.get("codebook_fit")]
    assert fit and fit[0]["codes_used"] > 0
    model = VQRAE.from_pretrained(summary["final"])
    maps = model.encode_to_indices(smooth_images(2))
    assert [tuple(m.shape) for m in maps] == [(2, 1, 1), (2, 2, 2), (2, 4, 4)]
    # The commands carry the scales: shards and exports hold VAR's flat codes, the manifest their scales.
    import json

    import numpy as np

    from stage1.cli import decode, evaluate, tokenize

    out = tmp_path / "tokens"
    for fmt in ("shards", "jsonl", "memmap"):
        assert tokenize.main(["--model", summary["final"], "--data", train_images, "--out", str(out),
                              "--format", fmt]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["scales"], manifest["index_shape"], manifest["grid_shape"]) == ([1, 2, 4], [21], [4, 4])
    shard = np.load(out / "shard-00000.npy")
    names = [e["path"] for e in manifest["images"]]
    from stage1.data.input_pipeline import prepare_image

    x = torch.stack([prepare_image(os.path.join(train_images, name), 32)[0] for name in names])
    assert np.array_equal(shard, model.encode_to_indices(x, flat=True).numpy())
    line = json.loads((out / "tokens.jsonl").read_text().splitlines()[0])
    assert line["tokens"] == shard[0].tolist() and np.array_equal(np.load(out / "codes.npy"), shard)
    assert json.loads((out / "codes_index.json").read_text())["scales"] == [1, 2, 4]
    assert tokenize.main(["--model", summary["final"], "--data", train_images, "--out", str(tmp_path / "lg"),
                          "--format", "llamagen"]) == 2  # LlamaGen's GPT has no scales
    assert decode.main(["--model", summary["final"], "--tokens", str(out), "--out", str(tmp_path / "png")]) == 0
    # A manifest is an exchanged file: scales that do not make its codes, or not the model's, are one error.
    original = (out / "manifest.json").read_text()
    for scales in ([1, 2, 3], [2, 1, 4], [1, 4]):
        (out / "manifest.json").write_text(json.dumps({**manifest, "scales": scales}))
        assert decode.main(["--model", summary["final"], "--tokens", str(out), "--out", str(tmp_path / "bad")]) == 2
    (out / "manifest.json").write_text(original)
    assert not (tmp_path / "bad").exists()
    assert evaluate.main(["--model", summary["final"], "--data", train_images, "--out", str(tmp_path / "e")]) == 0
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert results["scales"] == [1, 2, 4] and results["bits_per_image"] == 21 * math.log2(codes)
    assert results["codebooks"] == (1 if shared == "true" else 3)
    counted = len({(0 if shared == "true" else k, int(c)) for k, part in
                   enumerate(np.split(shard, [1, 5], axis=1)) for c in np.unique(part)})
    assert results["codes_used"] == counted


def test_phi_trains_with_the_decoder_and_a_run_resumes_exactly(train_images, tmp_path):
    """Phi moves with the decoder's optimizer; as codes-side state it is saved live in both weight files (the EMA
    copy is the decoder's alone: an averaged phi would not match the codebooks that followed the live one)."""
    from helpers import run_training, step_logs
    from safetensors.torch import load_file

    args = ("quantizer.kind=multiscale", "quantizer.scales=[1,2,4]", "quantizer.shared_codebook=true",
            "quantizer.num_embeddings=16", "quantizer.phi=2", "train.steps=4", "train.ckpt_every=2",
            "train.sample_every=null", "train.report_reconstructions=false")
    run_training(train_images, tmp_path / "whole", *args)
    assert run_training(train_images, tmp_path / "split", *args, "train.stop_at=2")["step"] == 2
    assert run_training(train_images, tmp_path / "split", *args)["step"] == 4
    whole, split = step_logs(tmp_path / "whole"), step_logs(tmp_path / "split")
    for step in range(1, 5):
        assert split[step]["loss"] == pytest.approx(whole[step]["loss"], rel=1e-5, abs=1e-8), step
    last = tmp_path / "whole" / "checkpoints" / "step-0000004"
    live, ema = load_file(last / "model.safetensors"), load_file(last / "ema.safetensors")
    final = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "split" / "final" / "model.safetensors")
    assert any(not torch.equal(live[k], ema[k]) for k in live if k.startswith("decoder."))  # the EMA is there
    groups = torch.load(last / "trainer_state.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [len(g["params"]) for g in groups][1:] == [4] and groups[1]["weight_decay"] == 0.0  # phi: no decay
    channels = live["quantizer.phi.0.weight"].shape[0]
    identity = Phi(channels).weight
    for conv in ("quantizer.phi.0", "quantizer.phi.1"):
        weight = f"{conv}.weight"
        assert not torch.allclose(live[weight], identity, atol=1e-4)  # it learned
        assert torch.equal(live[weight], ema[weight]) and torch.equal(final[weight], live[weight])
        assert torch.allclose(resumed[weight], final[weight], rtol=1e-5, atol=1e-7)
    model = VQRAE.from_pretrained(tmp_path / "whole" / "final")  # codes through the trained phi
    assert torch.equal(model.quantizer.phi[1].weight, final["quantizer.phi.1.weight"])


def test_the_multiscale_experiment_composes():
    """experiment=vqrae_ms_dinov2_b_decxl: RAE's recipe with VAR's scales, a codebook per scale of VAR's 4096 codes,
    VAR's 4 phi convolutions, and a fit whose whole grids (images x tokens_per_image / 256 of them) can fit the 1 x 1
    scale."""
    from stage1.train.config import load_run_config

    cfg = load_run_config(["experiment=vqrae_ms_dinov2_b_decxl", "data.path=x"])
    q = cfg.model.quantizer
    assert (q.kind, q.scales, q.shared_codebook, q.num_embeddings, q.phi) == (
        "multiscale", (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), False, 4096, 4)
    assert cfg.model.encoder.input_size // 14 == q.scales[-1] and cfg.model.pretrained_decoder_path is not None
    assert cfg.codebook_fit.images * cfg.codebook_fit.tokens_per_image / 256 >= q.num_embeddings
