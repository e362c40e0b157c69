"""`make train`'s launcher: the launch that really gives the number of processes asked for.

    python recipes/launch.py [accelerate launch options] recipes/train_gpt2.py [recipe options]

- One process (the default on a CPU or one GPU): the recipe itself, no launcher in between, so a
  Ctrl-C reaches the recipe alone (it saves a checkpoint and stops; see hf_gns/trainer/interrupt.py).
- Several processes on a machine without CUDA GPUs: `torch.distributed.run --standalone` with
  `ACCELERATE_USE_CPU=1` (DDP over gloo). `accelerate launch --num_processes 2` starts ONE process
  there (its simple launcher ignores the count), and with `--multi_gpu` two processes that never
  form a data-parallel group (the recipe refuses that launch).
- Anything else (GPUs, a --config_file, other accelerate options): `accelerate launch`, with the
  defaults it would otherwise announce in a six-line notice given explicitly.

Execs the command (replaces this process): no extra process, no extra traceback on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys

# What accelerate launch picks (and prints) when nothing says otherwise, given explicitly.
ACCELERATE_DEFAULTS = {"--num_machines": "1", "--mixed_precision": "no", "--dynamo_backend": "no"}


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch_command(argv: list[str], cuda_devices: int) -> tuple[list[str], dict[str, str]]:
    """(command, environment additions) for `argv` = launcher options, the script, its options."""
    script_at = next((i for i, arg in enumerate(argv) if arg.endswith(".py")), None)
    if script_at is None:
        raise SystemExit("launch.py: error: no training script (a .py file) in the arguments")
    launcher_args, script = argv[:script_at], argv[script_at:]
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--num_processes", "--num-processes", type=int, default=None)
    parser.add_argument("--cpu", action="store_true")
    known, others = parser.parse_known_args(launcher_args)
    processes = known.num_processes if known.num_processes is not None else max(cuda_devices, 1)
    python = sys.executable
    if not others and processes == 1 and (cuda_devices <= 1 or known.num_processes == 1):
        return [python] + script, {}
    if not others and processes > 1 and (cuda_devices == 0 or known.cpu):
        threads = max(1, (os.cpu_count() or 1) // processes)  # and no torchrun notice about it
        command = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        return command + script, {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": str(threads)}
    command = [python, "-m", "accelerate.commands.launch"] + launcher_args
    if "--config_file" not in launcher_args:
        if known.num_processes is None:
            command += ["--num_processes", str(processes)]
        for option, value in ACCELERATE_DEFAULTS.items():
            if option not in launcher_args:
                command += [option, value]
    return command + script, {}


def main() -> None:
    command, env = launch_command(sys.argv[1:], cuda_device_count())
    if env:
        print(f"launch: {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(command[1:])}", flush=True)
    os.execve(command[0], command, {**os.environ, **env})


if __name__ == "__main__":
    main()
