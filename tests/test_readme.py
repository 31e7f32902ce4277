"""The README's commands run as written (as vector-quantize-pytorch's tests/test_readme.py runs its snippets): its
first command's training, shortened, then every block of commands that runs offline, in order, in one folder, on
the model that training leaves."""

import os
import re
import shlex

from stage1.cli.arguments import launch
from stage1.cli.train import main as train_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme() -> str:
    with open(os.path.join(REPO, "README.md")) as f:
        return f.read()


def command_lines(block: str) -> list[tuple[str, list[str]]]:
    """(command, argv) of each vqrae-* line of a block, its trailing comment and [optional] parts left out."""
    lines = []
    for line in block.splitlines():
        line = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).strip()
        if line.startswith("vqrae-"):
            name, *argv = shlex.split(line)
            lines.append((name.removeprefix("vqrae-").replace("-", "_"), argv))
    return lines


OFFLINE_BLOCKS = 2  # the command block and the tar block: the others name ImageNet, a Hub download or a GPU run


def offline_blocks(text: str) -> list[str]:
    """The README's bash blocks that run on what the quickstart leaves: vqrae commands only, on no outside data."""
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    outside = ("/data/", "ckpt/", "results/run/", "vq_rae", "rae_dinov2", "hf download", "torchrun", "python ")
    def commands(block):  # its lines without their comments
        return "\n".join(line.split("#", 1)[0] for line in block.splitlines())

    return [b for b in blocks if not any(word in commands(b) for word in outside) and command_lines(b)]


def test_the_quickstart_and_the_command_block_run_as_written(tmp_path, monkeypatch, capsys):
    text = readme()
    install = text.split("\n\n")[2].strip()  # the first command: install, then train the quickstart
    assert install.endswith("scripts/train_stage1.py experiment=quickstart"), install
    monkeypatch.chdir(tmp_path)
    os.symlink(os.path.join(REPO, "assets"), "assets")
    # The quickstart as the README runs it, 2 steps instead of 600.
    assert train_main(shlex.split(install.rsplit("scripts/train_stage1.py", 1)[1]) + ["train.steps=2"]) == 0
    assert os.path.isfile("results/quickstart/final/model.safetensors")
    # Every block that runs offline, top to bottom, in this one folder (issue 31, point 3: the tar block reused the
    # folder block's tokens/, and the two latent-stats lines wrote one file).
    blocks = offline_blocks(text)
    assert len(blocks) == OFFLINE_BLOCKS and blocks[0].startswith("# original | reconstruction"), blocks
    commands = [command for block in blocks for command in command_lines(block)]
    assert [name for name, _ in commands] == ["reconstruct", "tokenize", "decode", "evaluate", "fit_codebook",
                                              "latent_stats", "latent_stats",  # --encoder, then --model
                                              "make_shards", "tokenize"]
    for name, argv in commands:
        capsys.readouterr()
        assert launch(name, argv) == 0, (name, argv, capsys.readouterr().err)
    assert os.path.isfile("rec.png") and os.path.isfile("tokens/manifest.json") and len(os.listdir("decoded")) == 6
    assert os.path.isfile("eval/results.json") and os.path.isfile("fitted/model.safetensors")
    assert os.path.isfile("stats.safetensors") and os.path.isfile("stats_per_position.safetensors")
    assert os.path.isfile("tokens_from_tars/manifest.json")


def test_the_keyword_table_lists_every_keyword_vqrae_takes():
    """VQRAE(**keywords)'s documented API: each flat name of stage1.model.config.KEYWORDS is in the README's table."""
    from stage1.model.keywords import KEYWORDS

    text = readme()
    table = text[text.index("| keyword | config field |"):].split("\n\n", 1)[0]
    assert not [name for name in (*KEYWORDS, "decoder_config_path") if f"`{name}`" not in table]


def test_the_readmes_multiscale_quickstart_runs_and_the_per_scale_one_says_what_to_set(tmp_path, monkeypatch,
                                                                                      capsys):
    """Issue 31, point 4: the quickstart's six photos are too few grids for a codebook per scale at 1 x 1; the README
    gives the shared codebook for small data, and the per-scale run stops before step 0 with one line saying so."""
    text = readme()
    line = next(line for line in re.findall(r"```bash\n(.*?)```", text, re.S)
                if "quantizer.kind=multiscale quantizer.shared_codebook=true" in line)
    argv = shlex.split(line.replace("\\\n", " "))
    assert argv[:2] == ["python", "scripts/train_stage1.py"], argv
    monkeypatch.chdir(tmp_path)
    os.symlink(os.path.join(REPO, "assets"), "assets")
    assert train_main(argv[2:] + ["train.steps=2", "train.sample_every=null"]) == 0
    assert os.path.isfile("results/quickstart_ms/final/model.safetensors")
    capsys.readouterr()
    per_scale = [a for a in argv[2:] if not a.startswith(("quantizer.shared_codebook", "results_dir"))]
    assert train_main(per_scale + ["results_dir=results/per_scale", "train.steps=2"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]  # beside the progress bars
    assert len(errors) == 1 and "quantizer.shared_codebook=true" in errors[0] and "codebook_fit.images" in errors[0]
