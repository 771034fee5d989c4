"""Continuous batching (``engine.decode_pool``): generations that share decode steps each equal
their solo ``generate`` (tokens exactly, step logits within 1e-5 in fp32) and TransformerLens 3.9's
``generate``; their hooks see only their own rows, with their solo shapes.

References are the engine's own solo ``generate`` with a KV cache (itself checked against TL and
Hugging Face in ``test_generate.py``) and TL 3.9, never the pool's own output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_helpers import TEXTS, assert_close, left_padded_batch, our_model, prompt_ids, tl_model

from fixtures.checkpoints import build_checkpoint
from hooklab_server.engine import load_model
from hooklab_server.engine.decode_pool import DecodePool, PoolFull, RowGroup
from hooklab_server.engine.generation import (
    GenerationState,
    SamplingParams,
    StoppingParams,
    prompt_tokens,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

Hooks = list[tuple[Any, Callable[..., Any]]]
GREEDY = SamplingParams(do_sample=False)


# ---- hooks -------------------------------------------------------------------------------------


def steer(seed: int, size: float = 4.0) -> Callable[..., torch.Tensor]:
    def fn(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        vector = torch.randn(resid.shape[-1], generator=torch.Generator().manual_seed(seed))
        return resid + size * vector.to(resid.dtype)

    return fn


def zero_head(head: int) -> Callable[..., None]:
    def fn(z: torch.Tensor, hook: Any) -> None:
        z[:, :, head] = 0.0  # in place

    return fn


def batch_mean(x: torch.Tensor, hook: Any) -> torch.Tensor:
    """Couples the rows of one request: over the pool it must see only that request's rows."""
    return x.mean(0, keepdim=True).expand_as(x)


def sharpen_pattern(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
    return pattern * torch.linspace(0.5, 1.5, pattern.shape[-1])


def scale_rot_k(k: torch.Tensor, hook: Any) -> None:
    k.mul_(1.5)  # in place: this step only (TL caches keys before rotary)


ROT_K = (lambda name: name.endswith("attn.hook_rot_k"), scale_rot_k)  # none in GPT-2


# ---- requests, the pooled loop and the solo reference ------------------------------------------


@dataclass
class Request:
    tokens: torch.Tensor  # [batch, pos]
    mask: torch.Tensor | None = None
    hooks: Hooks = field(default_factory=list)
    max_new: int = 8
    join_at: int = 0  # the earliest step it may join (it waits while rows are short)
    cancel_after: int | None = None  # leaves after this many tokens


@dataclass
class Outcome:
    tokens: torch.Tensor  # [batch, new]
    logits: list[torch.Tensor]  # each step's [batch, d_vocab], the prefill's first


def run_pooled(
    model: Any,
    requests: Sequence[Request],
    max_rows: int,
    max_positions: int = 64,
    on_step: Callable[[DecodePool, dict[RowGroup, int]], None] | None = None,
) -> list[Outcome]:
    """A scheduler in miniature: join when due and rows are free, one step for all, leave when
    done or cancelled. ``on_step`` sees the pool and which request each group is, before a step."""
    pool = DecodePool(model, max_rows, max_positions)
    waiting = sorted(range(len(requests)), key=lambda i: requests[i].join_at)
    running: dict[RowGroup, int] = {}
    states: dict[int, GenerationState] = {}
    logits: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(requests))}
    next_tokens: dict[RowGroup, torch.Tensor] = {}
    tick = 0

    def take(group: RowGroup, step_logits: torch.Tensor) -> None:
        i = running[group]
        logits[i].append(step_logits.clone())
        next_tokens[group] = states[i].choose(step_logits)

    while waiting or running:
        while waiting and requests[waiting[0]].join_at <= tick:
            request = requests[waiting[0]]
            if request.tokens.shape[0] > pool.free_rows:
                break
            i = waiting.pop(0)
            group, first = pool.join(request.tokens, request.mask, request.hooks)
            running[group] = i
            stopping = StoppingParams(request.max_new, stop_at_eos=False)
            states[i] = GenerationState(model, request.tokens, GREEDY, stopping)
            take(group, first)
        for group, i in list(running.items()):
            cancelled = requests[i].cancel_after is not None
            if states[i].done or (cancelled and states[i].steps >= requests[i].cancel_after):
                pool.leave(group)
                del running[group], next_tokens[group]
        if running:
            if on_step is not None:
                on_step(pool, running)
            for group, step_logits in pool.step(next_tokens).items():
                take(group, step_logits)
        tick += 1
    assert pool.active_rows == 0 and pool.free_rows == max_rows
    return [
        Outcome(states[i].tokens[:, request.tokens.shape[1] :], logits[i])
        for i, request in enumerate(requests)
    ]


def run_solo(model: Any, request: Request) -> Outcome:
    """The request alone through ``generate`` (KV cache), recording each step's last logits."""
    logits: list[torch.Tensor] = []

    def record(x: torch.Tensor, hook: Any) -> None:
        logits.append(x[:, -1].clone())

    out = model.generate(
        request.tokens, attention_mask=request.mask, max_new_tokens=request.max_new,
        do_sample=False, stop_at_eos=False, use_past_kv_cache=True,
        fwd_hooks=[*request.hooks, ("unembed.hook_out", record)],
    )  # fmt: skip
    return Outcome(out[:, request.tokens.shape[1] :], logits)


def assert_equals_solo(model: Any, requests: Sequence[Request], outcomes: list[Outcome]) -> None:
    for i, (request, pooled) in enumerate(zip(requests, outcomes, strict=True)):
        solo = run_solo(model, request)
        steps = len(pooled.logits)
        assert steps == (request.cancel_after or request.max_new), f"request {i}: {steps} steps"
        assert torch.equal(pooled.tokens, solo.tokens[:, :steps]), (
            f"request {i}:\n  pooled {pooled.tokens.tolist()}\n  solo   {solo.tokens.tolist()}"
        )
        for step, (ours, ref) in enumerate(zip(pooled.logits, solo.logits, strict=False)):
            atol = 1e-5 * max(1.0, float(ref.abs().max()))
            assert_close(ours, ref, f"request {i} step {step} logits", atol=atol)


def one(checkpoint: Path, text: int, length: int) -> torch.Tensor:
    return torch.tensor([prompt_ids(checkpoint, text, length)])


def six_requests(checkpoint: Path) -> list[Request]:
    """Different prompt lengths (one left-padded pair), lengths, hooks and join times."""
    padded, mask, _ = left_padded_batch(checkpoint, (12, 7))
    ablate_and_mix = [("blocks.1.attn.hook_z", zero_head(1)), ("blocks.0.hook_mlp_out", batch_mean)]
    steer_and_pattern = [
        ("blocks.1.hook_resid_pre", steer(2)),
        ("blocks.0.attn.hook_pattern", sharpen_pattern),
    ]
    return [
        Request(one(checkpoint, 0, 9), max_new=12),
        Request(one(checkpoint, 1, 4), hooks=[("blocks.0.hook_resid_post", steer(1))], max_new=7),
        Request(padded, mask, hooks=ablate_and_mix, max_new=10, join_at=2),
        Request(
            one(checkpoint, 0, 6),
            hooks=[("blocks.0.attn.hook_z", zero_head(0))],
            max_new=5,
            join_at=3,
        ),
        Request(one(checkpoint, 1, 11), hooks=steer_and_pattern, max_new=9, join_at=5),
        Request(one(checkpoint, 2, 3), hooks=[ROT_K], max_new=6, join_at=6),
        Request(
            one(checkpoint, 1, 8),
            hooks=[("blocks.1.hook_resid_post", steer(3))],
            max_new=20,
            join_at=1,
            cancel_after=4,
        ),
    ]


# ---- tests -------------------------------------------------------------------------------------


def test_staggered_generations_equal_solo(any_checkpoint: Path) -> None:
    """Six requests plus a cancelled one join at staggered steps (some wait for rows freed by
    others) and leave when done; each equals its solo ``generate``."""
    model = our_model(any_checkpoint)
    requests = six_requests(any_checkpoint)
    widths: list[int] = []
    outcomes = run_pooled(model, requests, max_rows=5, on_step=lambda p, r: widths.append(len(r)))
    assert max(widths) >= 4 and widths != sorted(widths), "the schedule overlaps and shrinks"
    assert_equals_solo(model, requests, outcomes)


def test_a_group_leaving_midway_frees_its_rows(any_checkpoint: Path) -> None:
    """The middle group leaves after three steps: the later rows move up, the others go on
    equal to solo, and a newcomer reuses the freed rows (with longer histories left behind)."""
    model = our_model(any_checkpoint)
    padded, mask, _ = left_padded_batch(any_checkpoint, (12, 7))
    a = Request(
        one(any_checkpoint, 0, 5), hooks=[("blocks.0.hook_resid_post", steer(4))], max_new=9
    )
    b = Request(padded, mask, [("blocks.1.attn.hook_z", zero_head(2))], max_new=12)
    c = Request(one(any_checkpoint, 1, 9), max_new=9)
    d = Request(one(any_checkpoint, 2, 3), hooks=[ROT_K], max_new=6)
    pool = DecodePool(model, max_rows=4, max_positions=32)
    groups, states, new = [], [], []
    for request in (a, b, c):
        group, logits = pool.join(request.tokens, request.mask, request.hooks)
        stopping = StoppingParams(request.max_new, stop_at_eos=False)
        states.append(GenerationState(model, request.tokens, GREEDY, stopping))
        groups.append(group)
        new.append(states[-1].choose(logits))
    with pytest.raises(PoolFull):
        pool.join(d.tokens)
    for step in range(8):
        if step == 3:
            pool.leave(groups[1])
            assert (pool.active_rows, pool.free_rows) == (2, 2)
            assert (groups[0].rows, groups[2].rows) == (slice(0, 1), slice(1, 2))
            group, logits = pool.join(d.tokens, d.mask, d.hooks)
            assert group.rows == slice(2, 3)
            states.append(GenerationState(model, d.tokens, GREEDY, StoppingParams(6, False)))
            groups.append(group)
            new.append(states[-1].choose(logits))
        live = [i for i in range(len(groups)) if i != 1 or step < 3]
        live = [i for i in live if not states[i].done]
        out = pool.step({groups[i]: new[i] for i in live})
        for i in live:
            new[i] = states[i].choose(out[groups[i]])
    for i, request in zip((0, 2, 3), (a, c, d), strict=True):
        solo = run_solo(model, request).tokens
        pooled = states[i].tokens[:, request.tokens.shape[1] :]
        assert torch.equal(pooled, solo[:, : pooled.shape[1]]), f"group {i}"
    b_tokens = states[1].tokens[:, padded.shape[1] :]
    assert torch.equal(b_tokens, run_solo(model, b).tokens[:, :4]), "b before it left"


def test_hooks_never_touch_other_rows(any_checkpoint: Path) -> None:
    """Switching one request's hooks on and off (steering, a changed pattern, scaled rotated
    keys) leaves every other request's logits bit for bit the same, step by step."""
    model = our_model(any_checkpoint)
    requests = six_requests(any_checkpoint)
    target = 3  # joins at step 3, shares steps with all others
    hooks: Hooks = [
        ("blocks.0.hook_resid_pre", steer(9, 8.0)),
        ("blocks.1.attn.hook_pattern", sharpen_pattern),
        ROT_K,
    ]
    quiet = run_pooled(model, requests, max_rows=5)
    requests[target].hooks = hooks
    loud = run_pooled(model, requests, max_rows=5)
    assert not torch.equal(loud[target].logits[-1], quiet[target].logits[-1]), "no effect"
    for i, (a, b) in enumerate(zip(quiet, loud, strict=True)):
        if i != target:
            assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits, strict=True)), i


def test_decode_hooks_see_their_solo_shapes(any_checkpoint: Path) -> None:
    """A pattern hook sees [batch, heads, 1, own length] at each step (rotated keys: [batch,
    own length, kv_heads, d_head]), with the solo values, while a longer request shares the
    steps; a capture over the step's own rows too."""
    model = our_model(any_checkpoint)
    names = [
        name
        for name in model.hook_names
        if name.endswith(("attn.hook_pattern", "attn.hook_rot_k", "hook_resid_post"))
    ]

    def recorder(calls: list[tuple[str, torch.Tensor]]) -> Callable[..., None]:
        def fn(x: torch.Tensor, hook: Any) -> None:
            calls.append((hook.name, x.clone()))

        return fn

    padded, mask, _ = left_padded_batch(any_checkpoint, (9, 4))
    solo_calls: list[tuple[str, torch.Tensor]] = []
    pooled_calls: list[tuple[str, torch.Tensor]] = []
    watched = Request(padded, mask, [(name, recorder(solo_calls)) for name in names], 6, 2)
    run_solo(model, watched)
    watched.hooks = [(name, recorder(pooled_calls)) for name in names]
    longer = Request(one(any_checkpoint, 0, 14), max_new=10)
    run_pooled(model, [longer, watched], max_rows=3)
    assert [(n, tuple(x.shape)) for n, x in pooled_calls] == [
        (n, tuple(x.shape)) for n, x in solo_calls
    ]
    pattern = [x for n, x in pooled_calls if n.endswith("hook_pattern")][-1]
    assert pattern.shape == (2, model.cfg.n_heads, 1, 9 + 5)
    for (name, ours), (_, ref) in zip(pooled_calls, solo_calls, strict=True):
        assert_close(ours, ref, name, atol=1e-5 * max(1.0, float(ref.abs().max())))


def test_step_hooks_override_and_capture(any_checkpoint: Path) -> None:
    """A step may replace a group's hooks: with a capturing run it captures that group's rows
    only, and a later hook's result does not change the capture, as in its solo step; with no
    hooks the step runs unhooked. The reference is the engine's KV-cache forward (prefill, then
    one step)."""
    model = our_model(any_checkpoint)
    steering = [("blocks.0.hook_attn_out", steer(5)), ("blocks.1.hook_resid_pre", steer(8))]
    name = "blocks.0.hook_resid_post"  # the tensor blocks.1.hook_resid_pre receives
    a, b = one(any_checkpoint, 0, 7), one(any_checkpoint, 1, 10)
    pool = DecodePool(model, max_rows=2, max_positions=32)
    group_a, logits_a = pool.join(a, fwd_hooks=steering)
    group_b, logits_b = pool.join(b, fwd_hooks=steering)
    tokens = {group_a: logits_a.argmax(-1), group_b: logits_b.argmax(-1)}
    run = model.hook_run(steering, names_filter=name, capture=True)
    out = pool.step(tokens, hooks={group_a: run, group_b: []})
    for prompt, group, step_hooks in ((a, group_a, steering), (b, group_b, [])):
        cache = model.init_kv_cache()
        model(prompt, past_kv_cache=cache, fwd_hooks=steering)
        logits, solo = model.run_with_cache(
            tokens[group][:, None], past_kv_cache=cache, fwd_hooks=step_hooks, names_filter=name
        )
        assert_close(out[group], logits[:, -1], "step logits", atol=1e-5)
        if group is group_a:
            assert run.cache[name].shape == (1, 1, model.cfg.d_model)
            assert_close(run.cache[name], solo[name], "capture", atol=1e-5)


def test_stale_rows_cannot_poison_newcomers(gpt2_checkpoint: Path) -> None:
    """Rows left by a generation whose keys and values went NaN are reused (by rows moving up
    and by a newcomer) without the NaN reaching anyone through their masked columns."""
    model = our_model(gpt2_checkpoint)

    def poison(x: torch.Tensor, hook: Any) -> torch.Tensor:
        return x * float("nan")

    poisoned = [("blocks.0.attn.hook_k", poison), ("blocks.0.attn.hook_v", poison)]
    x1, x2 = one(gpt2_checkpoint, 0, 14), one(gpt2_checkpoint, 1, 12)
    z, y = Request(one(gpt2_checkpoint, 1, 4), max_new=12), Request(one(gpt2_checkpoint, 2, 3))
    pool = DecodePool(model, max_rows=3, max_positions=32)
    group_x1, _ = pool.join(x1, fwd_hooks=poisoned)
    group_z, logits = pool.join(z.tokens)
    group_x2, _ = pool.join(x2, fwd_hooks=poisoned)
    z_tokens = [logits.argmax(-1)]
    junk = torch.zeros(1, dtype=torch.long)
    for _ in range(3):
        out = pool.step({group_x1: junk, group_z: z_tokens[-1], group_x2: junk})
        assert out[group_x1].isnan().all()
        z_tokens.append(out[group_z].argmax(-1))
    pool.leave(group_x1)  # z and x2 move up over x1's rows
    pool.leave(group_x2)  # x2's rows are left as they are
    group_y, logits = pool.join(y.tokens)
    assert group_y.rows == slice(1, 2)
    y_tokens = [logits.argmax(-1)]
    for _ in range(7):
        out = pool.step({group_z: z_tokens[-1], group_y: y_tokens[-1]})
        z_tokens.append(out[group_z].argmax(-1))
        y_tokens.append(out[group_y].argmax(-1))
    assert torch.equal(torch.stack(z_tokens, 1), run_solo(model, z).tokens[:, :11])
    assert torch.equal(torch.stack(y_tokens, 1), run_solo(model, y).tokens)


def test_pooled_generation_equals_transformer_lens(any_checkpoint: Path) -> None:
    """Pooled greedy tokens equal TL 3.9's ``generate`` with the same hooks, a batch of strings
    (TL left-pads it) among them."""
    model, ref = our_model(any_checkpoint), tl_model(any_checkpoint)
    texts = [TEXTS[0][:40], TEXTS[3]]
    tokens, mask = prompt_tokens(model, texts, None, None, None)
    requests = [
        Request(tokens, mask, [("blocks.1.hook_resid_pre", steer(6))], max_new=8),
        Request(
            one(any_checkpoint, 0, 9),
            hooks=[("blocks.0.attn.hook_z", zero_head(3))],
            max_new=10,
            join_at=1,
        ),
        Request(one(any_checkpoint, 1, 5), hooks=[ROT_K], max_new=6, join_at=2),
    ]
    outcomes = run_pooled(model, requests, max_rows=4)
    for i, request in enumerate(requests):
        prompt: Any = texts if i == 0 else request.tokens
        with ref.hooks(fwd_hooks=request.hooks):
            expected = ref.generate(
                prompt, max_new_tokens=request.max_new, do_sample=False, stop_at_eos=False,
                use_past_kv_cache=True, verbose=False, return_type="tokens",
            )  # fmt: skip
        assert torch.equal(expected[:, : request.tokens.shape[1]], request.tokens)
        new = expected[:, request.tokens.shape[1] :]
        assert torch.equal(outcomes[i].tokens, new), f"request {i}: {outcomes[i].tokens} {new}"


@pytest.fixture(scope="module")
def mistral_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Any:
    folder = tmp_path_factory.mktemp("ckpt-window")
    return load_model(str(build_checkpoint("mistral", folder, tokenizer_dir=tokenizer_dir)))


def test_sliding_window_equals_solo(mistral_model: Any, tokenizer_dir: Path) -> None:
    """Mistral's window (4 here) over a left-padded group and single prompts, far past it."""
    model = mistral_model
    assert model.cfg.window_size == 4
    generator = torch.Generator().manual_seed(1)
    padded = torch.randint(3, 900, (2, 9), generator=generator)
    mask = torch.ones_like(padded)
    mask[1, :5] = 0
    requests = [
        Request(torch.randint(3, 900, (1, 6), generator=generator), max_new=14),
        Request(padded, mask, [("blocks.0.hook_resid_post", steer(7))], max_new=12, join_at=2),
        Request(
            torch.randint(3, 900, (1, 3), generator=generator), hooks=[ROT_K], max_new=9, join_at=4
        ),
    ]
    assert_equals_solo(model, requests, run_pooled(model, requests, max_rows=3))


def test_interrupted_step_can_run_again(any_checkpoint: Path) -> None:
    """An interrupt raised inside a step (or a join) leaves the pool usable: the step runs
    again and the generations still equal solo."""
    model = our_model(any_checkpoint)
    calls = 0

    def stop_at_second_block() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt

    a, b = Request(one(any_checkpoint, 0, 6), max_new=5), Request(one(any_checkpoint, 1, 3))
    pool = DecodePool(model, max_rows=2, max_positions=16)
    with pytest.raises(KeyboardInterrupt):
        pool.join(b.tokens, interrupt=stop_at_second_block)
    assert pool.free_rows == 2
    group, logits = pool.join(a.tokens)
    tokens = [logits.argmax(-1)]
    calls = 0
    with pytest.raises(KeyboardInterrupt):
        pool.step({group: tokens[-1]}, interrupt=stop_at_second_block)
    for _ in range(4):
        tokens.append(pool.step({group: tokens[-1]})[group].argmax(-1))
    assert torch.equal(torch.stack(tokens, 1), run_solo(model, a).tokens)


def test_misuse_is_refused(gpt2_checkpoint: Path) -> None:
    model = our_model(gpt2_checkpoint)
    with pytest.raises(ValueError, match="n_ctx"):
        DecodePool(model, 2, model.cfg.n_ctx + 1)
    pool = DecodePool(model, max_rows=2, max_positions=6)
    with pytest.raises(PoolFull):
        pool.join(torch.ones(3, 4, dtype=torch.long))  # three rows
    with pytest.raises(PoolFull):
        pool.join(torch.ones(1, 6, dtype=torch.long))  # no column left to decode into
    group, logits = pool.join(torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="every active group"):
        pool.step({})
    token = logits.argmax(-1)
    pool.step({group: token})
    pool.step({group: token})
    with pytest.raises(PoolFull):
        pool.step({group: token})
    pool.leave(group)
    with pytest.raises(ValueError, match="not in the pool"):
        pool.leave(group)
    assert pool.step({}) == {}
