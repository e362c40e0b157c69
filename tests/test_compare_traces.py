"""benchmarks/compare_traces.py on a hand-built Chrome trace: kernel time, idle gaps, graph calls."""

from __future__ import annotations

import gzip
import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import compare_traces  # noqa: E402


def _trace() -> list[dict]:
    """One step: the main thread (tid 1) runs a compiled graph call launching two kernels 40 µs
    apart; the device runs them for 10 µs each, so it idles 30 µs before the second, whose launch
    sits inside the graph's `aten::mm`."""
    x = dict(ph="X", pid=1)
    return [
        dict(x, cat="user_annotation", name="Optimizer.step#AdamW.step", tid=1, ts=500, dur=10),
        dict(x, cat="cpu_op", name="## Call CompiledFxGraph abc123", tid=1, ts=0, dur=100),
        dict(x, cat="cpu_op", name="triton_poi_fused_add_0", tid=1, ts=5, dur=10),
        dict(x, cat="cuda_driver", name="cuLaunchKernel", tid=1, ts=8, dur=2, args={"correlation": 1}),
        dict(x, cat="cpu_op", name="aten::mm", tid=1, ts=45, dur=20),
        dict(x, cat="cuda_runtime", name="cudaLaunchKernel", tid=1, ts=50, dur=2, args={"correlation": 2}),
        dict(x, cat="kernel", name="triton_poi_fused_add_0", tid=7, ts=20, dur=10, args={"correlation": 1}),
        dict(x, cat="kernel", name="nvjet_gemm", tid=7, ts=60, dur=10, args={"correlation": 2}),
        dict(x, cat="kernel", name="triton_poi_fused_add_3", tid=7, ts=70, dur=4, args={}),
        dict(ph="i", cat="instant", name="marker", tid=1, ts=1),  # not a complete event: ignored
    ]


def test_kernel_time_adds_inductor_numbered_kernels_of_one_kind():
    times = compare_traces.kernel_time(_trace(), steps=1)
    assert times["triton_poi_fused_add"] == (14, 2)
    assert times["nvjet_gemm"] == (10, 1)


def test_idle_gaps_are_charged_to_the_ops_around_the_launch_ending_them():
    idle, contexts = compare_traces.idle_gaps(_trace(), steps=1)
    assert idle == 30
    assert contexts == {"## Call CompiledFxGraph abc123 > aten::mm": (30, 1)}


def test_graph_calls_count_launches_and_the_python_between_them(tmp_path):
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": _trace()}, f)
    events = compare_traces.load_events(str(path))
    assert len(events) == 9
    thread = compare_traces.main_thread(events)
    assert thread == 1
    (call,) = compare_traces.graph_calls(events, thread)
    assert call["graph"] == "abc123"
    assert call["children"] == 2
    assert call["python_ms"] == pytest.approx(0.070)
    assert call["median_between_us"] == 30
    top = compare_traces.top_level_host(events, steps=1)[1]
    assert set(top) == {"## Call CompiledFxGraph abc123", "Optimizer.step#AdamW.step"}


def test_report_prints_the_differences(tmp_path, capsys):
    paths = []
    for name, trace in (("base", _trace()), ("other", _trace()[:-3])):  # other: no gemm, one add
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"traceEvents": trace}))
        paths.append(str(path))
    compare_traces.main([*paths, "--steps", "1"])
    out = capsys.readouterr().out
    assert "kernel time per step: base.json 0.02 ms (3 events), other.json 0.01 ms (1 events)" in out
    assert "   0.010    0.000   -0.010      1       0  nvjet_gemm" in out
    assert "   0.014    0.010   -0.004      2       1  triton_poi_fused_add" in out
    assert "device idle 0.03 ms a step" in out
