"""`PatchReport`: what `hf_gns.patch` did, printable as an aligned table.

Every name in a report is a name in the object that was passed to `patch` (for a DDP
wrapper: `module.…`; for a PEFT model: `base_model.model.…`), the same names that
`per_example_sq_norms` uses as keys when called on that object.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PatchedModule:
    """A module whose per-example norms are collected: a norm on the fused op or the per-example
    call, or (`targets="all"`) a Linear / Conv1D / Embedding / experts / Conv1d module, or one using
    its own parameters functionally.

    Args:
        name (`str`): module name.
        class_name (`str`): its class.
        flavour (`str`): how, e.g. `"RMSNorm γ+1 out=input"` (the `NormSpec` label),
            `"768→3072 auto: ghost for T<31, simultaneous for T≥31"`, `"50257×768 rows per example"`;
            ties and shared weights are noted.
        source (`str`): `"registry"` or `"probe"` (norms), `"targets=all"`, or `"earlier call"`
            when a previous `patch` call had patched it already.
        tracked (`tuple[str, ...]`): names of the parameters reported for this module.
        kind (`str`): what it holds, one of `kinds.KINDS`: `"norm"`, `"linear"`, `"embedding"`,
            `"experts"`, `"conv"`, or `"call"` (parameters used functionally, per-example call).
    """

    name: str
    class_name: str
    flavour: str
    source: str
    tracked: tuple[str, ...] = ()
    kind: str = "norm"

    @property
    def method(self) -> str:
        """`flavour`, under the name the all-layer records used."""
        return self.flavour


@dataclass(frozen=True)
class SkippedModule:
    """A module left as it was, with the reason.

    Args:
        name (`str`): module name.
        class_name (`str`): its class.
        reason (`str`): why, e.g. `"2-D weight (4, 8) (per-head weights) not supported: …"`.
        has_parameters (`bool`): whether it has trainable parameters, i.e. is a hole in the
            coverage (`strict=True` refuses those; weightless norms have nothing to track).
    """

    name: str
    class_name: str
    reason: str
    has_parameters: bool


# The names of the records before they were one type (norms and other layers had their own).
PatchedNorm = PatchedLayer = PatchedModule
SkippedNorm = SkippedLayer = SkippedModule


NOT_A_NORM = "not in a norm layer (targets='norms' tracks norm layers only)"


@dataclass(frozen=True)
class UntrackedParameter:
    """A trainable parameter whose per-example norms the patch does not collect (see `coverage.py`).

    Args:
        name (`str`): its name in `model.named_parameters()`.
        numel (`int`): number of elements.
        module (`str`): the module holding it (the first, if several do).
        class_name (`str`): that module's class.
        reason (`str`): why it is not tracked, e.g. `"fused MoE expert weights (8, 64, 32) not supported"`.
    """

    name: str
    numel: int
    module: str
    class_name: str
    reason: str


def _tracked_label(entry: PatchedModule) -> str:
    """ "weight, bias", "weight" or "-": the tracked parameters of a patched module, short."""
    return ", ".join(name.rsplit(".", 1)[-1] for name in entry.tracked) or "-"


@dataclass
class PatchReport:
    """Result of `hf_gns.patch(model)`.

    Attributes:
        patched (`list[PatchedModule]`): norm modules patched (kind `"norm"`).
        skipped (`list[SkippedModule]`): norm-like modules left alone, with the reason.
        tracked_parameters (`list[str]`): parameters whose per-example squared norms are
            collected (patched norms' weights and biases that require grad).
        layers (`list[PatchedModule]`), skipped_layers (`list[SkippedModule]`): the same for the
            other kinds (`targets="all"`).
        untracked (`list[UntrackedParameter]`): every parameter that requires grad and is not
            tracked, with the reason (frozen parameters are not listed).
        trainable_elements (`int`), tracked_elements (`int`): parameter elements that require
            grad, and those of them tracked: the coverage line of the summary.
    """

    patched: list[PatchedModule] = field(default_factory=list)
    skipped: list[SkippedModule] = field(default_factory=list)
    tracked_parameters: list[str] = field(default_factory=list)
    layers: list[PatchedModule] = field(default_factory=list)
    skipped_layers: list[SkippedModule] = field(default_factory=list)
    untracked: list[UntrackedParameter] = field(default_factory=list)
    trainable_elements: int = 0
    tracked_elements: int = 0

    @property
    def modules(self) -> list[PatchedModule]:
        """Every patched module, norms first, each with its `kind`."""
        return [*self.patched, *self.layers]

    def by_kind(self) -> dict[str, list[PatchedModule]]:
        """The patched modules grouped by `kind` (`kinds.KINDS`), norms first, each group in module order."""
        groups: dict[str, list[PatchedModule]] = {}
        for entry in self.modules:
            groups.setdefault(entry.kind, []).append(entry)
        return groups

    def tracked_by_kind(self) -> dict[str, list[str]]:
        """The tracked parameter names grouped by the kind of the module reporting them."""
        return {kind: [n for e in entries for n in e.tracked] for kind, entries in self.by_kind().items()}

    @property
    def uncovered(self) -> list[SkippedModule]:
        """Skipped modules that own parameters: what `strict=True` refuses."""
        return [entry for entry in self.skipped if entry.has_parameters]

    @property
    def uncovered_layers(self) -> list[SkippedModule]:
        """Skipped Linear/Conv1D/Embedding modules with trainable parameters (`targets="all"`)."""
        return [entry for entry in self.skipped_layers if entry.has_parameters]

    @property
    def coverage_holes(self) -> list[UntrackedParameter]:
        """Untracked parameters other than the non-norm ones of `targets="norms"`: what
        `strict=True` refuses under `targets="all"`."""
        return [entry for entry in self.untracked if entry.reason != NOT_A_NORM]

    @property
    def coverage(self) -> float:
        """Fraction of the trainable parameter elements whose per-example norms are collected."""
        return self.tracked_elements / self.trainable_elements if self.trainable_elements else 0.0

    def summary(self) -> str:
        earlier = sum(entry.source == "earlier call" for entry in self.patched)
        line = (
            f"hf_gns.patch: {len(self.patched)} norm modules patched, {len(self.skipped)} skipped, "
            f"{len(self.tracked_parameters)} parameters tracked"
        )
        line += f" ({earlier} patched by an earlier call)" if earlier else ""
        if self.layers or self.skipped_layers:
            counts = ", ".join(f"{len(e)} {kind}" for kind, e in self.by_kind().items() if kind != "norm")
            line += (
                f"; {len(self.layers)} linear/embedding modules patched{f' ({counts})' if counts else ''}, "
                f"{len(self.skipped_layers)} skipped ({len(self.uncovered_layers)} with trainable parameters)"
            )
        if self.trainable_elements:
            untracked = sum(entry.numel for entry in self.untracked)
            line += (
                f"\n  coverage: {self.tracked_elements:,} of {self.trainable_elements:,} trainable parameter "
                f"elements tracked ({self.coverage:.1%}); {len(self.untracked)} parameters "
                f"({untracked:,} elements) untracked"
            )
        return line

    def __str__(self) -> str:
        rows = []
        for patched, skipped in ((self.patched, self.skipped), (self.layers, self.skipped_layers)):
            rows += [
                ("patched", e.name or "<root>", e.class_name, _tracked_label(e), f"{e.flavour} [{e.source}]")
                for e in patched
            ]
            rows += [("skipped", e.name or "<root>", e.class_name, "-", e.reason) for e in skipped]
        skipped = {e.name for e in [*self.skipped, *self.skipped_layers]}  # their rows give the reason
        rows += [
            ("untracked", e.name, e.class_name, "-", e.reason)
            for e in self.coverage_holes
            if e.module not in skipped
        ]
        lines = [self.summary()]
        if rows:
            header = ("status", "module", "class", "tracked", "flavour [found by] / reason")
            widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
            for row in [header, *rows]:
                cells = "  ".join(cell.ljust(width) for cell, width in zip(row, widths))
                lines.append(f"  {cells}  {row[4]}")
        if self.patched and not self.tracked_parameters:
            lines.append(
                "  no parameter is tracked: every patched norm's weight and bias are frozen "
                "(requires_grad=False, as under LoRA); per_example_sq_norms will be empty"
            )
        return "\n".join(lines)
