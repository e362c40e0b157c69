"""Ctrl-C that saves: stop at the next optimizer step with a checkpoint instead of losing the last steps.

`SaveOnInterruptCallback` installs a SIGINT handler while `Trainer.train` runs. The first Ctrl-C
prints one line and sets a flag; at the end of the current optimizer step the callback asks the
Trainer to save a checkpoint (`hf_gns_state.pt` included) and stop. A second Ctrl-C raises
`KeyboardInterrupt` at once (abort without saving). After training, `interrupted` tells the caller
that the run stopped early (the recipe then exits with one line instead of evaluating).

With several processes every one gets the signal (a terminal sends it to the whole process
group, torchrun forwards it), but not necessarily during the same step: the processes agree on
the flag with one all-reduce of a single int per step on a gloo group (host memory, no device
sync), so all of them save and stop at the same step.

Example:
```python
>>> interrupt = SaveOnInterruptCallback()
>>> trainer = GNSTrainer(..., callbacks=[interrupt])
>>> trainer.train()
>>> if interrupt.interrupted: print(f"stopped at step {trainer.state.global_step}, checkpoint saved")
```
"""

from __future__ import annotations

import signal
import sys
import threading

import torch
from transformers import TrainerCallback


class SaveOnInterruptCallback(TrainerCallback):
    """First SIGINT: save a checkpoint at the end of the current optimizer step and stop; second: abort.

    Args:
        message (`str`, *optional*): the line printed (to stderr, by the main process) on the first Ctrl-C.
    """

    def __init__(self, message: str | None = None):
        self.message = message or (
            "interrupted: saving a checkpoint after this optimizer step, then stopping "
            "(Ctrl-C again to abort)"
        )
        self.requested = False  # this process got a Ctrl-C
        self.interrupted = False  # training stopped because of one (all processes agree)
        self._previous_handler = None
        self._group = None

    # ---- the signal ----

    def _on_sigint(self, signum, frame) -> None:
        if self.requested:  # the second one: abort now
            raise KeyboardInterrupt
        self.requested = True
        if self._is_main:
            print(f"\n{self.message}", file=sys.stderr, flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self.requested = self.interrupted = False
        self._is_main = state.is_world_process_zero
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every process reaches on_train_begin: a collective call, in the same order on all.
            self._group = torch.distributed.new_group(backend="gloo")

    def on_train_end(self, args, state, control, **kwargs):
        self._restore_handler()

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    # ---- the step ----

    def _agreed(self) -> bool:
        if self._group is None:
            return self.requested
        flag = torch.tensor([int(self.requested)], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed():
            self.interrupted = True
            control.should_save = True
            control.should_training_stop = True
        return control
