"""The quickstart's seconds per step on the CPU with torch's default intra-op threads (one per usable core) and with
training's own choice (train.cpu_threads=null: the idle cores less DataLoader workers, stage1/base/cpu_threads.py),
side by side in one run, on a machine with other work: --load busy processes run beside both (issue 31, point 1).

    python benchmarks/cpu_threads.py                 # --load 2 (a shared 2-core machine), 60 steps a run
    python benchmarks/cpu_threads.py --load 0        # an idle machine: the choice must cost nothing there
    python benchmarks/cpu_threads.py --quick         # smoke run

Each run is `vqrae-train experiment=quickstart` in its own process (so its threads are its own), timed from its
metrics.jsonl (images/s of every logged step after the first), with OMP_NUM_THREADS unset.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

from common import machine, print_table

from stage1.base.cpu_threads import usable_cores

BUSY = "while True: pass"


SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "train_stage1.py")


def seconds_per_step(out: str, steps: int, threads: str, batch: int) -> tuple[float, int]:
    """The quickstart's mean seconds per step, and the intra-op threads the run printed it used."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    command = [sys.executable, SCRIPT, "experiment=quickstart", f"results_dir={out}",
               f"train.steps={steps}", "train.log_every=5", "train.sample_every=null", f"train.ckpt_every={steps}",
               "train.report_reconstructions=false", f"train.cpu_threads={threads}", f"train.batch_size={batch}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"training failed: {done.stderr[-2000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rates = [row["images_per_sec"] for row in map(json.loads, f) if "images_per_sec" in row][1:]
    used = int(re.search(r"threads: (\d+) intra-op", done.stdout).group(1))
    return batch / (sum(rates) / len(rates)), used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", type=int, default=2, help="busy processes beside the runs (other users' work)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--quick", action="store_true", help="smoke run: 11 steps, no load")
    args = parser.parse_args()
    steps, load = (11, 0) if args.quick else (args.steps, args.load)
    cores = usable_cores()
    print(f"{machine()}; {cores} usable core(s); {load} busy process(es) beside each run; quickstart, {steps} steps")
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(load)]
    try:
        rows, results = [], {}
        with tempfile.TemporaryDirectory() as root:
            for name, threads in (("torch's default (one per core)", str(cores)), ("training's choice", "null")):
                results[name], used = seconds_per_step(os.path.join(root, f"run{len(rows)}"), steps, threads, batch=12)
                rows.append([name, threads, used, f"{results[name]:.3f}"])
    finally:
        for process in busy:
            process.kill()
    default, chosen = results.values()
    rows.append(["ratio default / choice", "", "", f"{default / chosen:.2f}x"])
    print_table("quickstart seconds per step on the CPU (lower is better)",
                ["run", "train.cpu_threads", "threads", "s/step"], rows)


if __name__ == "__main__":
    main()
