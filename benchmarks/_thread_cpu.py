"""CPU time of each thread of this process over the measured steps (Linux `/proc`), by thread name.

Between processes pinned to the same cores, the same host ops ran 10-20% slower in the compiled
GNSTrainer process than in the compiled Trainer's (H200 traces of 2026-12-03), and GNSTrainer's
step time varied more from one process to the next. A busy thread of its own (a compile worker,
a spinning OpenMP pool, the autograd engine's device thread) would take cores from the main
thread. This reads each thread's user + system CPU time from `/proc/self/task/<tid>/stat` at the
start and the end of the measured steps: ms of CPU a step per thread name, the main thread apart.
The kernel counts in clock ticks (10 ms on most systems): over 20 steps of ~50 ms that is ~1% of
a step, enough to see a thread that competes, not to time the main thread's ops.
"""

from __future__ import annotations

import os
import threading

_TICK_MS = 1000.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 10.0


def parse_stat(text: str) -> tuple[str, float]:
    """(thread name, user + system CPU ms) from one `/proc/.../stat` line. The name is between the
    first "(" and the last ")" and may hold spaces or parentheses; utime and stime are fields 14
    and 15 of the line (11 and 12 after the name)."""
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return name, (int(fields[11]) + int(fields[12])) * _TICK_MS


def thread_cpu_ms() -> dict[int, tuple[str, float]]:
    """{thread id: (name, CPU ms so far)} for every thread of this process; {} where `/proc` is missing."""
    root = "/proc/self/task"
    if not os.path.isdir(root):
        return {}
    threads = {}
    for tid in os.listdir(root):
        try:
            with open(os.path.join(root, tid, "stat")) as f:
                threads[int(tid)] = parse_stat(f.read())
        except (OSError, ValueError):  # the thread ended between listdir and open
            continue
    return threads


def cpu_per_step(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], steps: int, main_tid: int
) -> dict:
    """CPU ms a step between two `thread_cpu_ms` snapshots: the main thread's, the others' summed by
    thread name (busiest first; threads started in between count from zero), and the thread count."""
    others: dict[str, float] = {}
    main = 0.0
    for tid, (name, ms) in after.items():
        used = (ms - before.get(tid, (name, 0.0))[1]) / steps
        if tid == main_tid:
            main = used
        else:
            others[name] = others.get(name, 0.0) + used
    busiest = dict(sorted(others.items(), key=lambda item: -item[1]))
    return {"main_ms": main, "others_ms": busiest, "threads": len(after)}


def format_cpu(summary: dict, top: int = 3) -> str:
    """One line: main thread and the busiest other threads, CPU ms a step."""
    others = ", ".join(f"{name} {ms:.1f}" for name, ms in list(summary["others_ms"].items())[:top])
    main, threads = summary["main_ms"], summary["threads"]
    return f"thread CPU ms/step: main {main:.1f}; others {others or '-'} ({threads} threads)"


def main_thread_id() -> int:
    """The kernel's id of the calling thread (what `/proc/self/task` lists)."""
    return threading.get_native_id()
