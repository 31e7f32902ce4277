"""Training from the command line (scripts/train_stage1.py, vqrae-train): hydra overrides -> RunConfig -> train().

A bad override, an unknown key or a wrong value is one `error:` line and exit code 2, as for every other command;
`--cfg job` prints the config the run would use, checked, and exits. A run stopped by SIGTERM or SIGUSR1 checkpoints
its step and exits with 128 + the signal's number (143, 138).
"""

from __future__ import annotations

import os
import re
import signal
import sys

from ..model.presets import CONFIG_DIR

USAGE = """usage: {prog} [--cfg job] [experiment=NAME] [KEY=VALUE ...]

Train a VQRAE decoder and its EMA codebook on an image folder or tar shards.

    torchrun --standalone --nproc_per_node=N scripts/train_stage1.py experiment=<name> data.path=<folder> \\
        results_dir=<dir> [KEY=VALUE ...]
    python scripts/train_stage1.py experiment=quickstart          # single process, offline, CPU
    vqrae-train experiment=quickstart                             # the same, installed

Config groups (configs/): encoder, decoder, quantizer, loss, data, experiment; any key can be set, e.g.
train.batch_size=16 loss.disc_start=5000 precision=bf16 noise_tau=0.8. Every key, its type and its default:
stage1/train/config.py, stage1/model/config.py and stage1/train/losses.py, or `--cfg job`, which prints the composed
config and exits."""


def _message(err: BaseException) -> str:
    """The first line of an error and of what caused it (hydra wraps the useful part; said once when the error
    already quotes it), and the choices of a config group hydra could not find an option of."""
    lines = [str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__]
    cause = err.__cause__
    if cause is not None and str(cause).strip() and str(cause).strip().splitlines()[0].rstrip(".") not in lines[0]:
        lines.append(str(cause).strip().splitlines()[0].replace("is not in struct", "is no config key (--cfg job "
                                                                                    "lists them)"))
    message = ": ".join(line.rstrip(".") for line in lines)
    missing = re.search(r"Could not find '(\w+)/([^']*)'", message)
    if missing and os.path.isdir(group := os.path.join(CONFIG_DIR, missing[1])):
        choices = sorted(name[: -len(".yaml")] for name in os.listdir(group) if name.endswith(".yaml"))
        message += f" ({missing[1]}= takes one of: {', '.join(choices)})"
    return message


def main(argv: list[str], prog: str = "train_stage1.py") -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE.format(prog=prog))
        return 0
    show = "--cfg" in argv
    if show:
        at = argv.index("--cfg")
        if at + 1 < len(argv) and argv[at + 1] in ("job", "all", "hydra"):
            if argv[at + 1] != "job":
                print(f"{prog}: error: --cfg {argv[at + 1]}: only the job's config is printed (--cfg job)",
                      file=sys.stderr)
                return 2
            argv = argv[:at + 1] + argv[at + 2:]
        argv = [a for a in argv if a != "--cfg"]
    try:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        from ..train.config import compose_tree, run_config
        from .arguments import report_error
    except ImportError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    try:
        cfg = run_config(compose_tree(argv))
        if show:
            import yaml

            print(yaml.safe_dump(cfg.to_tree(), sort_keys=False), end="")
            return 0
        from transformers.utils import logging as transformers_logging

        from ..train.trainer import train

        transformers_logging.disable_progress_bar()  # its per-load weight bar: noise beside training's own
        summary = train(cfg)
    except (HydraException, OmegaConfBaseException, ValueError, OSError) as err:
        report_error(prog, _message(err), err)  # once per job, not per rank
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    if "preempted" in summary:
        # Checkpointed and stopped early: exit as the signal's default action would (the shell's 128 + N), so
        # schedulers and torchrun see an unfinished job; the same command resumes it.
        return 128 + signal.Signals[summary["preempted"]]
    return 0


def vqrae_train() -> int:
    return main(sys.argv[1:], prog="vqrae-train")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:], prog="python -m stage1.cli.train"))
