"""Extra state saved in every Trainer checkpoint (`hf_gns_state.pt`) and restored on resume.

`GNSTrainer` registers its estimator and counters here; other parts (the batch-size
controller, the data position) register theirs through `GNSTrainer.register_checkpoint_state`.
Registered states must be global (the same on every process): process 0 writes the file.
States are plain tensors / numbers / strings / lists / dicts, so the file loads with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os

import torch

STATE_FILE = "hf_gns_state.pt"


class CheckpointStateRegistry:
    """Named objects with `state_dict()` / `load_state_dict()` saved together in one file."""

    def __init__(self):
        self._objects: dict[str, object] = {}

    def register(self, name: str, obj: object) -> None:
        """Add `obj` under `name` (unique) to what every checkpoint saves."""
        if not (
            callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))
        ):
            raise TypeError(
                f"checkpoint state {name!r} must have state_dict() and load_state_dict() methods, "
                f"got {type(obj).__name__}"
            )
        if name in self._objects:
            raise ValueError(f"checkpoint state {name!r} is already registered; pick another name")
        self._objects[name] = obj

    def names(self) -> list[str]:
        return list(self._objects)

    def items(self) -> list[tuple[str, object]]:
        return list(self._objects.items())

    def state_dict(self) -> dict[str, dict]:
        return {name: obj.state_dict() for name, obj in self._objects.items()}

    def save(self, directory: str) -> str:
        """Write the registered states to `directory/hf_gns_state.pt`; returns the path."""
        path = os.path.join(directory, STATE_FILE)
        os.makedirs(directory, exist_ok=True)
        torch.save(self.state_dict(), path)
        return path

    def load(self, directory: str) -> list[str]:
        """Restore every registered state found in `directory/hf_gns_state.pt`.

        Returns:
            `list[str]`: registered names that the file does not hold (left as they are).

        Raises:
            `FileNotFoundError`: the checkpoint has no `hf_gns_state.pt` (it was not written by
            `GNSTrainer`).
        """
        path = os.path.join(directory, STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} does not exist: this checkpoint was not written by GNSTrainer, so the GNS "
                "estimator (and registered states) cannot be restored"
            )
        saved = torch.load(path, map_location="cpu", weights_only=True)
        missing = []
        for name, obj in self._objects.items():
            if name in saved:
                obj.load_state_dict(saved[name])
            else:
                missing.append(name)
        return missing
