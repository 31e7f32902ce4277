"""Issue 20, preemption: SIGTERM / SIGUSR1 during training finish the step in progress, checkpoint it on every rank
and stop; the same command resumes exactly."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import REPO_ROOT, step_logs, torchrun, train_metrics
from helpers import run_training as run
from safetensors.torch import load_file

from stage1.cli.train import main as train_main
from stage1.train import trainer
from stage1.train.checkpoint import checkpoint_files, list_checkpoints, missing_files
from stage1.train.trainer import Trainer

SHORT = ("train.steps=4", "train.ckpt_every=100", "train.sample_every=null", "train.report_reconstructions=false")


@pytest.fixture
def signal_in_step(monkeypatch):
    """Deliver `signum` to this process inside the training step that starts after `step` steps, before its
    update: the step in progress must still be taken."""

    def install(signum, step):
        original = Trainer._train_step

        def step_with_signal(self, batches):
            if self.step == step:
                os.kill(os.getpid(), signum)
            return original(self, batches)

        monkeypatch.setattr(Trainer, "_train_step", step_with_signal)

    return install


def checkpoint_steps(results_dir):
    return [os.path.basename(p) for p in list_checkpoints(str(results_dir / "checkpoints"))]


def test_sigterm_checkpoints_the_step_in_progress_and_the_run_resumes_exactly(train_images, tmp_path, capsys,
                                                                                 signal_in_step, monkeypatch):
    run(train_images, tmp_path / "whole", *SHORT)
    signal_in_step(signal.SIGTERM, 1)  # during step 2 of 4; no checkpoint is due before step 4
    capsys.readouterr()
    stopped = run(train_images, tmp_path / "split", *SHORT)
    assert stopped["step"] == 2 and stopped["preempted"] == "SIGTERM" and "final" not in stopped
    assert checkpoint_steps(tmp_path / "split") == ["step-0000002"]
    checkpoint = tmp_path / "split" / "checkpoints" / "step-0000002"
    assert (f"stopped by SIGTERM at step 2: checkpoint saved to {checkpoint}; resume with the same command"
            in capsys.readouterr().out)
    assert [m["step"] for m in train_metrics(tmp_path / "split") if m.get("checkpoint")] == [2]

    monkeypatch.undo()  # no signal this time
    resumed = run(train_images, tmp_path / "split", *SHORT)
    assert resumed["step"] == 4 and "preempted" not in resumed
    whole, split = step_logs(tmp_path / "whole"), step_logs(tmp_path / "split")
    assert sorted(split) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):  # the discriminator joins at step 3 (loss.disc_start=3)
        assert split[step]["loss"] == whole[step]["loss"], step
    for name in ("model.safetensors", "ema.safetensors"):  # the same process and threads: bit-identical
        a = load_file(tmp_path / "whole" / "checkpoints" / "step-0000004" / name)
        b = load_file(tmp_path / "split" / "checkpoints" / "step-0000004" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert torch.equal(load_file(tmp_path / "whole" / "final" / "model.safetensors")["decoder.head.weight"],
                       load_file(tmp_path / "split" / "final" / "model.safetensors")["decoder.head.weight"])


@pytest.fixture
def callers_handler():
    """The caller's own handler on SIGTERM and SIGUSR1 while the test runs (pytest's come back after it)."""

    def handler(signum, frame):
        raise AssertionError(f"the caller's handler got {signal.Signals(signum).name} during training")

    saved = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield handler
    for s, previous in saved.items():
        signal.signal(s, previous)


def test_sigusr1_exits_138_a_second_signal_while_saving_is_ignored_and_the_handlers_come_back(
        train_images, tmp_path, capsys, signal_in_step, monkeypatch, callers_handler):
    signal_in_step(signal.SIGUSR1, 0)
    original = trainer.save_training

    def save_with_signal(directory, *args):  # a SIGTERM halfway through writing the checkpoint
        original(directory, *args)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer, "save_training", save_with_signal)
    code = train_main(["experiment=tiny_test", f"data.path={train_images}", f"results_dir={tmp_path / 'run'}",
                       *SHORT])
    assert code == 128 + signal.SIGUSR1 == 138  # the first signal's
    assert checkpoint_steps(tmp_path / "run") == ["step-0000001"]
    step = tmp_path / "run" / "checkpoints" / "step-0000001"
    assert missing_files(step, checkpoint_files(ema=True, discriminator=True)) == []
    assert "stopped by SIGUSR1 at step 1: checkpoint saved to" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is callers_handler
    assert signal.getsignal(signal.SIGUSR1) is callers_handler


SIGNAL_ON_RANK_1 = textwrap.dedent(
    """
    import os, signal, sys
    from stage1.cli.train import main
    from stage1.train.trainer import Trainer
    original = Trainer._train_step
    def step_with_signal(self, batches):
        if self.info.rank == 1 and self.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batches)
    Trainer._train_step = step_with_signal
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow  # spawns processes (torchrun / mp.spawn / a killed writer)
def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(train_images, tmp_path):
    script = tmp_path / "signal_train.py"
    script.write_text(SIGNAL_ON_RANK_1)
    result = torchrun(str(script), "experiment=tiny_test", f"data.path={train_images}",
                      f"results_dir={tmp_path / 'ddp'}", *SHORT, timeout=600, cwd=REPO_ROOT)
    output = result.stdout + result.stderr
    # torchrun reports the first rank to exit (143) and may stop the other before it does: the checkpoint, which
    # needs both ranks in its collectives at the same step, is the proof they agreed.
    assert result.returncode != 0 and "exitcode  : 143" in output, output[-3000:]
    assert "stopped by SIGTERM at step 2: checkpoint saved to" in output
    assert checkpoint_steps(tmp_path / "ddp") == ["step-0000002"]
    checks = [m for m in train_metrics(tmp_path / "ddp") if m.get("checkpoint")]
    assert [c["step"] for c in checks] == [2] and checks[0]["ranks_identical"]


SIGNAL_TO_THE_GROUP = textwrap.dedent(
    """
    import os, subprocess, sys
    from stage1.cli.train import main
    from stage1.train.trainer import Trainer
    original = Trainer._train_step
    def step_with_signal(self, batches):
        if self.step == 1:
            # As SLURM does: to every process of the job, the DataLoader workers too, from another process (torch's
            # workers take a SIGTERM from their parent for a shutdown).
            subprocess.run(["sh", "-c", f"kill -TERM -{os.getpgrp()}"])
        return original(self, batches)
    Trainer._train_step = step_with_signal
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow  # spawns processes (torchrun / mp.spawn / a killed writer)
def test_a_signal_to_every_process_leaves_the_data_loader_workers_serving_until_the_checkpoint(train_images,
                                                                                               tmp_path):
    script = tmp_path / "signal_train.py"
    script.write_text(SIGNAL_TO_THE_GROUP)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, str(script), "experiment=tiny_test", f"data.path={train_images}",
               f"results_dir={tmp_path / 'run'}", "data.num_workers=2", *SHORT]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                            start_new_session=True)  # its own process group, which it signals
    assert result.returncode == 143, result.stdout[-3000:] + result.stderr[-3000:]
    assert "stopped by SIGTERM at step 2: checkpoint saved to" in result.stdout
    assert checkpoint_steps(tmp_path / "run") == ["step-0000002"]
