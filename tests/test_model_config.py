"""VQRAEConfig: one name per value from the command line to the module, checked once, JSON on disk."""

import dataclasses
import json
import os

import pytest
import torch
import yaml
from helpers import IMAGE_SIZE, smooth_images, tiny_vqrae

from stage1 import VQRAE, DecoderConfig, EncoderConfig, QuantizerConfig, VQRAEConfig
from stage1.model.config import SECTIONS
from stage1.model.keywords import KEYWORDS
from stage1.model.presets import CONFIG_DIR
from stage1.train.config import DataConfig, load_run_config
from stage1.train.losses import LossConfig


def tiny_config(encoder_dir, **quantizer) -> VQRAEConfig:
    return VQRAEConfig(
        encoder=EncoderConfig(cls="Dinov2withNorm", path=encoder_dir, input_size=IMAGE_SIZE),
        quantizer=QuantizerConfig(num_embeddings=64, **quantizer),
        decoder=DecoderConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                              patch_size=8),
    )


def test_keyword_form_builds_the_same_model_as_the_config(dinov2_dir):
    config = tiny_config(dinov2_dir, decay=0.9, commitment_cost=0.5)
    torch.manual_seed(0)
    from_config = VQRAE(config).eval()
    torch.manual_seed(0)
    from_keywords = tiny_vqrae(dinov2_dir, vq_decay=0.9, commitment_cost=0.5).eval()
    assert from_keywords.config == config
    state_a, state_b = from_config.state_dict(), from_keywords.state_dict()
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    x = smooth_images(2)
    assert torch.equal(from_config(x), from_keywords(x))
    # The value reaches the module under the same name.
    assert from_config.quantizer.decay == config.quantizer.decay == 0.9
    with pytest.raises(TypeError, match="not both"):
        VQRAE(config, num_embeddings=8)
    with pytest.raises(TypeError, match=r"unknown VQRAE keyword arguments \['num_embedings'\]"):
        VQRAE(num_embedings=8)


def test_config_round_trips_through_json(dinov2_dir, tmp_path):
    config = dataclasses.replace(tiny_config(dinov2_dir, restart_window=7.0), noise_tau=0.3,
                                 reshape_to_2d=False)
    config.save(str(tmp_path / "config.json"))
    assert VQRAEConfig.load(str(tmp_path / "config.json")) == config
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert set(on_disk) >= set(SECTIONS) and on_disk["quantizer"]["restart_window"] == 7


def test_every_keyword_names_a_config_field():
    for keyword, (section, name) in KEYWORDS.items():
        owner = SECTIONS[section] if section else VQRAEConfig
        assert name in {f.name for f in dataclasses.fields(owner)}, keyword


GROUPS = {"encoder": EncoderConfig, "quantizer": QuantizerConfig, "decoder": DecoderConfig, "loss": LossConfig,
          "data": DataConfig}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_hydra_groups_state_only_what_differs_from_the_dataclass(group):
    """One place per default: a group's YAML names config fields, each with a value other than the field's default
    (the decoder presets give every size: its sizes have no default)."""
    section = GROUPS[group]
    defaults = section.default_tree()
    options = sorted(os.path.splitext(n)[0] for n in os.listdir(os.path.join(CONFIG_DIR, group)))
    assert options
    for option in options:
        with open(os.path.join(CONFIG_DIR, group, f"{option}.yaml")) as f:
            values = yaml.safe_load(f) or {}
        if "encoder" in values:  # `# @package _global_`: the stand-in encoders also set init.tiny_encoder
            values = values["encoder"]
        assert set(values) <= set(defaults), (option, set(values) - set(defaults))
        assert not [k for k, v in values.items() if v == defaults[k]], option
        cfg = load_run_config([f"{group}={option}", "data.path=x", "results_dir=r", "image_size=224",
                               "loss.dino_path=d.pth"])
        built = cfg.model if group in ("encoder", "quantizer", "decoder") else cfg
        assert isinstance(getattr(built, group), section)


def test_a_command_line_value_reaches_the_module(dinov2_dir):
    cfg = load_run_config(["experiment=tiny_test", "data.path=x", "results_dir=r", "quantizer.decay=0.7",
                           "decoder.num_hidden_layers=1", f"encoder.path={dinov2_dir}", "image_size=32",
                           "noise_tau=0.2", "encoder.params.normalize=false"])
    model = VQRAE(cfg.model)
    assert model.quantizer.decay == 0.7 and len(model.decoder.blocks) == 1 and model.config.noise_tau == 0.2
    # an encoder option, a key the tree does not list: the final LayerNorm keeps its affine
    assert model.config.encoder.params == {"normalize": False} and model.encoder.model.layernorm.weight is not None


def test_an_integer_past_floats_range_is_a_wrong_value_not_an_overflow():
    """A float field given an int too large for a float (10**400 in a config.json) was Python's OverflowError."""
    with pytest.raises(ValueError, match=r"^quantizer.decay must be a finite number, got 1000"):
        QuantizerConfig(decay=10**400)


def test_keywords_of_the_wrong_type_are_one_value_error(dinov2_dir, tmp_path):
    """A second probe of issue 32: decoder_config_path 1.5, ['tiny'] or 1 (a file descriptor to os.path), RAE's
    encoder_params of a list or naming its checkpoint by a list, and a saved quantizer.kind of ['single'] were
    TypeErrors and AttributeErrors."""
    from stage1 import RAE

    for source in (1.5, ["tiny"], 1):
        with pytest.raises(ValueError, match=r"decoder_config_path must be a preset name, .* got "):
            VQRAE(encoder_cls="Dinov2withNorm", encoder_config_path=dinov2_dir, decoder_config_path=source)
    for params, message in (([1], "encoder.params must be a mapping"),
                            ({"dinov2_path": [dinov2_dir]}, "must name the encoder's checkpoint as a path")):
        with pytest.raises(ValueError, match=message):
            RAE(encoder_cls="Dinov2withNorm", encoder_params=params, encoder_input_size=IMAGE_SIZE,
                decoder_config_path="tiny")
    tiny_vqrae(dinov2_dir).save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["quantizer"]["kind"] = ["single"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quantizer.kind must be a string, got \['single'\] \(list\)"):
        VQRAE.from_pretrained(tmp_path / "m")


def test_encoder_params_of_the_wrong_type_name_the_encoders_options(dinov2_dir):
    """Issue 32, point 3: encoder_params given as a list named neither what was wrong nor what was expected."""
    for params in ([1, 2], "normalize", {"normalise": False}, {"normalize": "no"}):
        with pytest.raises(ValueError, match=r"^encoder.params must be a mapping of options of Dinov2withNorm: "
                                             r"normalize \(bool\), got "):
            VQRAE(encoder_cls="Dinov2withNorm", encoder_config_path=dinov2_dir, encoder_params=params)


@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", "train.steps must be an integer, got 'abc' (str)"),
    ("train.lr=[1,2]", "train.lr must be a finite number, got [1, 2] (list)"),
    ("train.betas=[0.9]", "train.betas must be a list of 2 finite numbers, got [0.9] (list)"),
    ("train.grad_clip=true", "train.grad_clip must be a finite number or null, got True (bool)"),
    ("quantizer.decay=2", "quantizer.decay must be in [0, 1), got 2.0"),
    ("quantizer.num_embeddings=1.5", "quantizer.num_embeddings must be an integer, got 1.5 (float)"),
    ("encoder.params=3", "encoder.params must be a mapping of options of Dinov2withNorm: normalize (bool), got 3"),
    ("encoder.params={x:1}", "encoder.params must be a mapping of options of Dinov2withNorm: normalize (bool), got {"),
    ("encoder.params.x=1", "encoder.params must be a mapping of options of Dinov2withNorm: normalize (bool), got {'x"),
    ("loss.disc=wgan", "loss.disc must be one of ['patchgan', 'dino'], got 'wgan'"),
    # A second probe of issue 32: Inf passed every `> 0` check, and counts had no upper bound.
    ("train.lr=inf", "train.lr must be a finite number, got inf (float)"),
    ("noise_tau=-inf", "noise_tau must be a finite number, got -inf (float)"),
    ("decoder.layer_norm_eps=nan", "decoder.layer_norm_eps must be a finite number, got nan (float)"),
    ("data.num_workers=100000", "data.num_workers must be from 0 to 256, got 100000"),
    ("train.cpu_threads=1000000", "train.cpu_threads must be from 1 to 1024 or null (auto), got 1000000"),
    ("dist_timeout_minutes=1e308", "dist_timeout_minutes must be from 1/60 (a second) to 10080 (a week), got 1e+308"),
    ("dist_timeout_minutes=1e-9", "dist_timeout_minutes must be from 1/60 (a second) to 10080 (a week), got 1e-09"),
    ("seed=100000000000000000000000", "seed must be a 64-bit integer, got 100000000000000000000000"),
    ("+init.tiny_encoder.foo=1", "unknown init.tiny_encoder config keys ['foo']"),
    ("init.tiny_encoder.hidden_size=65536", "init.tiny_encoder.hidden_size must be from 1 to 1,024, got 65536"),
    ("init.tiny_encoder.num_attention_heads=3", "init.tiny_encoder.hidden_size must be divisible by"),
    ("data.num_workers=-1", "data.num_workers must be from 0 to 256, got -1"),
    ("train.stop_at=99", "train.stop_at must be in [1, train.steps = 8] or null, got 99"),
    ("precision=fp64", "precision must be one of ['auto', 'bf16', 'fp16', 'fp32'], got 'fp64'"),
    ("+codebook_fit.itters=3", "unknown codebook_fit config keys ['itters']"),
])
def test_a_wrong_value_is_one_error_naming_key_value_and_expected(override, message):
    with pytest.raises(ValueError) as err:
        load_run_config(["experiment=tiny_test", "data.path=x", "results_dir=r", override])
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("argv, message", [
    (["train.steps=abc"], "error: train.steps must be an integer, got 'abc' (str)"),
    (["train.stepz=3"], "error: Could not override 'train.stepz': Key 'stepz' is no config key"),
    (["quantizer.decay=2"], "error: quantizer.decay must be in [0, 1), got 2.0"),
    (["experiment=nope"], "error: In 'train': Could not find 'experiment/nope' (experiment= takes one of: "),
    (["encoder=nosuch"], "Could not find 'encoder/nosuch' (encoder= takes one of: dinov2_b, dinov2_plain_b, mae_b, "
                         "siglip2_b, tiny_dinov2, tiny_mae, tiny_siglip)"),
    (["--cfg", "hydra"], "error: --cfg hydra: only the job's config is printed"),
])
def test_the_training_script_gives_one_error_line_and_exit_code_2(argv, message, capsys):
    from stage1.cli.train import main

    assert main(["experiment=tiny_test", "data.path=x", "results_dir=r", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_cfg_job_prints_the_checked_config_the_run_would_use(capsys):
    from stage1.cli.train import main

    assert main(["experiment=tiny_test", "data.path=x", "results_dir=r", "quantizer.decay=0.5", "--cfg", "job"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_run_config(["experiment=tiny_test", "data.path=x", "results_dir=r",
                                       "quantizer.decay=0.5"]).to_tree()
    assert printed["quantizer"]["decay"] == 0.5 and printed["train"]["steps"] == 8


def test_bad_config_files_are_refused_clearly(dinov2_dir, tmp_path):
    good = tiny_config(dinov2_dir).to_dict()
    cases = [
        ({**good, "quantizer": {**good["quantizer"], "decya": 0.9}}, r"unknown quantizer config keys \['decya'\]"),
        ({**good, "decoder": {"hidden_size": 64}}, r"decoder config lacks keys \['num_hidden_layers'"),
        ({**good, "encoder": "dinov2"}, "encoder must be a mapping"),
        ({**good, "quantizer": {**good["quantizer"], "kind": "magic"}}, "quantizer.kind must be one of"),
        ({**good, "quantizer": {**good["quantizer"], "decay": "0.9"}},
         r"config.json: quantizer.decay must be a finite number, got '0.9' \(str\)"),
        ({**good, "noise_tau": None}, r"noise_tau must be a finite number, got None"),
        ({**good, "decoder": {**good["decoder"], "cls_token": 1}}, r"decoder.cls_token must be true or false, got 1"),
    ]
    for values, message in cases:
        (tmp_path / "config.json").write_text(json.dumps(values))
        with pytest.raises(ValueError, match=message):
            VQRAEConfig.load(str(tmp_path / "config.json"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        VQRAEConfig.load(str(tmp_path / "config.json"))


def test_json_and_yaml_syntax_errors_name_their_file(tmp_path, dinov2_dir):
    """Issue 12, case 11 (messages): a broken decoder config, encoder preprocessor config or tokenize listing names
    the file that is broken."""
    import shutil

    from stage1.model.encoders import build_encoder
    from stage1.model.keywords import load_decoder_config

    (tmp_path / "decoder.json").write_text('{"hidden_size": 64,')
    with pytest.raises(ValueError, match=r"decoder.json is not valid JSON"):
        load_decoder_config(str(tmp_path / "decoder.json"))
    (tmp_path / "decoder.yaml").write_text("hidden_size: [64")
    with pytest.raises(ValueError, match=r"decoder.yaml is not valid YAML"):
        load_decoder_config(str(tmp_path / "decoder.yaml"))
    shutil.copytree(dinov2_dir, tmp_path / "encoder")
    (tmp_path / "encoder" / "preprocessor_config.json").write_text("{'image_mean': [0.5]}")
    with pytest.raises(ValueError, match=r"preprocessor_config.json is not valid JSON"):
        build_encoder("Dinov2withNorm", str(tmp_path / "encoder"))


def test_a_saved_config_with_an_option_its_kind_never_read_still_loads(dinov2_dir, tmp_path):
    """A config.json from before the kinds refused each other's options (shared_codebook on a single codebook was
    saved and ignored): it loads with a warning naming them, and the same model; built fresh, it is refused."""
    model = tiny_vqrae(dinov2_dir)
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    saved["quantizer"].update(shared_codebook=True, scales=[1, 2])
    (tmp_path / "m" / "config.json").write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match=r"\{'scales': \[1, 2\], 'shared_codebook': True\} are not options of "
                                         r"quantizer.kind 'single'"):
        loaded = VQRAE.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(ValueError, match=r"quantizer.scales must be \[1, 2, 3, 4, 5, 6, 8, 10, 13, 16\] with kind "
                                         r"'single' \(an option of multiscale\), got \(1, 2\)"):
        VQRAEConfig.from_dict(saved)


def test_a_cause_the_error_already_quotes_is_said_once():
    from stage1.cli.train import _message

    cause = OSError("We couldn't connect to 'https://huggingface.co'.")
    quoted = ValueError(f"Could not load the encoder 'x/y'. (cause: OSError: {cause})")
    quoted.__cause__ = cause
    assert _message(quoted).count("We couldn't connect") == 1
    wrapped = ValueError("Error merging override")
    wrapped.__cause__ = ValueError("Key 'stepz' is not in struct")
    assert _message(wrapped) == "Error merging override: Key 'stepz' is no config key (--cfg job lists them)"


def test_a_missing_training_data_path_is_named_as_the_key_it_was_set_by(tmp_path, capsys):
    """Issue 31, point 9: training's data is data.path, not the commands' --data."""
    from stage1.cli.train import main

    assert main(["experiment=tiny_test", f"data.path={tmp_path / 'nope'}", f"results_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: data.path '{tmp_path / 'nope'}' does not exist" in err, err


def test_the_error_line_is_said_once_per_job(monkeypatch, capsys):
    """Issue 31, point 4: under torchrun every rank met the same bad input and printed it; the first rank says it,
    another rank only an OSError, which may be its own (its node's disk)."""
    from stage1.cli.arguments import report_error
    from stage1.cli.train import main

    monkeypatch.setenv("RANK", "1")
    assert main(["experiment=tiny_test", "data.path=x", "results_dir=r", "quantizer.decay=2"]) == 2
    assert capsys.readouterr().err == ""
    report_error("vqrae-tokenize", "disk full", OSError(28, "No space left on device"))
    assert capsys.readouterr().err == "vqrae-tokenize: error: disk full\n"
    monkeypatch.setenv("RANK", "0")
    assert main(["experiment=tiny_test", "data.path=x", "results_dir=r", "quantizer.decay=2"]) == 2
    assert capsys.readouterr().err.count("error: quantizer.decay must be in [0, 1)") == 1
