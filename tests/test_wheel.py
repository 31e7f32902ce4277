"""The package as a user installs it from a wheel, not from the checkout (issue 28, point 5): the hydra configs, the
decoder presets and the quickstart's photos travel inside it, so `vqrae-train experiment=quickstart` and
`vqrae-reconstruct` run from any folder."""

import os
import subprocess
import sys
import sysconfig

import pytest
from helpers import REPO_ROOT


def check(command: list, **options) -> str:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=600, **options)
    assert result.returncode == 0, (command, result.stdout[-3000:], result.stderr[-3000:])
    return result.stdout


@pytest.mark.slow  # builds a wheel and runs two commands in a fresh environment
def test_the_wheel_installs_and_runs_away_from_the_checkout(tmp_path):
    check([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
           REPO_ROOT])
    (wheel,) = (tmp_path / "dist").iterdir()
    venv = tmp_path / "venv"
    check([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = check([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    # The dependencies come from this environment (torch alone is gigabytes); a plain path line, so that its own
    # .pth files (the checkout's editable install among them) are not read: stage1 can only come from the wheel.
    with open(os.path.join(site, "dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    check([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    location = check([python, "-c", "import stage1; print(stage1.__file__)"], cwd=elsewhere, env=env)
    assert location.startswith(site), location
    check([venv / "bin" / "vqrae-train", "experiment=quickstart", "train.steps=2", "train.sample_every=null",
           "train.report_reconstructions=false", "results_dir=run"], cwd=elsewhere, env=env)
    assert (elsewhere / "run" / "final" / "model.safetensors").is_file()
    photos = os.path.join(site, "stage1", "assets")
    out = check([venv / "bin" / "vqrae-reconstruct", "--model", "run/final", "--image",
                 os.path.join(photos, "chelsea.jpg"), "--out", "rec.png"], cwd=elsewhere, env=env)
    assert (elsewhere / "rec.png").is_file() and "PSNR" in out
