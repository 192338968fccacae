"""A CPU bench that cannot mislead: the threads it used, the load it ran under, and the pairs.

A ratio of two timings on a shared CPU means little alone: another process on the same cores
slows whichever implementation happens to run beside it. So `scripts/bench.py`:

- sets torch's threads to the cores no other process is using (`free_cores`: the CPUs this
  process may run on, less the 1-minute load average, at least 1) and records them;
- runs the pair (HF, Baton) at least 3 times, alternating which goes first, and records the
  load average before and after each pair;
- reports the median of the pairs' ratios and their spread (`pair_summary`), with a warning
  beside the figure when the load exceeded the cores during any pair.
"""

from __future__ import annotations

import math
import os
import statistics


def cores() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> float:
    """The 1-minute load average (runnable processes), 0.0 where the OS does not say."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def free_cores() -> int:
    """Cores left by the other processes now: cores less the load, rounded up, at least 1."""
    return max(1, cores() - math.ceil(load_average() - 0.5))


def pair_ratio(pair: dict) -> float | None:
    """Baton's real tokens/s over HF's in one pair; None when either did not finish."""
    hf, baton = pair.get("hf", {}), pair.get("baton", {})
    if hf.get("oom") or baton.get("oom") or not hf.get("tokens_per_s"):
        return None
    return baton.get("tokens_per_s", 0.0) / hf["tokens_per_s"]


def pair_summary(pairs: list[dict], loads: list[tuple[float, float]], threads: int) -> dict:
    """Median ratio of the pairs, its spread (min, max), and whether the load stayed within
    the cores (`loaded` names the pairs where it did not, with a warning to print)."""
    ratios = [pair_ratio(p) for p in pairs]
    done = [r for r in ratios if r is not None]
    n = cores()
    loaded = [i for i, (before, after) in enumerate(loads) if max(before, after) > n]
    summary = {
        "threads": threads, "cores": n, "pairs": len(pairs), "ratios": ratios,
        "load_before_after": [list(pair) for pair in loads],
        "median_ratio": statistics.median(done) if done else None,
        "spread": [min(done), max(done)] if done else None,
        "loaded_pairs": loaded,
    }
    if loaded:
        summary["warning"] = (
            f"load average above the {n} cores during pair(s) {loaded}: other processes "
            "shared the CPU, so the ratio measures the machine as much as the code")
    return summary


def summary_text(summary: dict) -> str:
    """One line: the median ratio, its spread, threads and load, and the warning if any."""
    if summary["median_ratio"] is None:
        return "no pair finished"
    low, high = summary["spread"]
    loads = ", ".join(f"{a:.1f}->{b:.1f}" for a, b in summary["load_before_after"])
    text = (f"Baton/HF real tokens/s: median {summary['median_ratio']:.2f}x of "
            f"{summary['pairs']} pairs (spread {low:.2f}-{high:.2f}), {summary['threads']} "
            f"thread(s) on {summary['cores']} cores, load {loads}")
    return text + (f"  WARNING: {summary['warning']}" if "warning" in summary else "")
