"""The comparison itself: a notebook-parity pass must mean the results agree, so each kind of
difference the harness claims to catch is shown to be caught (no server needed)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from .parity import assert_parity, differences, stdout_differences


@pytest.mark.parametrize(
    ("actual", "expected"),
    [
        (torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.001])),
        (torch.ones(2, 3), torch.ones(3, 2)),
        (torch.ones(2), torch.ones(2, dtype=torch.float64)),
        (torch.tensor([1, 2]), torch.tensor([1, 3])),
        (torch.tensor([float("-inf"), 0.0]), torch.tensor([0.0, 0.0])),
        (0.5, 0.5002),
        (3, 4),
        (True, False),
        (1, 1.0),
        (["a", "b"], ["a", "c"]),
        (["a"], ("a",)),
        ([1.0], [1.0, 2.0]),
        ({"x": 1}, {"y": 1}),
        ({"x": [torch.zeros(1)]}, {"x": [torch.ones(1)]}),
    ],
)
def test_a_difference_is_reported(actual: Any, expected: Any) -> None:
    assert differences(actual, expected, "r")


def test_what_agrees_within_the_tolerance_passes() -> None:
    masked = torch.tensor([float("-inf"), 1.0])
    results = {
        "t": torch.tensor([1.0, 2.0]),
        "masked": masked,
        "f": 0.25,
        "nested": [("a", 3), {"k": None}],
        "weight": torch.nn.Parameter(torch.ones(2)),
    }
    close = {
        "t": torch.tensor([1.00005, 2.0]),
        "masked": masked.clone(),
        "f": 0.25009,
        "nested": [("a", 3), {"k": None}],
        "weight": torch.ones(2),  # a plain tensor where TransformerLens has a Parameter
    }
    assert differences(close, results, "r") == []


def test_printed_numbers_within_their_last_digit_and_text_exactly() -> None:
    assert (
        stdout_differences("loss 1.235 at blocks.0.attn\n", "loss 1.234 at blocks.0.attn\n") == []
    )
    assert stdout_differences("loss 1.237\n", "loss 1.234\n")
    assert stdout_differences("blocks.1.attn 1.0\n", "blocks.0.attn 1.0\n")
    assert stdout_differences("torch.Size([1, 4])\n", "torch.Size([1, 5])\n")
    assert stdout_differences("extra\n", "")


def test_a_step_that_raises_fails_the_section() -> None:
    class Reference:
        def reset_hooks(self) -> None:
            pass

        def value(self) -> int:
            return 1

    class Missing(Reference):
        def value(self) -> int:
            raise NotImplementedError("no such step")

    def notebook(model: Any) -> dict[str, Any]:
        return {"value": model.value()}

    assert_parity(notebook, Reference(), Reference())
    with pytest.raises(NotImplementedError):
        assert_parity(notebook, Reference(), Missing())
