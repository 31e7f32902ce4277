"""Publishing a tokenizer on the Hugging Face Hub: its weights, config, frozen encoder (when it is a local folder,
which nobody else could reach) and a model card, so that VQRAE.from_pretrained("user/repo") loads it anywhere.

The card is generated from the model's config (encoder, codebook, decoder), the training run when the model
folder came from one (steps, from the run's train_config.yaml), an evaluation (vqrae-evaluate's results.json) and a
sample grid (e.g. training's reconstructions.png). Its metadata is huggingface_hub's ModelCardData: the encoder as
base_model, the training datasets, the evaluation as model-index results, and the license of the encoder family's
weights (the published folder holds, or depends on, them; MAE's are CC-BY-NC) unless one is given.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

from ..base.atomic import atomic_path, read_json, read_yaml

CARD_NAME = "README.md"
SAMPLES_NAME = "samples.png"
METRICS = (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("lpips", "LPIPS"), ("rfid", "rFID"),
           ("codebook_usage", "codebook usage"), ("perplexity", "perplexity"), ("bits_per_image", "bits per image"),
           ("latent_relative_distortion", "latent distortion ||z - z_q||^2 / var(z)"),
           ("latent_cosine", "latent cosine(z, z_q)"))
PIPELINE_TAG = "image-feature-extraction"  # images -> tokens; the Hub has no tokenizer task
# The license of each encoder family's released weights (MAE: facebookresearch/mae's LICENSE, CC-BY-NC 4.0).
FAMILY_LICENSES = {"Dinov2withNorm": "apache-2.0", "SigLIP2": "apache-2.0", "MAE": "cc-by-nc-4.0"}


def encoder_license(model) -> str:
    """The license of the weights of the model's encoder family (a Hub card may say otherwise: MAE's says apache-2.0
    while its weights are released CC-BY-NC; the family's is the one a card can rely on offline and online)."""
    return FAMILY_LICENSES.get(type(model.encoder).__name__, "other")


def encoder_hub_id(model) -> str | None:
    """The encoder's Hub id when the model names it by one (a local folder says nothing of where it came from)."""
    from .encoders import may_be_on_hub

    path = model.config.encoder.path
    return path if not os.path.isdir(path) and may_be_on_hub(path) else None


def card_data(model, repo_id: str, results: dict | None, license_: str | None = None, base_model: str | None = None,
              datasets: list[str] | None = None, eval_dataset: str | None = None):
    """The card's metadata: ModelCardData, with the evaluation as model-index results when its dataset has a Hub
    id (eval_dataset, else the first of datasets)."""
    from huggingface_hub import EvalResult, ModelCardData

    eval_dataset = eval_dataset or (datasets[0] if datasets else None)
    evaluations = None
    if results and eval_dataset:
        evaluations = [EvalResult(task_type="image-to-image", task_name="Image reconstruction",
                                  dataset_type=eval_dataset, dataset_name=eval_dataset,
                                  dataset_split=results.get("split"), metric_type=key, metric_name=label,
                                  metric_value=results[key])
                       for key, label in METRICS if _is_number(results.get(key))]
    return ModelCardData(library_name="vqrae", license=license_ or encoder_license(model),
                         base_model=base_model or encoder_hub_id(model), pipeline_tag=PIPELINE_TAG,
                         datasets=list(datasets) if datasets else None, eval_results=evaluations or None,
                         model_name=repo_id.split("/")[-1], tags=["image-tokenizer", "vector-quantization", "vqrae"])


def _cell(text) -> str:
    """A Markdown table cell: its pipes escaped (`||z - z_q||^2` would split the row, and renderers drop the rest)."""
    return str(text).replace("|", "\\|")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def model_card(model, repo_id: str, results: dict | None = None, training: dict | None = None,
               samples: str | None = None, **metadata) -> str:
    """The README.md of a published model: YAML metadata (card_data's `metadata`: license, base_model, datasets,
    eval_dataset), what it is, how to load it, and what was measured."""
    c = model.config
    d, layout, side = c.decoder, model.layout, model.grid_size
    bits = f"{layout.bits_per_image(side or 0):.0f} bits"
    if not layout.has_codes:
        codes = "none"
    elif layout.scales:
        codes = f"{layout.codes_per_image(side)} on scales {list(layout.scales)}: {bits}"
    elif side:
        codes = f"{side}x{side} tokens x {layout.codes_per_position}: {bits}"
    else:
        codes = "one per encoder patch" if layout.codes_per_position == 1 else \
            f"{layout.codes_per_position} per encoder patch"
    rows = [("encoder (frozen)", f"`{c.encoder.cls}` from `{c.encoder.path}`, {c.encoder.input_size} px"),
            ("quantizer", model.quantizer.describe()), ("codes per image", codes),
            ("decoder", f"ViT, {d.num_hidden_layers} layers of width {d.hidden_size}, patch {d.patch_size}")]
    if training:
        rows.append(("training", f"{training['steps']} steps of {training['batch_size']} images per rank"))
    data = card_data(model, repo_id, results, **metadata)
    lines = ["---", data.to_yaml().strip(), "---", "", f"# {repo_id.split('/')[-1]}", "",
             "An image tokenizer made with vqrae, on the design of RAE (github.com/bytetriper/RAE): a frozen "
             "encoder's patch features, snapped to a learned codebook, painted back by a ViT decoder.", "",
             "| part | value |", "| --- | --- |", *(f"| {_cell(name)} | {_cell(value)} |" for name, value in rows), "",
             "```python", "from stage1 import VQRAE", f'model = VQRAE.from_pretrained("{repo_id}")',
             "indices = model.encode_to_indices(images)   # images: (B, 3, H, W) in [0, 1]",
             "images = model.decode_from_indices(indices)", "```", ""]
    if results:
        lines += ["## Evaluation", "", f"`{results.get('data', '?')}`: {results.get('num_images', '?')} images at "
                  f"{results.get('image_size', '?')} px; crop: {results.get('protocol', 'not recorded')}.", "",
                  "| metric | value |", "| --- | --- |"]
        lines += [f"| {_cell(label)} | {results[key]:.4g} |" for key, label in METRICS if _is_number(results.get(key))]
        lines.append("")
    if samples:
        lines += ["## Samples", "", f"![originals above reconstructions]({samples})", ""]
    lines += ["## License", "", f"`{data.license}`: " + ("given when the model was published." if
              metadata.get("license_") else f"the frozen encoder's (`{c.encoder.path}`), whose weights this model "
              f"holds or loads; the decoder and codebook were trained with vqrae (MIT)."), ""]
    return "\n".join(lines)


def training_summary(model_dir: str) -> dict | None:
    """Steps and batch size of the run a model folder came from (results_dir/final, or a checkpoint under it), for
    the model card; None when its train_config.yaml is missing or does not say them as integers."""
    for folder in (os.path.dirname(model_dir), os.path.dirname(os.path.dirname(model_dir))):
        path = os.path.join(folder, "train_config.yaml")
        if os.path.isfile(path):
            try:
                tree = read_yaml(path)
            except (ValueError, OSError):
                return None
            train = tree.get("train") if isinstance(tree, dict) else None
            summary = {key: train.get(key) for key in ("steps", "batch_size")} if isinstance(train, dict) else {}
            ints = all(isinstance(v, int) and not isinstance(v, bool) for v in summary.values())
            return summary if summary and ints else None
    return None


# results.json's fields the card reads besides the metrics (which are used only when finite numbers): their types.
RESULT_FIELDS = (("split", str, "a string"), ("data", str, "a string"), ("protocol", str, "a string"),
                 ("num_images", int, "an integer"), ("image_size", int, "an integer"))


def stage_model(model_dir: str, repo_id: str, folder: str, results: str | None = None,
                samples: str | None = None, metadata: dict | None = None, **load_keywords) -> None:
    """Everything to upload, in `folder`: the model (its encoder inside when that is a local folder), the card (with
    `metadata`, model_card's) and the sample grid."""
    from .vqrae import VQRAE

    # The small inputs are checked first: nothing is written for a bad one.
    if samples is not None and not os.path.isfile(samples):
        raise FileNotFoundError(f"--samples {samples} does not exist")
    evaluation = read_json(results) if results is not None else None
    if evaluation is not None and not isinstance(evaluation, dict):
        raise ValueError(f"{results} is not a vqrae-evaluate results.json (expected a JSON object)")
    for key, kinds, expected in RESULT_FIELDS if evaluation is not None else ():
        if evaluation.get(key) is not None and (not isinstance(evaluation[key], kinds)
                                                or isinstance(evaluation[key], bool)):
            raise ValueError(f"{results}: {key} must be {expected}, got {json.dumps(evaluation[key])[:100]}")
    model = VQRAE.from_pretrained(model_dir, **load_keywords)
    card = model_card(model, repo_id, evaluation, training_summary(os.path.abspath(model_dir)),
                      SAMPLES_NAME if samples else None, **(metadata or {}))  # made before anything is written
    model.save_pretrained(folder, save_encoder=os.path.isdir(model.config.encoder.path))
    if samples is not None:
        with atomic_path(os.path.join(folder, SAMPLES_NAME)) as tmp:
            shutil.copyfile(samples, tmp)
    with atomic_path(os.path.join(folder, CARD_NAME)) as tmp, open(tmp, "w") as f:
        f.write(card)


def push_to_hub(model_dir: str, repo_id: str, private: bool = False, results: str | None = None,
                samples: str | None = None, token: str | None = None, metadata: dict | None = None,
                **load_keywords) -> str:
    """Create (or reuse) the Hub model repo `repo_id` and upload the staged model to it; returns the commit URL."""
    from huggingface_hub import HfApi

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"the Hub repo must be 'user/name' or 'org/name', got {repo_id!r}")
    with tempfile.TemporaryDirectory(prefix="vqrae-push-") as folder:
        stage_model(model_dir, repo_id, folder, results, samples, metadata, **load_keywords)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="vqrae-push")
    return str(getattr(commit, "commit_url", commit))
