"""Shared helpers for the benchmark scripts: timing, peak memory, machine facts, JSON output."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from hyperdas_fast.atomic import publish

# torch 2.13's profiler (kineto) prints two "USDT: ... profiler_start/stop" lines on every
# profiled call, hundreds per benchmark run, between the results. Kineto's levels put those
# above its errors, so only 6 silences them; a failing profile still raises in Python. Set
# KINETO_LOG_LEVEL yourself to see them. (Read when the profiler first starts.)
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    # A copy of the tree without .git (e.g. on a lent GPU machine) names its commit here.
    if os.environ.get("HYPERDAS_FAST_COMMIT"):
        return os.environ["HYPERDAS_FAST_COMMIT"]
    try:
        commit = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, text=True).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, text=True)
        return commit + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info(device: torch.device) -> Dict[str, object]:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = props.name
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
    else:
        info["device_name"] = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        info["device_name"] = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 15,
              max_seconds: float = 10.0) -> Dict[str, float]:
    """Median wall time of fn() in milliseconds (synchronised on CUDA), with the spread."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    started = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - started > max_seconds and len(times) >= 3:
            break
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "repeats": len(times),
    }


def interleaved_median_ms(fns: Dict[str, Callable[[], object]], device: torch.device, warmup: int = 3,
                          repeats: int = 15, max_seconds: float = 20.0) -> Dict[str, Dict[str, float]]:
    """median_ms for several implementations of the same thing, timed side by side.

    Each round calls every implementation once, so a change in machine load (other jobs,
    turbo, cache state) lands on all of them alike and the ratios stay comparable. On the
    CPU the order rotates from round to round, so each implementation gets every slot
    equally often: a call can run slower right after another implementation's than after
    its own (the allocator's state and the caches it is left with). Measured at 4111df8,
    SmolLM2 k=64 forward+backward, fixed order torch, cpp, cpp:per_example, cpp:batched:
    the same cpp path took 1.75 ms in the slot after torch and 1.57 ms in the next one.
    Stops after ``repeats`` rounds, or earlier once ``max_seconds`` have passed and at
    least 3 rounds are done; every implementation gets the same number of rounds.
    """
    if device.type == "cuda":
        return _cuda_interleaved_median_ms(fns, device, warmup, repeats, max_seconds)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: Dict[str, list] = {name: [] for name in fns}
    started = time.perf_counter()
    names = list(fns)
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - started > max_seconds and round_index + 1 >= 3:
            break
    return {
        name: {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t), "repeats": len(t)}
        for name, t in times.items()
    }


# Bytes written before each timed CUDA call to evict the L2 (50 MB on an H100, 60 MB on an
# H200), so a call does not read the previous call's inputs from the cache.
L2_FLUSH_BYTES = 256 * 2**20


def _cuda_graph(fn, device):
    """fn captured as a CUDA graph (after warm-up on a side stream), or None when fn cannot
    be captured (it synchronises with the host, e.g. reads a value with .item())."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    synchronize(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # noqa: BLE001  (capture refused: fall back to eager timing)
        synchronize(device)
        return None
    synchronize(device)
    return graph


def _cuda_event_times(calls, device, repeats, max_seconds, flush):
    """Per-call GPU times (ms) of each zero-argument call, interleaved round by round."""
    events = {name: [] for name in calls}
    started = time.perf_counter()
    for rounds in range(1, repeats + 1):
        for name, call in calls.items():
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            events[name].append((start, end))
        if rounds % 10 == 0:
            synchronize(device)  # bounds the queue; the events keep GPU-side times
            if time.perf_counter() - started > max_seconds and rounds >= 3:
                break
    synchronize(device)
    return {name: [s.elapsed_time(e) for s, e in pairs] for name, pairs in events.items()}


def _cuda_interleaved_median_ms(fns, device, warmup, repeats, max_seconds):
    """GPU time of each call from CUDA events, with the L2 flushed before each call.

    median_ms times a CUDA-graph replay of the call: the kernels alone, without the
    host's launch and Python costs (at these sizes one call's kernels take tens of
    microseconds, less than their launches). eager_median_ms times the plain call, with
    the flush kernel (~60 us) letting the host queue ahead; an implementation whose host
    side is slower than its kernels shows its host time there, which is what a user of
    the eager API sees. A call that cannot be captured is timed eagerly only.
    """
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    eager = _cuda_event_times(fns, device, repeats, max_seconds, flush)
    graphs = {name: _cuda_graph(fn, device) for name, fn in fns.items()}
    captured = {name: g.replay for name, g in graphs.items() if g is not None}
    replayed = _cuda_event_times(captured, device, repeats, max_seconds, flush) if captured else {}
    out = {}
    for name in fns:
        t = replayed.get(name, eager[name])
        out[name] = {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t), "repeats": len(t),
                     "eager_median_ms": statistics.median(eager[name]),
                     "timer": ("cuda graph replay" if name in replayed else "eager") +
                              ", cuda events, L2 flushed before each call"}
    del graphs
    return out


def cuda_copy_bandwidth_gbps(device: torch.device, nbytes: int = 2**30, repeats: int = 20) -> float:
    """Measured ceiling: a device-to-device copy of nbytes, counting bytes read plus written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del src, dst
    return 2 * nbytes / statistics.median(times) / 1e6


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated by torch during one call of fn(), above what was live before.

    CUDA: torch.cuda.max_memory_allocated. CPU: the running sum of the sizes of tensors
    created (and freed) during the call, from the profiler's memory timeline.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return profiled_peak_bytes(fn)


def profiled_peak_bytes(fn: Callable[[], object], tensors_only: bool = False) -> int:
    """Peak bytes allocated on the CPU during one call of fn(), above what was live before,
    from the profiler's memory timeline (every allocation and free).

    tensors_only: count only allocations that back a tensor, not the kernels' own scratch
    (such as the CPU's bf16 GEMM buffers, which have no counterpart in cuBLAS).
    """
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, TensorKey

    # The memory timeline (needs shapes and stacks) lists every tensor allocation and
    # free; count the tensors created during fn() and take the running maximum.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    created = set()
    live = peak = 0
    for _, action, (key, _version), size in prof._memory_profile().timeline:
        if tensors_only and not isinstance(key, TensorKey):
            continue
        if action == Action.CREATE:
            created.add(key)
            live += size
        elif action == Action.DESTROY and key in created:
            live -= size
        peak = max(peak, live)
    return int(peak)


def write_json_atomic(path: Path, payload: Dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    publish(tmp, path)
