"""Run a notebook once on TransformerLens and once on hooklab, and compare what it produced.

A *notebook* here is a plain function ``notebook(model) -> dict[str, Any]``: the code a
TransformerLens user writes, using only TransformerLens's API on ``model``, returning its results
by name. The same function runs on both models, so any step that would need a change for
hooklab raises, and any number that differs by more than ``ATOL`` is reported with its name.
What the notebook prints is compared too (numbers in it within one unit of the last printed
digit, as printed rounding may differ where the values differ by less than ``ATOL``).
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

ATOL = 1e-4

Notebook = Callable[[Any], dict[str, Any]]


class Run(NamedTuple):
    results: dict[str, Any]
    stdout: str


def run_notebook(notebook: Notebook, model: Any) -> Run:
    """The notebook's results and everything it printed (hooks are cleared before and after,
    so neither a failed run nor a notebook that forgets ``reset_hooks`` leaks into the next)."""
    model.reset_hooks()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            results = notebook(model)
    finally:
        model.reset_hooks()
    return Run(results, out.getvalue())


def assert_parity(notebook: Notebook, tl_model: Any, hooklab_model: Any) -> None:
    """Run ``notebook`` on TransformerLens (the reference) then on hooklab; every difference
    (named by its path in the results) fails the test, all of them listed at once."""
    expected = run_notebook(notebook, tl_model)
    actual = run_notebook(notebook, hooklab_model)
    problems = differences(actual.results, expected.results, notebook.__name__)
    problems += stdout_differences(actual.stdout, expected.stdout)
    assert not problems, f"{notebook.__name__}: {len(problems)} difference(s)\n" + "\n".join(
        problems
    )


def differences(actual: Any, expected: Any, where: str) -> list[str]:
    """Every place where ``actual`` (hooklab) differs from ``expected`` (TransformerLens)."""
    if isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor):
        # A weight is an nn.Parameter in TransformerLens, a plain tensor client-side: both
        # are tensors to the code that reads them.
        return _tensor_differences(actual, expected, where)
    if type(actual) is not type(expected):
        return [f"{where}: type {type(actual).__name__} != {type(expected).__name__}"]
    if isinstance(expected, float):
        both_nan = math.isnan(actual) and math.isnan(expected)
        if both_nan or abs(actual - expected) <= ATOL or actual == expected:
            return []
        return [f"{where}: {actual!r} != {expected!r} (diff {abs(actual - expected):.3g})"]
    if isinstance(expected, dict):
        if list(actual) != list(expected):
            return [f"{where}: keys {list(actual)} != {list(expected)}"]
        return [
            p for key in expected for p in differences(actual[key], expected[key], f"{where}.{key}")
        ]
    if isinstance(expected, list | tuple):
        if len(actual) != len(expected):
            return [f"{where}: length {len(actual)} != {len(expected)}: {actual!r} != {expected!r}"]
        return [
            p
            for i, (a, e) in enumerate(zip(actual, expected, strict=True))
            for p in differences(a, e, f"{where}[{i}]")
        ]
    if isinstance(expected, bool | int | str | bytes | type(None) | torch.dtype):
        return [] if actual == expected else [f"{where}: {actual!r} != {expected!r}"]
    raise TypeError(f"{where}: a notebook result of type {type(expected).__name__}")


def _tensor_differences(actual: torch.Tensor, expected: torch.Tensor, where: str) -> list[str]:
    if actual.shape != expected.shape:
        return [f"{where}: shape {list(actual.shape)} != {list(expected.shape)}"]
    if actual.dtype != expected.dtype:
        return [f"{where}: dtype {actual.dtype} != {expected.dtype}"]
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    if not expected.is_floating_point():
        if torch.equal(actual, expected):
            return []
        return [f"{where}: {(actual != expected).sum().item()} entries differ"]
    actual, expected = actual.double(), expected.double()
    # Masked attention scores are -inf in TransformerLens: the same entries must be infinite.
    infinite = expected.isinf()
    if not torch.equal(actual.isinf(), infinite) or not torch.equal(
        actual[infinite], expected[infinite]
    ):
        return [f"{where}: infinite entries differ"]
    if not torch.equal(actual.isnan(), expected.isnan()):
        return [f"{where}: NaN entries differ"]
    finite = ~infinite & ~expected.isnan()
    if not finite.any():
        return []
    diff = (actual[finite] - expected[finite]).abs().max().item()
    return [] if diff <= ATOL else [f"{where}: max abs diff {diff:.3g} > {ATOL}"]


# A decimal standing alone (not "blocks.0.attn", not a version "3.9.0").
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+\.(\d+)(?:[eE][-+]?\d+)?(?![\w.])")


def stdout_differences(actual: str, expected: str) -> list[str]:
    """What was printed must match: text and integers exactly, decimals within one unit of
    their last printed digit (plus ``ATOL``)."""
    actual_text, expected_text = _NUMBER.split(actual), _NUMBER.split(expected)
    actual_numbers, expected_numbers = _NUMBER.finditer(actual), _NUMBER.finditer(expected)
    # split() interleaves the decimal-digits group; compare only the text between numbers.
    if actual_text[::2] != expected_text[::2]:
        return [f"stdout differs:\n--- hooklab\n{actual}\n--- TransformerLens\n{expected}"]
    problems = []
    for got, want in zip(actual_numbers, expected_numbers, strict=True):
        unit = 10.0 ** -min(len(got.group(1)), len(want.group(1)))
        if abs(float(got.group(0)) - float(want.group(0))) > unit + ATOL:
            problems.append(f"stdout: printed {got.group(0)} != {want.group(0)}")
    return problems
