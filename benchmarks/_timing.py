"""Timing helpers shared by the benchmark scripts.

- `time_calls_ms` / `median_ms`: eager time of a call, one pair of CUDA events per call.
- `cuda_graph_median_ms` / `profiler_kernel_ms` / `kernel_median_ms`: GPU kernel time,
  without the host's launch overhead.
- `copy_bandwidth`: the device-to-device copy bandwidth that the rooflines use.
- `environment_lines`, `format_table`, `write_json`, `write_csv`: reporting.

Every function takes a `device`. On CPU (the scripts' hidden `--device cpu` smoke path)
CUDA events become `time.perf_counter` and there is no kernel time.
"""

from __future__ import annotations

import csv
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch

KERNEL_TIMERS = ("auto", "graph", "profiler", "none")


def require_device(name: str) -> torch.device:
    """`torch.device(name)`, exiting with a clear message when a CUDA device is asked for but absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (torch.cuda.is_available() is False)")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------ eager time


def time_calls_ms(
    step: Callable[[int], object],
    device: torch.device,
    repeats: int,
    untimed: Callable[[int], None] | None = None,
) -> list[float]:
    """Time `step(i)` for i in range(repeats); returns one duration in ms per call.

    `untimed(i)` runs before each call, outside the timed span (e.g. setting grads to
    None). On CUDA each call sits between two events on the current stream, so a call
    measures GPU time plus whatever time the GPU sat idle waiting for the host's
    launches: eager time. One host-device sync at the end.
    """
    if device.type != "cuda":
        times = []
        for i in range(repeats):
            if untimed is not None:
                untimed(i)
            start = time.perf_counter()
            step(i)
            times.append((time.perf_counter() - start) * 1e3)
        return times
    events = [tuple(torch.cuda.Event(enable_timing=True) for _ in range(2)) for _ in range(repeats)]
    for i, (start, end) in enumerate(events):
        if untimed is not None:
            untimed(i)
        start.record()
        step(i)
        end.record()
    torch.cuda.synchronize(device)  # sync: read the events
    return [start.elapsed_time(end) for start, end in events]


def median_ms(
    step: Callable[[int], object],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    untimed: Callable[[int], None] | None = None,
) -> float:
    """Median of `time_calls_ms` after `warmup` untimed calls."""
    for i in range(warmup):
        if untimed is not None:
            untimed(i)
        step(i)
    synchronize(device)
    return statistics.median(time_calls_ms(step, device, repeats, untimed))


# ----------------------------------------------------------------------- kernel time


def cuda_graph_median_ms(
    steps: Sequence[Callable[[], object]],
    device: torch.device,
    *,
    reset: Callable[[int], None],
    warmup: int,
    repeats: int,
) -> float:
    """Median replay time (ms) of `steps`, each captured in its own CUDA graph.

    `steps[k]` runs on static tensors (input set k); call i replays graph `i % len(steps)`,
    so consecutive replays rotate over the input sets. `reset(k)` runs before every
    warm-up call and before the capture of `steps[k]` (set the grads to None, so that
    backward allocates them instead of accumulating). Warm-up runs on a side stream, as
    the whole-network capture recipe of the PyTorch CUDA-graph docs prescribes; that
    also compiles any Triton kernel before the capture.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for k, step in enumerate(steps):
            for _ in range(3):
                reset(k)
                step()
    torch.cuda.current_stream(device).wait_stream(side)
    graphs = []
    try:
        for k, step in enumerate(steps):
            reset(k)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            graphs.append(graph)
        return median_ms(lambda i: graphs[i % len(graphs)].replay(), device, warmup=warmup, repeats=repeats)
    finally:
        for k in range(len(steps)):
            reset(k)  # drop the grads that live in the graphs' memory pools
        synchronize(device)


def profiler_kernel_ms(
    step: Callable[[int], object],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    untimed: Callable[[int], None] | None = None,
) -> float:
    """Mean GPU time (ms) per call of `step(i)`: the summed durations of the device events
    (kernels, memsets, copies) that torch.profiler records over `repeats` calls."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for i in range(warmup):
        if untimed is not None:
            untimed(i)
        step(i)
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(repeats):
            if untimed is not None:
                untimed(i)
            step(i)
        synchronize(device)
    total_us = sum(evt.time_range.elapsed_us() for evt in prof.events() if evt.device_type == DeviceType.CUDA)
    if total_us == 0:
        raise RuntimeError("torch.profiler recorded no CUDA kernels")
    return total_us / 1e3 / repeats


def kernel_median_ms(
    steps: Sequence[Callable[[], object]],
    device: torch.device,
    *,
    reset: Callable[[int], None],
    warmup: int,
    repeats: int,
    method: str = "auto",
) -> tuple[float | None, str]:
    """GPU kernel time (ms) per call of `steps[i % len(steps)]`, and the method used.

    `method`: "graph" (CUDA-graph replays), "profiler" (sum of kernel durations), "auto"
    (graph, and the profiler where capture fails) or "none". Returns `(None, "none")`
    off CUDA or for "none".
    """
    if method not in KERNEL_TIMERS:
        raise ValueError(f"unknown kernel timer {method!r}; choose one of {KERNEL_TIMERS}")
    if device.type != "cuda" or method == "none":
        return None, "none"
    if method in ("auto", "graph"):
        try:
            return cuda_graph_median_ms(steps, device, reset=reset, warmup=warmup, repeats=repeats), "graph"
        except Exception as err:  # capture of this op failed: say so, then use the profiler
            if method == "graph":
                raise
            print(f"  CUDA-graph capture failed ({type(err).__name__}: {err}); using torch.profiler")
            synchronize(device)

    def untimed(i: int) -> None:
        reset(i % len(steps))

    ms = profiler_kernel_ms(
        lambda i: steps[i % len(steps)](), device, warmup=warmup, repeats=repeats, untimed=untimed
    )
    return ms, "profiler"


# ------------------------------------------------------------------------ bandwidth


def copy_bandwidth(device: torch.device, nbytes: int, *, warmup: int = 3, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s: `nbytes` read plus `nbytes` written per
    copy, over the median copy time."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda i: dst.copy_(src), device, warmup=warmup, repeats=repeats)
    return 2 * nbytes / (ms / 1e3)


def roofline_ms(nbytes: float, bytes_per_s: float) -> float:
    """Time (ms) to move `nbytes` at `bytes_per_s`."""
    return nbytes / bytes_per_s * 1e3


def ratio(value: float | None, baseline: float | None) -> float | None:
    """`value / baseline`, None when either is missing."""
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline


# ------------------------------------------------------------------------ reporting


def environment_info(device: torch.device) -> dict[str, str]:
    """Device name and library versions, for the header and the JSON."""
    info = {"device": str(device), "python": platform.python_version(), "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
    else:
        info["gpu"] = "none (CPU)"
    for module in ("triton", "transformers"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = "not installed"
    return info


def format_environment(info: dict[str, str]) -> str:
    return "  ".join(f"{key} {value}" for key, value in info.items())


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """`format(value, spec) + suffix`, or "-" for a missing value."""
    return "-" if value is None else format(value, spec) + suffix


def fmt_ratio(value: float | None) -> str:
    return fmt(value, ".2f", "x")


def fmt_percent(value: float | None) -> str:
    return fmt(None if value is None else 100 * value, ".0f", "%")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """An aligned text table: the first `left` columns left-aligned, the rest right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(cell).ljust(width) if j < left else str(cell).rjust(width)
            for j, (cell, width) in enumerate(zip(cells, widths))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    print(f"wrote {path}")


def write_csv(path: str, records: Sequence[dict]) -> None:
    if not records:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    print(f"wrote {path}")
