"""Memory bound and scaling of the nearest-code search; every case runs in a fresh process.

    python benchmarks/vq_scaling.py [--device cpu|cuda] [--quick]

Row 3: peak extra memory of quantizing N=65536 vectors against K=65536 codes (D=64): target at most 1/8 of
the dense N x K fp32 distance matrix (16 GiB). Measured as the child's peak RSS (CPU) or peak CUDA
allocation over its level just before the search. Then time and memory as K and N grow (D=64).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch
from common import machine, print_table, sync, time_interleaved

GIB = 1 << 30


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(n: int, k: int, d: int, device: str, repeats: int) -> dict:
    from stage1.model.search import nearest_code

    torch.manual_seed(0)
    z = torch.randn(n, d, device=device)
    codebook = torch.randn(k, d, device=device)
    nearest_code(z[:4], codebook)  # threads and allocator warmed up
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = current_rss()
    nearest_code(z, codebook)
    sync(device)
    if device == "cuda":
        extra = torch.cuda.max_memory_allocated() - before
    else:
        # ru_maxrss is a high-water mark since start, so this can only overstate the extra memory.
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    seconds = time_interleaved({"search": lambda: nearest_code(z, codebook)}, repeats=repeats, warmup=0,
                               device=device)["search"]
    return {"extra_bytes": max(extra, 0), "seconds": seconds}


def measure(n: int, k: int, d: int, device: str, repeats: int = 3) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", str(n), str(k), str(d), "--device", device,
               "--repeats", str(repeats)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.device, args.repeats)))
        return
    print(f"machine: {machine()}; device {args.device}")
    n = k = 16384 if args.quick else 65536
    d = 64
    result = measure(n, k, d, args.device, repeats=1)
    dense = n * k * 4
    ratio = result["extra_bytes"] / dense
    print_table(
        "memory bound",
        ["case", "shape", "peak extra memory", "dense N x K fp32", "ratio", "target", "holds"],
        [["3. search memory", f"N={n} K={k} D={d}", f"{result['extra_bytes'] / GIB:.3f} GiB", f"{dense / GIB:.1f} GiB",
          f"{ratio:.4f}", "<= 0.125", "yes" if ratio <= 0.125 else "NO"]],
    )
    sizes = [1024, 4096, 16384] if args.quick else [1024, 4096, 16384, 65536, 262144]
    rows = []
    for sweep, fixed in (("K", 8192), ("N", 8192)):
        for size in sizes:
            n_, k_ = (fixed, size) if sweep == "K" else (size, fixed)
            r = measure(n_, k_, d, args.device, repeats=args.repeats)
            gflop = 2 * n_ * k_ * d / 1e9
            rows.append([f"{sweep} sweep", n_, k_, d, f"{r['seconds'] * 1e3:.1f}", f"{gflop / r['seconds']:.0f}",
                         f"{r['extra_bytes'] / 2**20:.0f}", f"{n_ * k_ * 4 / 2**20:.0f}"])
    print_table("scaling (search only, fp32)",
                ["sweep", "N", "K", "D", "ms", "GFLOP/s", "peak extra MiB", "dense N x K MiB"], rows)


if __name__ == "__main__":
    main()
