"""System time and page faults of fine-tuning and extraction, glibc's default allocator policy
against `runtime.keep_freed_memory` (what every defuse process sets at start).

Run: .venv/bin/python bench/bench_allocator.py [--backbone tf_efficientnet_lite0] [--smoke]
Each policy runs in a fresh process (the policy must precede the first allocation): one
fine-tuning epoch of `finetune()` on the default job's ELPV train cells with params.yaml's
settings, then `extract()` of all 2,624 cells with that checkpoint. For each phase it prints
wall, user and system seconds (loader workers included), system share of the CPU time, minor
page faults and peak RSS, then `<what>: <tuned> / <default> = <ratio>` lines. Targets: system
time under 10 % of the CPU time; no loss of speed. --smoke: 24 small JPEGs at 32 px instead
of ELPV: checks the code runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("finetune epoch", "extract")
POLICIES = ("glibc default", "keep_freed_memory")


def _usage() -> dict[str, float]:
    """CPU seconds and minor faults of this process and its reaped children (loader workers)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return {
        "wall": time.perf_counter(),
        "user": me.ru_utime + kids.ru_utime,
        "sys": me.ru_stime + kids.ru_stime,
        "faults": me.ru_minflt + kids.ru_minflt,
    }


def _child(policy: str, backbone: str, smoke: bool) -> None:
    """One policy's run; prints one JSON line {phase: usage delta}."""
    from pipeline.runtime import keep_freed_memory

    if policy == POLICIES[1] and not keep_freed_memory():
        sys.exit("keep_freed_memory had no effect: this C library is not glibc")
    from _datasets import SMOKE_SIZE, manifest

    from pipeline.config import ExtractParams, finetune_params, section
    from pipeline.extract import extract
    from pipeline.finetune import finetune

    tiny = {"input_size": 32, "batch_size": 8, "num_workers": 0} if smoke else {}
    params = finetune_params(backbone, epochs=1, pretrained=False, device="cpu", **tiny)
    result = {}
    with tempfile.TemporaryDirectory(prefix="bench-allocator-") as tmp:
        data = manifest("jpeg", Path(tmp), 24, SMOKE_SIZE) if smoke else manifest("elpv", Path(tmp))
        runs = (
            lambda: finetune(data, backbone, params, Path(tmp) / "model", progress=False),
            lambda: extract(
                data,
                Path(tmp) / "model",
                Path(tmp) / "features.h5",
                section(ExtractParams, "extract", device="cpu", num_workers=0 if smoke else None),
                progress=False,
            ),
        )
        for phase, run in zip(PHASES, runs, strict=True):
            before = _usage()
            run()
            after = _usage()
            result[phase] = {k: after[k] - before[k] for k in before}
            result[phase]["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--child", choices=POLICIES, help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="tiny images, seconds")
    args = parser.parse_args()
    if args.child:
        return _child(args.child, args.backbone, args.smoke)
    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; {args.backbone}")
    runs = {}
    for policy in POLICIES:
        cmd = [sys.executable, __file__, "--child", policy, "--backbone", args.backbone]
        cmd += ["--smoke"] if args.smoke else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs[policy] = json.loads(out.strip().splitlines()[-1])
        for phase, u in runs[policy].items():
            share = 100 * u["sys"] / (u["user"] + u["sys"])
            print(
                f"{policy:>17} | {phase:<14} | wall {u['wall']:6.1f} s | user {u['user']:6.1f} s"
                f" | sys {u['sys']:6.1f} s ({share:4.1f} %) | minor faults {u['faults']:>10,.0f}"
                f" | peak RSS {u['rss_mb']:5.0f} MB"
            )
    default, tuned = (runs[p] for p in POLICIES)
    for phase in PHASES:
        for key, what in (("wall", "wall s"), ("sys", "system s"), ("faults", "minor faults")):
            a, b = tuned[phase][key], default[phase][key]
            print(f"{phase} {what}: {a:,.1f} / {b:,.1f} = {a / b:.3f}")


if __name__ == "__main__":
    main()
