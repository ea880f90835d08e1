"""The table of loss kinds (fusedmtl.losses.kinds) is the one list: the C++ X-macro, the reference,
the Triton codes, the public API and every shared test agree with it, so that a kind added to the
table and to loss_kinds.h is covered everywhere (or one of these fails)."""

from __future__ import annotations

import inspect
import pathlib
import re

import pytest
import torch

import fusedmtl
import fusedmtl.nn
from fusedmtl.losses import HETEROSCEDASTIC_KINDS, REGRESSION_KINDS, reference
from tests.helpers import ALL_CASES, BACKENDS, CORE_CASES, DEFAULT_CASES

ROOT = pathlib.Path(__file__).resolve().parents[2]
NAMES = [k.name for k in REGRESSION_KINDS]
HETEROSCEDASTIC_NAMES = [k.name for k in HETEROSCEDASTIC_KINDS]


def _x_macro(name: str) -> list[tuple[str, ...]]:
    """The rows of an X-macro list of csrc/losses/loss_kinds.h, as tuples of their arguments."""
    source = (ROOT / "csrc/losses/loss_kinds.h").read_text()
    body = re.search(rf"#define {name}\(X\)((?:.*\\\n)*.*\n)", source).group(1)
    return [
        tuple(a.strip().strip('"') for a in row.split(","))
        for row in re.findall(r"X\(([^)]*)\)", body)
    ]


def test_cpp_list_is_the_table():
    rows = _x_macro("FUSEDMTL_REGRESSION_KINDS")
    assert [(name, int(code)) for _, name, code, *_ in rows] == [
        (k.name, k.code) for k in REGRESSION_KINDS
    ]
    enum_codes = {enum: int(code) for enum, _, code, *_ in rows}
    hetero = _x_macro("FUSEDMTL_HETEROSCEDASTIC_KINDS")
    assert [(name, enum_codes[enum]) for enum, name in hetero] == [
        (k.name, k.code) for k in HETEROSCEDASTIC_KINDS
    ]


def test_ops_parse_exactly_the_table():
    x = torch.zeros(3)
    with pytest.raises(RuntimeError) as error:
        torch.ops.fusedmtl.regression_loss(x, x, "no_such_kind", 1.0, 1)
    assert re.findall(r"'(\w+)'", str(error.value).split("expected one of")[1]) == NAMES
    with pytest.raises(RuntimeError) as error:
        torch.ops.fusedmtl.heteroscedastic_loss(x, x, x, "no_such_kind", 1.0, 1)
    assert (
        re.findall(r"'(\w+)'", str(error.value).split("expected one of")[1])
        == HETEROSCEDASTIC_NAMES
    )
    for k in REGRESSION_KINDS:  # every name parses
        torch.ops.fusedmtl.regression_loss(x, x, k.name, k.default_param or 1.0, 1)
    for k in HETEROSCEDASTIC_KINDS:
        torch.ops.fusedmtl.heteroscedastic_loss(x, x, x, k.name, 1.0, 1)


def test_python_lists_are_the_table():
    assert list(reference.KINDS) == NAMES
    assert list(reference.HETEROSCEDASTIC_KINDS) == HETEROSCEDASTIC_NAMES
    if "triton" in BACKENDS:
        from fusedmtl.losses import triton

        assert triton.KIND_CODES == {k.name: k.code for k in REGRESSION_KINDS}
        assert triton.HETEROSCEDASTIC_CODES == {k.name: k.code for k in HETEROSCEDASTIC_KINDS}


@pytest.mark.parametrize("kind", REGRESSION_KINDS, ids=NAMES)
def test_public_api_of_each_kind(kind):
    """fusedmtl.<function> and fusedmtl.nn.<module> exist, replace torch's, take its defaults."""
    ours, theirs = getattr(fusedmtl, kind.function), kind.torch_function
    assert list(inspect.signature(ours).parameters) == list(inspect.signature(theirs).parameters)
    if kind.param_name is not None:
        default = inspect.signature(theirs).parameters[kind.param_name].default
        assert (
            default
            == kind.default_param
            == inspect.signature(ours).parameters[kind.param_name].default
        )
    module = getattr(fusedmtl.nn, kind.module)
    assert issubclass(module, getattr(torch.nn, kind.module))


def test_every_kind_is_in_the_shared_tests():
    """The shared suites take their cases from the table: each kind, with each of its parameter
    values under test, in ALL_CASES, DEFAULT_CASES and CORE_CASES, and in the opcheck, GPU and
    heteroscedastic suites."""
    for cases in (ALL_CASES, DEFAULT_CASES, CORE_CASES):
        assert {c.op for c in cases} == set(NAMES)
    from test_heteroscedastic import CASES
    from test_losses_gpu import LOSSES
    from test_opcheck import HETEROSCEDASTIC_PARAMS, REGRESSION_PARAMS

    assert {kind for kind, _ in REGRESSION_PARAMS} == set(NAMES)
    assert set(LOSSES) == set(NAMES)
    assert {kind for kind, _ in HETEROSCEDASTIC_PARAMS} == set(HETEROSCEDASTIC_NAMES)
    assert {kind for kind, _ in CASES} == set(HETEROSCEDASTIC_NAMES)
