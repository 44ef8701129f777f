"""Only the wire protocol (shared/protocol.py) names a part or an LLM-step tensor. Checked on
the source, like the import direction: a bare ``"delta"`` or ``"inputs_embeds"`` elsewhere is
a second spelling of the protocol that the two sides could let drift apart."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "shared" / "protocol.py"
PACKAGES = ("shared", "edge", "cloud", "fednano", "benchmarks")
# The same words meaning something else, each with what it means there.
OTHER_MEANINGS = {
    ("edge/trainer.py", "global"): "a fisher_point value: the Fisher at the global adapter",
    ("cloud/strategies/fisher_global.py", "global"): "the fisher_point the strategy asks for",
    ("shared/codec.py", "tensors"): "frame_info's key for a frame's tensor list",
    ("shared/codec.py", "frame"): "an error message naming the whole frame, not a part",
    ("shared/merge.py", "delta"): "the name of the merge's inputs in its error messages",
    ("benchmarks/aggregation.py", "delta"): "the same error-message name, old accumulator",
    ("benchmarks/aggregation.py", "fisher"): "the same error-message name, old accumulator",
}


def protocol_names() -> set[str]:
    """Every string constant shared/protocol.py defines at module level (parts, tensors)."""
    names = set()
    for node in ast.parse(PROTOCOL.read_text()).body:
        value = node.value if isinstance(node, ast.AnnAssign | ast.Assign) else None
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            names.add(value.value)
    return names


def bare_names(path: Path, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of each string literal in ``path`` equal to one of ``names``, except the
    values of ``Literal[...]`` types (a type's allowed values, not a use of the name)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    in_literal = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.Subscript) and _is_literal(node.value)
        for inner in ast.walk(node.slice)
    }
    return sorted(
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and node.value in names and id(node) not in in_literal
    )


def _is_literal(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id == "Literal") or (
        isinstance(node, ast.Attribute) and node.attr == "Literal")


def offences() -> dict[str, list[tuple[int, str]]]:
    names = protocol_names()
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == PROTOCOL:
                continue
            relative = path.relative_to(ROOT).as_posix()
            hits = [(line, name) for line, name in bare_names(path, names)
                    if (relative, name) not in OTHER_MEANINGS]
            if hits:
                found[relative] = hits
    return found


def test_protocol_defines_the_part_and_tensor_names() -> None:
    assert {"global", "delta", "fisher", "tensors", "inputs_embeds", "attention_mask", "labels",
            "input_grads", "sample_losses", "logprobs"} <= protocol_names()


def test_no_bare_part_or_tensor_name_outside_the_protocol() -> None:
    assert offences() == {}, "use the constants of shared/protocol.py"


@pytest.mark.parametrize(("relative", "name"), sorted(OTHER_MEANINGS))
def test_every_other_meaning_is_still_there(relative: str, name: str) -> None:
    # An exemption whose literal is gone would silently allow the next bare part name there.
    assert any(hit == name for _, hit in bare_names(ROOT / relative, {name}))


def test_checker_sees_a_violation_and_spares_literal_types(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from typing import Literal\n"
                   "point: Literal['local', 'global'] = 'local'\n"
                   "parts = {'delta': b''}\n"
                   "frame = parts['delta']\n")
    assert bare_names(bad, protocol_names()) == [(3, "delta"), (4, "delta")]
