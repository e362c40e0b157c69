"""PatchReport: contents and the printed table."""

from __future__ import annotations

from patching_tiny_models import tiny_model

import hf_gns
from hf_gns.patching.report import PatchedNorm, PatchReport, SkippedNorm


def test_report_of_a_model_with_unsupported_norms():
    report = hf_gns.patch(tiny_model("cohere"))
    assert [e.name for e in report.patched] == [
        "model.layers.0.input_layernorm",
        "model.layers.1.input_layernorm",
        "model.norm",
    ]
    assert {e.class_name for e in report.patched + report.skipped} == {"CohereLayerNorm"}
    assert all(e.source == "registry" and e.flavour == "LayerNorm out=input" for e in report.patched)
    assert report.tracked_parameters == [f"{e.name}.weight" for e in report.patched]
    assert report.uncovered == report.skipped and len(report.skipped) == 4


def test_printed_table_is_aligned_and_complete():
    report = PatchReport(
        patched=[
            PatchedNorm(
                "a.norm", "LayerNorm", "LayerNorm out=input", "registry", ("a.norm.weight", "a.norm.bias")
            )
        ],
        skipped=[SkippedNorm("a.long_module_name.q_norm", "CohereLayerNorm", "2-D weight (4, 8) …", True)],
        tracked_parameters=["a.norm.weight", "a.norm.bias"],
    )
    lines = str(report).splitlines()
    assert lines[0] == "hf_gns.patch: 1 norm modules patched, 1 skipped, 2 parameters tracked"
    header, patched, skipped = lines[1:]
    for column in ("module", "class", "tracked", "flavour"):
        start = header.index(column)
        assert patched[start - 1] == " " and skipped[start - 1] == " ", column
        assert patched[start] != " " and skipped[start] != " ", column
    assert patched.split()[:4] == ["patched", "a.norm", "LayerNorm", "weight,"]
    assert patched.endswith("LayerNorm out=input [registry]")
    assert skipped.endswith("2-D weight (4, 8) …")


def test_empty_report_prints_its_summary():
    assert str(PatchReport()) == "hf_gns.patch: 0 norm modules patched, 0 skipped, 0 parameters tracked"
