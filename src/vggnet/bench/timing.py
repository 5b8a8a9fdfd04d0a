"""How the benchmark measures: interleaved rounds, matmul ceilings, peak memory and the machine.

Every comparison that becomes a ratio is timed in one process with the contenders interleaved
round by round (A B, B A, ...) after a warm-up, and each figure is the median of its rounds, so a
neighbour loading the machine slows both sides alike. A ceiling takes the fastest round instead:
a neighbour can only slow a GEMM down.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..runtime import cpu_has_bf16_units, hardware_class

try:
    import resource  # Unix only; elsewhere peak RSS is reported as 0
except ImportError:  # pragma: no cover
    resource = None

__all__ = ["time_interleaved", "median", "matmul_ceiling", "machine_info", "rss_peak_mb", "reset_peaks", "memory",
           "sync"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], Any]], *, budget_s: float, max_reps: int, warmup: int = 1,
                     min_reps: int = 1, device: torch.device = torch.device("cpu")) -> dict[str, list[float]]:
    """Seconds per call of each function: warm each up, then call them in turn, round after round.

    Rounds continue until `budget_s` has passed (at least `min_reps`, at most `max_reps` rounds).
    Interleaving keeps ratios fair when the machine's load changes during the run, and every other
    round runs in reverse order (A B, B A, ...) so that no function always follows the same one.
    On CUDA the device is synchronised around every call, so the times are of finished work.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    names = list(fns)
    for rep in range(max_reps):
        for name in names if rep % 2 == 0 else reversed(names):
            fn = fns[name]
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
        if rep + 1 >= min_reps and time.perf_counter() - start >= budget_s:
            break
    return times


def median(ts: Sequence[float]) -> float:
    return statistics.median(ts)


def matmul_ceiling(dtype: torch.dtype, device: torch.device, *, sizes: Sequence[int], budget_s: float,
                   max_reps: int) -> dict:
    """GFLOP/s of the fastest square `dtype` matmul over `sizes` and repetitions: what the hardware gives a GEMM.

    A ceiling takes the fastest repetition, not the median: a busy neighbour can only slow a GEMM down.
    """
    best = {"gflops": 0.0, "size": None, "median_gflops": 0.0}
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        ts = time_interleaved({"mm": lambda: a @ b}, budget_s=budget_s, max_reps=max_reps, device=device)["mm"]
        gflops = 2 * n ** 3 / min(ts) / 1e9
        if gflops > best["gflops"]:
            best = {"gflops": gflops, "size": n, "median_gflops": 2 * n ** 3 / median(ts) / 1e9}
    return best


def rss_peak_mb(children: bool = False) -> float:
    """Peak resident memory so far (ru_maxrss is KiB on Linux, bytes on macOS); children: the largest child's."""
    if resource is None:
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if platform.system() == "Darwin" else peak / 2 ** 10


def reset_peaks(device: torch.device) -> bool:
    """Start a section's peak memory afresh; False where the OS keeps one peak per process (then peaks accumulate)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the RSS high-water mark
        return True
    except OSError:
        return False


def memory(device: torch.device, per_section: bool) -> dict:
    out = {"rss_peak_mb": round(rss_peak_mb(), 1), "per_section": per_section}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return out


def machine_info(device: torch.device) -> dict:
    """What the figures were measured on: CPU model and cores, GPU, bf16 units, library versions, date."""
    import torchvision

    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:  # pragma: no cover
        ort_version = None
    cpu = platform.machine()  # not platform.processor(): it forks `uname -p` on Linux
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_bf16_units": cpu_has_bf16_units(), "hardware_class": hardware_class(device), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "device": str(device), "torch": torch.__version__, "torchvision": torchvision.__version__, "onnxruntime": ort_version,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        # fp32 rows on CUDA: matmuls are true fp32 unless allow_tf32; cuDNN convs use TF32 by default.
        info["cuda_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        info["cudnn_tf32_conv"] = torch.backends.cudnn.allow_tf32
    return info
