"""The device-call shell scripts of benchmarks/: they parse, and refuse a wrong part in one line
before running anything (their runs need a GPU; on CPU `BENCH_ARGS="--tiny ..."` smoke-runs them)."""

from __future__ import annotations

import pathlib
import subprocess

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.sh"))


def test_the_scripts_are_found():
    assert {"trainer_record.sh", "compiled_gap.sh", "readme_gpu_numbers.sh"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "args, message",
    [([], "usage: trainer_record.sh 1|2|3"), (["4"], "unknown part 4: 1, 2 or 3")],
)
def test_trainer_record_refuses_a_wrong_part(tmp_path, args, message):
    script = BENCHMARKS / "trainer_record.sh"
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env)
    assert done.returncode != 0
    assert message in done.stderr
    assert not (tmp_path / "table.txt").exists()  # nothing was run
