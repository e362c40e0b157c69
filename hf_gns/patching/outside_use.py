"""Tracked parameters that the model also uses outside their module's forward: found, then untracked.

A patched module sees only the uses of its parameters inside its own forward. Models that
reach into another module's weight (`self.dt_proj.weight @ x` in Mamba's mixers,
`causal_conv1d_fn(x, self.conv1d.weight)` in the hybrids, LongCat's
`F.linear(x, self.classifier.weight)`) give that weight gradients the module never sees:
its per-example values would be missing (used only outside) or silently partial (used
both ways). No static walk can tell; the first training forward can.

So `patch` arms a finder on the patched object: during its first eager forward with grad
enabled, a `TorchFunctionMode` looks at the arguments of every torch call, and module
hooks keep the stack of running modules. A tracked parameter passed to a call while none
of the modules holding it is running is used outside. Each such parameter is untracked
before any backward runs (its columns dropped from its module's state, so statistics and
the guard never read them) and moved, in the report `patch` returned, from the tracked
list to `untracked` with the reason, naming the module that used it; `strict=True` raises
instead. The finder then removes itself: later forwards pay nothing. A data-dependent path
taken only later is not seen (the guard still flags a parameter left with no values).
"""

from __future__ import annotations

import logging
import sys

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .model_hook import bump_patch_generation
from .report import PatchReport, UntrackedParameter

logger = logging.getLogger(__name__)

FINDER_ATTRIBUTE = "_hf_gns_outside_use_finder"
# Calls that read a tensor's metadata (properties are `__get__`), not its values: no gradient flows.
METADATA_CALLS = frozenset(
    {"__get__", "size", "dim", "numel", "stride", "is_floating_point", "is_contiguous", "element_size",
     "data_ptr", "__len__", "__repr__", "__format__", "get_device", "is_complex", "nelement", "ndimension"}
)  # fmt: skip


class _UseMode(TorchFunctionMode):
    def __init__(self, finder: OutsideUseFinder):
        super().__init__()
        self.finder = finder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        finder = self.finder
        if getattr(func, "__name__", None) in METADATA_CALLS:
            return func(*args, **kwargs)
        for leaf in tree_flatten((args, kwargs))[0]:
            if isinstance(leaf, torch.Tensor) and id(leaf) in finder.holders and id(leaf) not in finder.found:
                finder.note_use(leaf, func)
        return func(*args, **kwargs)


class OutsideUseFinder:
    """Finds, on the first training forward, tracked parameters used outside their holders' forwards.

    Args:
        model (`nn.Module`): the object given to `patch`.
        states (`list[tuple[nn.Module, object]]`): every patched (module, state) of this patch.
        report (`PatchReport`): the report `patch` returns (updated in place).
        strict (`bool`): raise instead of untracking.
    """

    def __init__(self, model: nn.Module, states: list, report: PatchReport, strict: bool):
        self.report = report
        self.strict = strict
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.module_names = {id(m): n for n, m in model.named_modules()}
        self.holders: dict[int, list[nn.Module]] = {}  # tracked parameter -> patched modules holding it
        self.reporters: dict[int, list[tuple[object, int]]] = {}  # -> (state, column) reporting it
        self.params: dict[int, torch.Tensor] = {}
        for module, state in states:
            for column, param in enumerate(state.reported_parameters(module)):
                if param is not None and param.requires_grad and id(param) in self.names:
                    self.reporters.setdefault(id(param), []).append((state, column))
                    self.params[id(param)] = param
        # holders: the modules holding it, and the one reporting it (a submodule's read by its parent)
        for module, state in states:
            for param in (*module.parameters(recurse=False), *state.reported_parameters(module)):
                holders = self.holders.setdefault(id(param), []) if id(param) in self.reporters else None
                if holders is not None and all(holder is not module for holder in holders):
                    holders.append(module)
        self.stack: list[nn.Module] = []
        self.found: dict[int, str] = {}  # parameter -> who used it
        self.handles: list = []
        self.mode: _UseMode | None = None

    # -- arming -------------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        if not self.holders:
            return
        self.handles = [
            model.register_forward_pre_hook(self._start),
            model.register_forward_hook(self._finish, always_call=True),
        ]
        model.__dict__[FINDER_ATTRIBUTE] = self

    def detach(self, model: nn.Module) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        model.__dict__.pop(FINDER_ATTRIBUTE, None)
        self._stop()

    def __deepcopy__(self, memo):
        # The ids of a copy's parameters differ: a copied model's finder is inert (found nothing to track).
        return OutsideUseFinder(nn.Module(), [], PatchReport(), self.strict)

    def _start(self, model, args) -> None:
        if torch.compiler.is_compiling():  # eager forwards only (a compiled first forward is not checked)
            return
        if self.mode is not None or not self.holders or not torch.is_grad_enabled():
            return
        self.stack = [model]  # its own global pre-hook has run already
        self.global_handles = [
            nn.modules.module.register_module_forward_pre_hook(self._push),
            nn.modules.module.register_module_forward_hook(self._pop, always_call=True),
        ]
        self.mode = _UseMode(self)
        self.mode.__enter__()

    def _stop(self) -> None:
        if self.mode is None:
            return
        self.mode.__exit__(None, None, None)
        self.mode = None
        for handle in self.global_handles:
            handle.remove()

    def _finish(self, model, args, output) -> None:
        if torch.compiler.is_compiling() or self.mode is None:
            return
        self._stop()
        self.detach(model)
        self._untrack()

    def _push(self, module, args) -> None:
        self.stack.append(module)

    def _pop(self, module, args, output) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()

    # -- finding and untracking ---------------------------------------------------------------

    def note_use(self, param: torch.Tensor, func) -> None:
        holders = self.holders[id(param)]
        if any(module is running for running in self.stack for module in holders):
            return
        if _called_by_deepspeed():  # ZeRO-3 gathers and releases parameters in its own module hooks
            return
        user = self.stack[-1] if self.stack else None
        name = self.module_names.get(id(user), "?") if user is not None else "?"
        where = "the patched model" if name == "" else repr(name)
        what = getattr(func, "__name__", str(func))
        self.found[id(param)] = f"{where} ({type(user).__name__}.forward: {what})"

    def _untrack(self) -> None:
        if not self.found:
            return
        lines = []
        for param_id, user in self.found.items():
            name = self.names[param_id]
            holder = self.holders[param_id][0]
            reason = (
                f"used outside its module's forward, by {user}: the module sees only part of its gradient, "
                "not tracked"
            )
            lines.append(f"  {name}: {reason}")
            if self.strict:
                continue
            for state, column in self.reporters[param_id]:
                state.dropped_columns = frozenset({*state.dropped_columns, column})
            self._move_to_untracked(name, self.params[param_id], holder, reason)
        if self.strict:
            raise RuntimeError(
                "hf_gns.patch(strict=True, targets='all'): tracked parameters are used outside their "
                "module's forward (found on the first training forward):\n" + "\n".join(lines)
            )
        bump_patch_generation()
        logger.warning(
            "hf_gns: untracked parameters used outside their module's forward:\n%s", "\n".join(lines)
        )

    def _move_to_untracked(self, name: str, param: torch.Tensor, holder: nn.Module, reason: str) -> None:
        report = self.report
        if name not in report.tracked_parameters:
            return
        report.tracked_parameters[:] = [n for n in report.tracked_parameters if n != name]
        for entries in (report.patched, report.layers):
            entries[:] = [
                type(e)(**{**e.__dict__, "tracked": tuple(t for t in e.tracked if t != name)})
                for e in entries
            ]
        module_name = self.module_names.get(id(holder), "?")
        report.untracked.append(
            UntrackedParameter(name, param.numel(), module_name, type(holder).__name__, reason)
        )
        report.tracked_elements -= param.numel()


def _called_by_deepspeed() -> bool:
    """Whether the torch call being inspected comes straight from DeepSpeed's code (its first caller
    outside torch and this module), not from the model's."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not (module == __name__ or module == "torch" or module.startswith(("torch.", "contextlib"))):
            return module == "deepspeed" or module.startswith("deepspeed.")
        frame = frame.f_back
    return False


def detach_outside_use_finder(model: nn.Module) -> None:
    finder = model.__dict__.get(FINDER_ATTRIBUTE)
    if finder is not None:
        finder.detach(model)
