"""Issue 21: outputs that the tools people use downstream read as they are (webdataset's and timm's conventions)."""

import io
import os

import numpy as np
import pytest
from PIL import Image


def test_make_shards_names_fields_as_webdataset_and_timm_expect(tmp_path):
    """ImageNet's files end in .JPEG: written as the `jpg` field (the same bytes) that to_tuple("jpg", "cls") and
    timm's tar reader ("jpg;png;webp") find; path.txt keeps the file's own name."""
    import webdataset as wds

    from stage1.cli import make_shards

    rng = np.random.default_rng(0)
    files = {}
    for folder, name, fmt in (("n01", "a.JPEG", "jpeg"), ("n01", "b.jpeg", "jpeg"), ("n02", "c.png", "png"),
                              ("n02", "d.TIFF", "tiff")):
        os.makedirs(tmp_path / "data" / folder, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, format=fmt)
        (tmp_path / "data" / folder / name).write_bytes(buffer.getvalue())
        files[f"{folder}/{name}"] = buffer.getvalue()
    assert make_shards.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "shards"),
                             "--shard-size", "10"]) == 0
    samples = list(wds.WebDataset(str(tmp_path / "shards" / "000000.tar"), shardshuffle=False, empty_check=False)
                   .to_tuple("jpg;png;tif", "cls", "path.txt"))
    assert [(path.decode(), int(cls)) for _, cls, path in samples] == [
        ("n01/a.JPEG", 0), ("n01/b.jpeg", 0), ("n02/c.png", 1), ("n02/d.TIFF", 1)]
    assert all(image == files[path.decode()] for image, _, path in samples)
    jpegs = wds.WebDataset(str(tmp_path / "shards" / "000000.tar"), shardshuffle=False, empty_check=False)
    assert [int(cls) for _, cls in jpegs.select(lambda sample: "jpg" in sample).to_tuple("jpg", "cls")] == [0, 0]
    # timm's webdataset reader (create_dataset("wds/...")), its default fields: jpg;png;webp and cls.
    from timm.data import create_dataset

    dataset = create_dataset("wds/shards", root=str(tmp_path / "shards"), split="{000000..000000}.tar|4",
                             is_training=False, batch_size=1)
    read = [(np.asarray(image), target) for image, target in dataset]
    expected = [(np.asarray(Image.open(io.BytesIO(files[name])).convert("RGB")), label)
                for name, label in (("n01/a.JPEG", 0), ("n01/b.jpeg", 0), ("n02/c.png", 1))]  # no tif in timm's list
    assert len(read) == 3 and all(np.array_equal(a, b) and t == u for (a, t), (b, u) in zip(read, expected,
                                                                                          strict=True))


def test_evaluate_reports_how_much_of_the_latent_the_codes_keep(dinov2_dir, tmp_path):
    """Issue 21, point 7: beside pixels, vqrae-evaluate reports the latent fit on the evaluated images, the relative
    distortion ||z - z_q||^2 / spread of z and the mean cosine of z and z_q, checked against numpy on the model's
    own latents."""
    import json

    import torch
    from helpers import IMAGE_SIZE, smooth_images, tiny_vqrae
    from torchvision.utils import save_image

    from stage1 import VQRAE
    from stage1.cli import evaluate
    from stage1.data.input_pipeline import prepare_image

    torch.manual_seed(0)
    tiny_vqrae(dinov2_dir, num_embeddings=16).save_pretrained(tmp_path / "model")
    (tmp_path / "images").mkdir()
    for i, image in enumerate(smooth_images(5, size=IMAGE_SIZE, seed=4)):
        save_image(image, tmp_path / "images" / f"{i}.png")
    assert evaluate.main(["--model", str(tmp_path / "model"), "--data", str(tmp_path / "images"),
                          "--out", str(tmp_path / "eval"), "--batch-size", "2"]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())

    model = VQRAE.from_pretrained(tmp_path / "model")
    x = torch.stack([prepare_image(str(tmp_path / "images" / f"{i}.png"), IMAGE_SIZE)[0] for i in range(5)])
    with torch.no_grad():
        z = model.features(x).flatten(2).transpose(1, 2).reshape(-1, model.encoder.hidden_size).double().numpy()
        codes = model.encode_to_indices(x)
        z_q = model.quantizer.lookup(codes.reshape(5, -1)).reshape(z.shape).double().numpy()
    distortion = ((z - z_q) ** 2).sum(1).mean() / ((z - z.mean(0)) ** 2).sum(1).mean()
    cosine = ((z * z_q).sum(1) / np.linalg.norm(z, axis=1) / np.linalg.norm(z_q, axis=1)).mean()
    assert distortion > 0 and -1 < cosine < 1  # an untrained codebook: far from the latents
    assert abs(results["latent_relative_distortion"] - distortion) < 1e-4 * distortion
    assert abs(results["latent_cosine"] - cosine) < 1e-5


def test_tensorboard_groups_scalars_and_holds_the_config(train_images, tmp_path):
    """Issue 21, point 6: loss/, codebook/, optim/ and perf/ scalars (the values of metrics.jsonl), the codebook
    fit's distortion at step 0, and the composed config as text and hparams."""
    from helpers import run_training, step_logs, train_metrics
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_training(train_images, tmp_path / "r", "train.steps=2", "train.log_every=1")
    events = EventAccumulator(str(tmp_path / "r" / "tb"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/loss", "loss/recon_loss", "codebook/perplexity", "codebook/codebook_usage", "optim/lr",
            "optim/grad_norm", "perf/images_per_sec", "codebook/fit_distortion"} <= tags
    assert not any(tag.startswith("train/") for tag in tags)
    for step, values in step_logs(tmp_path / "r").items():
        logged = {e.step: e.value for e in events.Scalars("loss/loss")}
        assert logged[step] == pytest.approx(values["loss"], rel=1e-6)
    fit = next(m for m in train_metrics(tmp_path / "r") if m.get("codebook_fit"))
    assert events.Scalars("codebook/fit_distortion")[0].value == pytest.approx(fit["distortion"], rel=1e-6)
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "  steps: 2\n" in config and "  lr: " in config
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")


def test_a_model_loads_from_the_hugging_face_cache_offline_at_a_revision(dinov2_dir, tmp_path):
    """Issue 21, point 3: from_pretrained passes revision / cache_dir / local_files_only to the Hub, so a model in
    the Hugging Face cache loads with HF_HUB_OFFLINE=1 (as on compute nodes), at the revision asked for."""
    import shutil

    import torch
    from helpers import tiny_vqrae

    from stage1 import VQRAE

    torch.manual_seed(0)
    tiny_vqrae(dinov2_dir).save_pretrained(tmp_path / "model")
    repo = tmp_path / "cache" / "models--someone--tiny"  # the cache's layout: refs name snapshots
    for commit in ("a" * 40, "b" * 40):
        shutil.copytree(tmp_path / "model", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    weights = repo / "snapshots" / ("b" * 40) / "model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    state["quantizer.embedding"] = state["quantizer.embedding"] + 1  # revision b differs
    save_file(state, weights)
    main = VQRAE.from_pretrained("someone/tiny", cache_dir=str(tmp_path / "cache"), local_files_only=True)
    other = VQRAE.from_pretrained("someone/tiny", cache_dir=str(tmp_path / "cache"), revision="b" * 40)
    original = VQRAE.from_pretrained(tmp_path / "model")
    assert torch.equal(main.quantizer.embedding, original.quantizer.embedding)
    assert torch.equal(other.quantizer.embedding, original.quantizer.embedding + 1)
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache with the Hub off"):
        VQRAE.from_pretrained("someone/tiny", cache_dir=str(tmp_path / "cache"), revision="c" * 40)


def test_plain_tars_of_class_folders_take_their_classes_from_member_paths(model_dir, class_tree, tmp_path):
    """Issue 21, point 4: `tar cf` of an ImageFolder tree (no cls fields) gives each image its ImageFolder class
    from its member path, across shards (the sorted top-level folders of all of them), as the folder itself does;
    shards that carry cls keep theirs."""
    import json
    import tarfile

    from stage1.cli import make_shards, tokenize

    # Two plain tars, the classes split between them (dog only in the second), one image at the top level.
    members = [("cat/a.png", "one"), ("cat/b.png", "one"), ("dog/c.png", "two"), ("root.png", "two")]
    for tar_name in ("one", "two"):
        with tarfile.open(tmp_path / f"{tar_name}.tar", "w") as tar:
            for member, where in members:
                if where == tar_name:
                    tar.add(os.path.join(class_tree, member), arcname=member)
    spec = str(tmp_path / "{one,two}.tar")
    for data, out in ((class_tree, "folder"), (spec, "tars")):
        assert tokenize.main(["--model", model_dir, "--data", data, "--out", str(tmp_path / out)]) == 0
    folder, tars = (json.loads((tmp_path / out / "manifest.json").read_text()) for out in ("folder", "tars"))
    assert tars["classes"] == folder["classes"] == ["cat", "dog"]
    assert [(e["path"], e["label"]) for e in tars["images"]] == [("cat/a.png", 0), ("cat/b.png", 0),
                                                                 ("dog/c.png", 1), ("root.png", -1)]
    assert [e["label"] for e in folder["images"]] == [0, 0, 1, -1]
    codes = [np.concatenate([np.load(tmp_path / out / f"shard-0000{i}.npy") for i in range(n)])
             for out, n in (("folder", 1), ("tars", 2))]
    assert np.array_equal(*codes)
    # Shards with cls fields (vqrae-make-shards') say their classes themselves: ids, no names.
    assert make_shards.main(["--data", class_tree, "--out", str(tmp_path / "wds")]) == 0
    assert tokenize.main(["--model", model_dir, "--data", str(tmp_path / "wds" / "000000.tar"),
                          "--out", str(tmp_path / "wds_tokens")]) == 0
    manifest = json.loads((tmp_path / "wds_tokens" / "manifest.json").read_text())
    assert manifest["classes"] is None and [e["label"] for e in manifest["images"]] == [0, 0, 1, -1]


@pytest.mark.parametrize("prefix, members, classes, labels", [
    ("./", ["cat/a.png", "dog/c.png", "top.png"], ["cat", "dog"], [0, 1, -1]),  # tar cf x.tar -C train .
    ("train/", ["cat/a.png", "cat/b.png", "dog/c.png"], ["cat", "dog"], [0, 0, 1]),  # tar cf x.tar train/
    ("", ["cat/a.png", "cat/b.png"], ["cat"], [0, 0]),  # one class folder: that folder is the class
    ("", ["a/cat/x.png", "b/dog/y.png"], ["a", "b"], [0, 1]),  # the folders right below the common root
])
def test_tar_classes_are_imagefolders_below_the_common_root(class_tree, tmp_path, prefix, members, classes, labels):
    import tarfile

    from stage1.data.tar_shards import folder_classes, read_shard

    source = os.path.join(class_tree, "cat", "a.png")
    with tarfile.open(tmp_path / "x.tar", "w") as tar:
        for member in members:
            tar.add(source, arcname=prefix + member)
    found = folder_classes([str(tmp_path / "x.tar")])
    assert found.names == classes and found.unlabelled == labels.count(-1)
    assert [sample.label for sample in read_shard(str(tmp_path / "x.tar"), found)] == labels
