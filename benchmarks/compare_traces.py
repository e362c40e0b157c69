"""Compare two Chrome traces of the same steps (`bench_trainer.py --profile --trace DIR`): where the
GPU's extra kernel time comes from, where it idles, and what the host's main thread was doing.

The compiled GNSTrainer step on the H200 was ~4 ms slower than the compiled Trainer's (issue 11).
A profile's totals say only that kernel time rose ~2 ms and the GPU was busy 72% against 84% of
the step; this splits both (all numbers per profiled step):

- kernel time by kernel name (a trailing `_<n>` index dropped, so Inductor's numbered kernels of
  one kind add up), largest differences first;
- device idle time: every gap between consecutive device events (kernels, memsets, copies)
  charged to the host call that launched the event ending it, named by the ops enclosing that
  launch (outermost > innermost two) — a gap charged to a compiled graph's `aten::mm` means the
  host was still launching that graph when the device ran dry;
- the host: top-level ops of each thread, and per call of each compiled graph (`## Call
  CompiledFxGraph`) its duration, launches, and the Python time between them (the graph's own
  wrapper code).

    python benchmarks/compare_traces.py base.json.gz other.json.gz [--steps 3] [--rows 25]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics

DEVICE_CATEGORIES = ("kernel", "gpu_memset", "gpu_memcpy")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
HOST_CATEGORIES = ("cpu_op", "user_annotation", "python_function")
GRAPH_CALL = "## Call CompiledFxGraph"


def load_events(path: str) -> list[dict]:
    """Complete ('X') events of a Chrome trace, gzipped or not."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def kernel_name(name: str) -> str:
    """A device event's name without Inductor's trailing index (`triton_poi_fused_add_7` -> `..._add`)."""
    return re.sub(r"_\d+$", "", name)


def kernel_time(events: list[dict], steps: int) -> dict[str, tuple[float, float]]:
    """{kernel name: (µs per step, launches per step)}."""
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") in DEVICE_CATEGORIES:
            name = kernel_name(e["name"])
            total[name] += e["dur"]
            count[name] += 1
    return {name: (total[name] / steps, count[name] / steps) for name in total}


def _enclosing(host_by_thread: dict, thread, ts: float) -> list[dict]:
    """Host events of `thread` whose span contains `ts`, outermost first."""
    spans = [e for e in host_by_thread.get(thread, ()) if e["ts"] <= ts <= e["ts"] + e["dur"]]
    return sorted(spans, key=lambda e: (e["ts"], -e["dur"]))


def idle_gaps(events: list[dict], steps: int, min_gap_us: float = 5.0) -> tuple[float, dict[str, tuple]]:
    """(device idle µs per step, {launch context: (idle µs per step, gaps per step)}): each gap of
    more than `min_gap_us` between device events is charged to the host ops around the launch of
    the event that ends it."""
    device = sorted((e for e in events if e.get("cat") in DEVICE_CATEGORIES), key=lambda e: e["ts"])
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})
    }
    host_by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("cat") in HOST_CATEGORIES:
            host_by_thread[e["tid"]].append(e)
    idle, count = collections.Counter(), collections.Counter()
    if not device:
        return 0.0, {}
    busy_until = device[0]["ts"] + device[0]["dur"]
    for e in device[1:]:
        gap = e["ts"] - busy_until
        busy_until = max(busy_until, e["ts"] + e["dur"])
        if gap <= min_gap_us:
            continue
        launch = launches.get(e.get("args", {}).get("correlation"))
        if launch is None:
            context = "(launch not in trace)"
        else:
            names = [s["name"][:40] for s in _enclosing(host_by_thread, launch["tid"], launch["ts"])]
            kept = names if len(names) <= 3 else names[:1] + names[-2:]  # outermost > innermost two
            context = " > ".join(kept) if names else f"(no op) {launch['name']}"
        idle[context] += gap
        count[context] += 1
    contexts = {k: (idle[k] / steps, count[k] / steps) for k in idle}
    return sum(idle.values()) / steps, contexts


def main_thread(events: list[dict]):
    """The thread that steps the optimizer (the Trainer's loop), else the busiest host thread."""
    for e in events:
        if e.get("cat") in HOST_CATEGORIES and e["name"].startswith("Optimizer.step"):
            return e["tid"]
    busy = collections.Counter(e["tid"] for e in events if e.get("cat") in HOST_CATEGORIES)
    return busy.most_common(1)[0][0] if busy else None


def graph_calls(events: list[dict], thread) -> list[dict]:
    """Per call of a compiled graph on `thread`: ms, launches (direct children), and the ms between
    them (the wrapper's own Python: allocations, views, argument handling)."""
    host = [e for e in events if e.get("cat") in HOST_CATEGORIES and e["tid"] == thread]
    rows = []
    for call in (e for e in host if e["name"].startswith(GRAPH_CALL)):
        start, end = call["ts"], call["ts"] + call["dur"]
        inside = sorted(
            (e for e in host if e is not call and start <= e["ts"] and e["ts"] + e["dur"] <= end),
            key=lambda e: (e["ts"], -e["dur"]),
        )
        children, reach = [], -1.0
        for e in inside:
            if e["ts"] >= reach:
                children.append(e)
                reach = e["ts"] + e["dur"]
        between = [b["ts"] - (a["ts"] + a["dur"]) for a, b in zip(children, children[1:])]
        rows.append(
            {
                "graph": call["name"][len(GRAPH_CALL) :].strip()[:12],
                "ms": call["dur"] / 1e3,
                "children": len(children),
                "python_ms": (call["dur"] - sum(c["dur"] for c in children)) / 1e3,
                "median_between_us": statistics.median(between) if between else 0.0,
            }
        )
    return rows


def top_level_host(events: list[dict], steps: int) -> dict:
    """{thread: {op name: (ms per step, calls per step)}} for ops not inside another op."""
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation"):
            by_thread[e["tid"]].append(e)
    result = {}
    for thread, spans in by_thread.items():
        spans.sort(key=lambda e: (e["ts"], -e["dur"]))
        total, count, reach = collections.Counter(), collections.Counter(), -1.0
        for e in spans:
            if e["ts"] >= reach:
                total[e["name"][:70]] += e["dur"]
                count[e["name"][:70]] += 1
                reach = e["ts"] + e["dur"]
        result[thread] = {k: (total[k] / 1e3 / steps, count[k] / steps) for k in total}
    return result


def report(paths: list[str], steps: int, rows: int) -> None:
    traces = [load_events(p) for p in paths]
    names = [p.rsplit("/", 1)[-1] for p in paths]
    kernels = [kernel_time(t, steps) for t in traces]
    print("kernel time per step: " + ", ".join(
        f"{n} {sum(v[0] for v in k.values()) / 1e3:.2f} ms ({sum(v[1] for v in k.values()):.0f} events)"
        for n, k in zip(names, kernels)
    ))  # fmt: skip
    if len(kernels) == 2:
        base, other = kernels
        keys = sorted(
            set(base) | set(other), key=lambda k: -abs(other.get(k, (0, 0))[0] - base.get(k, (0, 0))[0])
        )
        print(f"\n{'base ms':>8} {'other ms':>8} {'diff':>8} {'n base':>6} {'n other':>7}  kernel")
        for k in keys[:rows]:
            (b, nb), (o, no) = base.get(k, (0.0, 0.0)), other.get(k, (0.0, 0.0))
            print(f"{b / 1e3:8.3f} {o / 1e3:8.3f} {(o - b) / 1e3:+8.3f} {nb:6.0f} {no:7.0f}  {k[:80]}")
    for name, events in zip(names, traces):
        idle, contexts = idle_gaps(events, steps)
        print(
            f"\n== {name}: device idle {idle / 1e3:.2f} ms a step (gaps > 5 µs), "
            "by the launch that ends each gap"
        )
        for context, (us, n) in sorted(contexts.items(), key=lambda kv: -kv[1][0])[:rows]:
            print(f"  {us / 1e3:7.3f} ms {n:6.1f} gaps  {context}")
        thread = main_thread(events)
        print(f"  compiled graph calls on the main thread ({thread}):")
        for row in graph_calls(events, thread):
            print(
                f"    {row['graph']}  {row['ms']:7.2f} ms  {row['children']:4d} launches/ops  "
                f"Python between them {row['python_ms']:6.2f} ms (median {row['median_between_us']:.1f} µs)"
            )
        for tid, ops in top_level_host(events, steps).items():
            total = sum(v[0] for v in ops.values())
            print(f"  host thread {tid}: {total:.2f} ms a step in top-level ops; largest:")
            for op, (ms, n) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:8]:
                print(f"    {ms:8.3f} ms {n:6.1f}/step  {op}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "traces", nargs="+", help="one or two Chrome traces (.json or .json.gz); the first is the base"
    )
    parser.add_argument(
        "--steps", type=int, default=3, help="profiled steps in each trace (per-step numbers)"
    )
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    if len(args.traces) > 2:
        parser.error("give one trace, or two to compare")
    report(args.traces, args.steps, args.rows)


if __name__ == "__main__":
    main()
