"""Every quantizer kind of the registry, end to end (issue 28): fit or start, training, an exact resume, saving and
loading, vqrae-tokenize -> vqrae-decode, every export that takes its codes (one clear refusal from the others),
vqrae-evaluate, vqrae-push's staged card, and (slow) two gloo ranks that keep one state. A kind added to QUANTIZERS
fails test_every_kind_is_covered until its tiny options are given here, and then takes this whole path."""

import ast
import json
import math
import os
import pathlib
import re

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import run_training, tiny_vqrae, train_metrics
from PIL import Image
from safetensors.torch import load_file

import stage1
from stage1 import QUANTIZERS, VQRAE, LlamaGenTokenizer, QuantizerConfig, VQRAEConfig, build_quantizer
from stage1.cli import decode, evaluate, push, tokenize
from stage1.data.images import to_uint8
from stage1.data.input_pipeline import prepare_image

# The runs: a kind and its options on the tiny model (4 x 4 grids of 32 channels, 8 training images, 8 codes per
# codebook); a kind with options that build other parameters has a run for each.
RUNS = {
    "single": ("single", {}),
    "residual": ("residual", {"depth": 2}),
    "grouped": ("grouped", {"groups": 2, "cosine": True}),
    "multiscale": ("multiscale", {"scales": [1, 2, 4], "phi": 1}),  # phi: parameters trained with the decoder
    "fsq": ("fsq", {"levels": [3, 2, 2]}),  # 12 codes
    "simvq": ("simvq", {}),
    "simvq random": ("simvq", {"basis": "random"}),  # no fit
    "gumbel": ("gumbel", {"tau_steps": 2}),  # distance logits: a learned scale
    "gumbel linear": ("gumbel", {"logits": "linear", "tau_steps": 2}),  # a linear head instead
    "none": ("none", {}),
}
STEPS = 4


def options(name: str) -> dict:
    kind, own = RUNS[name]
    return {"kind": kind, "num_embeddings": 8, **own}


def overrides(name: str) -> list[str]:
    return [f"quantizer.{key}={json.dumps(value).replace(' ', '')}" for key, value in options(name).items()]


def test_every_kind_is_covered():
    assert {kind for kind, _ in RUNS.values()} == set(QUANTIZERS)


@pytest.fixture(scope="module", params=sorted(RUNS))
def run(request, train_images, tmp_path_factory):
    """A kind's run of STEPS steps in one go, and the same run stopped halfway and resumed."""
    name, root = request.param, tmp_path_factory.mktemp(request.param.replace(" ", "_"))
    kind = RUNS[name][0]
    common = [*overrides(name), f"train.steps={STEPS}", "train.sample_every=null", "train.ckpt_every=2"]
    whole = run_training(train_images, root / "whole", *common)
    assert run_training(train_images, root / "split", *common, f"train.stop_at={STEPS // 2}")["step"] == STEPS // 2
    split = run_training(train_images, root / "split", *common)
    return kind, root, whole, split


def test_it_fits_trains_and_resumes_exactly(run):
    kind, root, whole, split = run
    model = VQRAE.from_pretrained(whole["final"])
    assert model.config.quantizer.kind == kind and model.quantizer.started
    fits = [m for m in train_metrics(root / "whole") if m.get("codebook_fit")]
    assert len(fits) == (1 if model.quantizer.fit_need == "offline" else 0)
    logged = [m["loss"] for m in train_metrics(root / "whole") if "loss" in m]
    assert len(logged) == STEPS and all(math.isfinite(v) for v in logged)
    last = os.path.join("checkpoints", f"step-{STEPS:07d}")
    for name in ("final/model.safetensors", f"{last}/model.safetensors", f"{last}/ema.safetensors"):
        a, b = (load_file(os.path.join(r["results_dir"], name)) for r in (whole, split))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-7), (name, key)
    # The kind's own trained parameters (phi, projections) moved with the decoder between checkpoints.
    trained = {id(p) for group in model.quantizer.trained_parameters() for p in group["params"]}
    names = [f"quantizer.{n}" for n, p in model.quantizer.named_parameters() if id(p) in trained]
    first, last = (load_file(os.path.join(whole["results_dir"], "checkpoints", f"step-{s:07d}", "model.safetensors"))
                   for s in (STEPS // 2, STEPS))
    assert all(not torch.equal(first[n], last[n]) for n in names)


def test_it_saves_and_loads_tokenizes_and_decodes_through_the_commands(run, train_images, tmp_path, capsys):
    kind, _, whole, _ = run
    model = VQRAE.from_pretrained(whole["final"])
    model.save_pretrained(tmp_path / "again")
    again = VQRAE.from_pretrained(tmp_path / "again")
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    args = ["--model", whole["final"], "--data", train_images, "--out", str(tmp_path / "t")]
    if not model.layout.has_codes:  # a continuous model: one refusal, nothing written
        assert tokenize.main(args) == 2 and not (tmp_path / "t").exists()
        return
    assert tokenize.main(args) == 0
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    names = [entry["path"] for entry in manifest["images"]]
    x = torch.stack([prepare_image(os.path.join(train_images, name), 32)[0] for name in names])
    codes = model.encode_to_indices(x, flat=bool(model.layout.scales))
    shard = np.load(tmp_path / "t" / "shard-00000.npy")
    assert np.array_equal(shard, codes.numpy()) and list(shard.shape[1:]) == list(model.code_shape(32))
    assert decode.main(["--model", whole["final"], "--tokens", str(tmp_path / "t"), "--out", str(tmp_path / "d")]) == 0
    expected = to_uint8(model.decode_from_indices(codes, output_size=(32, 32)))
    for name, image in zip(names, expected, strict=True):
        png = np.asarray(Image.open(tmp_path / "d" / (os.path.splitext(name)[0] + ".png")))
        assert np.array_equal(png, image.permute(1, 2, 0).numpy()), name
    # Every export that takes the layout's codes holds them; the others refuse in one error, before any work.
    for fmt in ("jsonl", "memmap"):
        assert tokenize.main([*args, "--format", fmt]) == 0, fmt
    capsys.readouterr()
    assert tokenize.main([*args, "--format", "llamagen"]) == 2  # these 4 x 4 grids are no LlamaGen size; and:
    refusal = capsys.readouterr().err
    if not model.layout.scales and not model.layout.position_shape:  # one code per position: LlamaGen's GPT takes it
        assert "LlamaGen takes square code grids of side" in refusal
        tokenizer = LlamaGenTokenizer(model)
        quant, _, (_, _, flat) = tokenizer.encode(x[:2] * 2 - 1)
        assert torch.equal(flat.reshape(2, -1), codes[:2].flatten(1))
        assert torch.equal(tokenizer.decode_code(flat.reshape(2, -1), [2, 32, 4, 4]),
                           model.decode_from_indices(codes[:2]) * 2 - 1)
    else:
        assert re.search("LlamaGen's GPT predicts one code per (grid )?position", refusal), refusal
        with pytest.raises(ValueError, match="one code per position"):
            LlamaGenTokenizer(model)
    line = json.loads((tmp_path / "t" / "tokens.jsonl").read_text().splitlines()[0])
    assert line["tokens"] == shard[0].reshape(-1, *model.layout.position_shape).tolist()
    assert np.array_equal(np.load(tmp_path / "t" / "codes.npy", mmap_mode="r"), shard)


def test_it_evaluates_and_its_card_describes_it(run, train_images, tmp_path):
    kind, _, whole, _ = run
    model = VQRAE.from_pretrained(whole["final"])
    layout = model.layout
    assert evaluate.main(["--model", whole["final"], "--data", train_images, "--out", str(tmp_path / "e")]) == 0
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert math.isfinite(results["psnr"])
    if layout.has_codes:
        assert results["bits_per_image"] == layout.bits_per_image(4) > 0
        assert results["codebooks"] == layout.num_codebooks
        assert results["codebook_size"] == layout.vocab_size == math.prod(
            [8] if kind != "fsq" else model.config.quantizer.levels)
    else:
        assert results["bits_per_image"] is None
    assert push.main(["--model", whole["final"], "--repo", "a/b", "--stage", str(tmp_path / "staged")]) == 0
    card = (tmp_path / "staged" / "README.md").read_text()
    assert f"| quantizer | {model.quantizer.describe()} |" in card
    codes_row = next(line for line in card.splitlines() if line.startswith("| codes per image |"))
    assert (f"{layout.bits_per_image(4):.0f} bits" in codes_row) if layout.has_codes else "none" in codes_row


@pytest.mark.parametrize("name", sorted(RUNS))
def test_bf16_features_give_the_fp32_codes_and_fp32_losses(name):
    """Under training's bf16 autocast the encoder hands bf16 tokens: every kind quantizes them in fp32 (its codes are
    those of the same values in fp32), returns z_q in their dtype, and its loss in fp32 with finite gradients."""
    torch.manual_seed(0)
    q = build_quantizer(QuantizerConfig(**options(name)), 32)
    grids = torch.randn(64, 16, 32)  # 4 x 4 grids, as the multi-scale kind takes them
    if q.fit_need == "offline":
        q.fit(grids.reshape(-1, 32), iters=3, tokens_per_update=256)
    z = grids[:4].to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        evaluated = q.eval()(z)
        trained = q.train()(z)
    assert evaluated.z_q.dtype == trained.z_q.dtype == torch.bfloat16
    assert trained.loss.dtype == trained.commitment.dtype == torch.float32
    if q.layout.has_codes:
        assert torch.equal(evaluated.indices, q.encode(z.float()))
    parameters = [p for group in q.trained_parameters() for p in group["params"]]
    if parameters:
        trained.loss.backward()
        assert all(p.grad is not None and p.grad.isfinite().all() for p in parameters)


# ---- no kind is asked about by name outside the kinds ------------------------------------------------------------
def kind_comparisons(path: pathlib.Path) -> list[str]:
    """`x.kind == "name"`, `kind in ("a", "b")`, `{...}[x.kind]` and the like in one source file."""
    names, found = set(QUANTIZERS), []

    def is_kind(node) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "kind") or (isinstance(node, ast.Name)
                                                                             and node.id == "kind")

    def names_a_kind(node) -> bool:
        values = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
        return any(isinstance(v, ast.Constant) and v.value in names for v in values)

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(is_kind(s) for s in sides) and any(names_a_kind(s) for s in sides):
                found.append(f"{path.name}:{node.lineno}")
        elif isinstance(node, ast.Subscript) and is_kind(node.slice) and isinstance(node.value, ast.Dict):
            found.append(f"{path.name}:{node.lineno}")
    return found


def test_no_module_outside_the_kinds_asks_for_a_kind_by_name(tmp_path):
    package = pathlib.Path(stage1.__file__).parent
    kinds = package / "model" / "quantizers"
    found = [hit for path in sorted(package.rglob("*.py")) if kinds not in path.parents
             for hit in kind_comparisons(path)]
    assert found == []
    # The check finds what it looks for: the card's old table of kinds, and a comparison.
    probe = tmp_path / "probe.py"
    probe.write_text('per = {"none": 0, "single": 1}[q.kind]\nif config.quantizer.kind != "multiscale":\n    pass\n')
    assert kind_comparisons(probe) == ["probe.py:1", "probe.py:2"]


# ---- two processes (gloo): one state on every rank, whatever the kind ---------------------------------------------
def _train_rank(rank, world, init_file, out_dir, encoder_dir, name, data):
    from stage1.base.distributed import wrap_ddp
    from stage1.train.codebook_fit import encode_batches, fit_codebook

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # one start on every rank, as training's seed
    base = tiny_vqrae(encoder_dir, num_embeddings=8).config.to_dict()
    quantizer = {**base["quantizer"], **options(name), "restart_window": 1.0}
    model = VQRAE(VQRAEConfig.from_dict({**base, "quantizer": quantizer})).train()
    mine = [images.chunk(world)[rank] for images in data]
    if model.quantizer.fit_need == "offline":  # as training starts: one fit over every rank's images
        fit_codebook(model, encode_batches(model, mine), tokens_per_image=16, iters=5, tokens_per_update=8 * 16,
                     show_progress=False)
    ddp = wrap_ddp(model, torch.device("cpu"))
    optimizer = torch.optim.SGD([p for g in model.trained_parameter_groups() for p in g["params"]], lr=0.05)
    torch.manual_seed(100 + rank)  # different draws per rank from here: the collectives must make them agree
    for images in mine:
        loss = ddp(images, return_loss=True)[1]["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize("name", sorted(RUNS))
def test_two_ranks_keep_one_state(dinov2_dir, tmp_path, name):
    from helpers import smooth_images

    data = [smooth_images(8, seed=s) for s in range(4)]  # 4 images per rank and step
    mp.spawn(_train_rank, args=(2, str(tmp_path / "init"), str(tmp_path), dinov2_dir, name, data), nprocs=2,
             join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert rank0.keys() == rank1.keys()
    assert all(bool(v) for k, v in rank0.items() if k.endswith("initialized"))  # every codebook fitted
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
