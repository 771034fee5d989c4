"""Hook functions that cannot be traced run on the client: the server pauses its forward at the
hook point, sends the activation over the callback websocket and continues with the reply.

Each case gives the same function to TransformerLens 3.9 (local) and to the hooklab client:
effects on Python state, printed lines and results must be the same.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from hooklab import hooks
from hooklab.errors import ServerError
from hooklab.function_hooks import HooklabHookNotice

from .e2e_helpers import assert_close
from .e2e_servers import Served, sample_tokens


@pytest.fixture
def callback_server(server: Served) -> Iterator[Served]:
    yield server
    server.model.callback_timeout_s = 300.0


def test_reading_patterns_into_python_state(callback_server: Served) -> None:
    served = callback_server
    tokens = sample_tokens(served.tl, seed=11)
    stores: list[dict[int, torch.Tensor]] = [{}, {}]

    def keep_pattern(store: dict[int, torch.Tensor]) -> Any:
        def hook(pattern: torch.Tensor, hook: Any) -> None:
            store[hook.layer()] = pattern.detach().clone()

        return hook

    is_pattern = lambda name: name.endswith("hook_pattern")  # noqa: E731
    expected = served.tl.run_with_hooks(tokens, fwd_hooks=[(is_pattern, keep_pattern(stores[0]))])
    with pytest.warns(HooklabHookNotice, match="Python state"):
        actual = served.model.run_with_hooks(
            tokens, fwd_hooks=[(is_pattern, keep_pattern(stores[1]))]
        )
    assert_close(actual, expected, "logits")
    assert sorted(stores[1]) == sorted(stores[0]) == list(range(served.tl.cfg.n_layers))
    for layer in stores[0]:
        assert_close(stores[1][layer], stores[0][layer], f"pattern of layer {layer}")


def test_value_branching_and_printing(callback_server: Served) -> None:
    served = callback_server
    tokens = sample_tokens(served.tl, seed=12)

    def halve_if_large(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        print(hook.name, tuple(resid.shape), f"{resid.norm().item() > 0}")
        if resid.norm() > 1.0:
            return resid * 0.5
        return resid

    fwd_hooks = [("blocks.0.hook_resid_post", halve_if_large)]
    outputs = []
    for model in (served.tl, served.model):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), warnings.catch_warnings():
            warnings.simplefilter("ignore", HooklabHookNotice)
            logits = model.run_with_hooks(tokens, fwd_hooks=fwd_hooks)
        outputs.append((logits, printed.getvalue()))
    assert_close(outputs[1][0], outputs[0][0], "logits")
    assert outputs[1][1] == outputs[0][1]


def test_in_place_edit_and_forced_callback_in_generate(callback_server: Served) -> None:
    served = callback_server
    tokens = sample_tokens(served.tl, batch=1, pos=4, seed=13)
    calls = [0, 0]

    def counting_ablation(counter: int) -> Any:
        def hook(z: torch.Tensor, hook: Any) -> None:
            calls[counter] += 1
            z[:, :, 0, :] = 0.0

        return hook

    with served.tl.hooks(fwd_hooks=[("blocks.0.attn.hook_z", counting_ablation(0))]):
        expected = served.tl.generate(tokens, max_new_tokens=4, do_sample=False, verbose=False)
    actual = served.model.generate(
        tokens, max_new_tokens=4, do_sample=False, verbose=False,
        fwd_hooks=[("blocks.0.attn.hook_z", hooks.callback(counting_ablation(1)))],
    )  # fmt: skip
    assert torch.equal(actual, expected)
    assert calls[1] == calls[0]


def test_the_functions_own_exception_is_raised(callback_server: Served) -> None:
    tokens = sample_tokens(callback_server.tl, seed=14)

    class Boom(Exception):
        pass

    def fails(x: torch.Tensor, hook: Any) -> None:
        if x.norm() >= 0:
            raise Boom("from the hook")

    with pytest.raises(Boom, match="from the hook"), pytest.warns(HooklabHookNotice):
        callback_server.model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", fails)])
    # the server is fine afterwards
    assert_close(callback_server.model(tokens), callback_server.tl(tokens), "logits after")


def test_a_callback_timeout_stops_the_forward_and_others_are_not_held(
    callback_server: Served,
) -> None:
    served = callback_server
    tokens = sample_tokens(served.tl, seed=15)
    served.model.callback_timeout_s = 1.5
    released = threading.Event()

    def slow(x: torch.Tensor, hook: Any) -> None:
        released.wait(10)

    started = time.monotonic()
    caller, errors = _call_in_background(served, tokens, slow)
    time.sleep(0.3)  # the forward is now paused on the callback
    # Meanwhile another request runs at once (the paused forward is in the slow lane).
    other = served.model(tokens)
    other_s = time.monotonic() - started
    assert_close(other, served.tl(tokens), "logits of the other request")
    caller.join(15)
    released.set()
    assert other_s < 1.4
    assert len(errors) == 1 and isinstance(errors[0], ServerError)
    assert errors[0].code == "callback_failed" and "did not answer" in errors[0].message


def test_a_disconnect_stops_the_paused_forward(callback_server: Served) -> None:
    served = callback_server
    tokens = sample_tokens(served.tl, seed=16)
    paused = threading.Event()

    def wait_forever(x: torch.Tensor, hook: Any) -> None:
        paused.set()
        time.sleep(20)

    started = time.monotonic()
    caller, errors = _call_in_background(served, tokens, wait_forever)
    assert paused.wait(10)
    served.model._callbacks.close()  # type: ignore[union-attr]  # the notebook's link drops
    caller.join(15)
    assert not caller.is_alive() and time.monotonic() - started < 10
    assert len(errors) == 1 and isinstance(errors[0], ServerError)
    assert errors[0].code == "callback_failed" and "disconnected" in errors[0].message
    # the next callback opens a new session
    seen: list[int] = []
    served.model.run_with_hooks(
        tokens,
        fwd_hooks=[("blocks.0.hook_resid_pre", hooks.callback(lambda x, hook: seen.append(1)))],
    )
    assert seen == [1]


def _call_in_background(
    served: Served, tokens: torch.Tensor, fn: Any
) -> tuple[threading.Thread, list[BaseException]]:
    """run_with_hooks with ``fn`` as a forced callback, in a thread (started); what it raised
    is collected in the list."""
    errors: list[BaseException] = []

    def call() -> None:
        try:
            served.model.run_with_hooks(
                tokens, fwd_hooks=[("blocks.0.hook_resid_pre", hooks.callback(fn))]
            )
        except BaseException as exc:  # collected for the test's assertions
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    return thread, errors
