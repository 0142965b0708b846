"""Measurement helpers shared by the benchmarks: fresh-process runs, peak memory, timing."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable


def rss_mib() -> float:
    """Current resident memory of this process, MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def reset_peak_rss() -> None:
    """Sets the process's RSS high-water mark (hence ru_maxrss) back to its current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(call: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """One warm-up call, then `repeats` timed calls (each must block until done); the peak
    memory above the RSS before the warm-up."""
    baseline = rss_mib()
    reset_peak_rss()
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "times_s": times,
            "peak_mib": peak_rss_mib() - baseline, "baseline_mib": baseline}


def run_child(script: str, *args: str, env: dict[str, str] | None = None,
              timeout: float | None = None) -> Any:
    """Runs `python script args` in a fresh process, with extra environment variables `env`,
    killed after `timeout` seconds (subprocess.TimeoutExpired); returns the JSON it prints
    last. The child's stderr is kept and shown (its last lines) only when it fails."""
    out = subprocess.run([sys.executable, script, *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                         timeout=timeout)
    if out.returncode:
        tail = "\n".join(out.stderr.splitlines()[-20:])
        raise RuntimeError(f"{script} {' '.join(args)[:200]} exited {out.returncode}:\n{tail}")
    return json.loads(out.stdout.splitlines()[-1])


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{names[0]} x {len(names)}" if names else "unknown CPU"


def save_run(args: Any, results: Any) -> None:
    """Writes the command-line arguments and results to args.json, when given."""
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=2) + "\n")
