"""benchmarks/bench_compiled_host.py on CPU: both variants compile, time and print; wrappers copied."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_compiled_host.py"


def test_tiny_run_prints_both_rows_and_copies_the_generated_wrappers(tmp_path):
    wrappers = tmp_path / "wrappers"
    command = [sys.executable, str(BENCH), "--tiny", "--variants", "unpatched,norms", "--steps", "2"]
    command += ["--warmup", "1", "--wrappers", str(wrappers), "--cprofile", "5"]
    root = str(BENCH.parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=root, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    cells = [line.split() for line in done.stdout.splitlines()]
    rows = {c[0]: c[1:] for c in cells if c[:1] in (["unpatched"], ["norms"]) and len(c) >= 4}
    assert set(rows) == {"unpatched", "norms"}
    assert all(float(value) > 0 for value in rows["unpatched"][:3] + rows["norms"][:3])
    assert len(rows["norms"]) == 5  # forward, backward, step, and the two differences to unpatched
    for variant in ("unpatched", "norms"):  # --cprofile: the forward launches' top functions
        assert f"=== cProfile of {variant}'s forward launches, 2 steps ===" in done.stdout
    assert "norms: forward" in done.stdout and "(prepare_sinks " in done.stdout
    copied = sorted(p.name for p in wrappers.iterdir())
    assert any(n.startswith("unpatched_") for n in copied) and any(n.startswith("norms_") for n in copied)
    assert all("def call(" in (wrappers / n).read_text() for n in copied)
    censuses = [line.split()[1:] for line in done.stdout.splitlines() if "kernels," in line]
    assert len(censuses) == len(copied)  # one census line per copied wrapper: "N kernels, N extern, ..."
    assert all(int(cells[0]) > 0 and cells[1] == "kernels," for cells in censuses), censuses
