"""The model object as TransformerLens 3.9's, on the same checkpoint: the module tree and its
hook points, the weights under every name (fetched once, shared), ``cfg``, ``loss_fn`` and the
local tokenizer helpers (no request once the tokenizer files are in)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import hooklab
from fixtures.oracle import load_tl_model
from hooklab import hooks
from hooklab.modules import HookPoint, Module
from hooklab_server.engine import load_model

from .e2e_helpers import assert_close
from .e2e_servers import PROMPTS, Served, sample_tokens, serve


@pytest.fixture
def fresh(server: Served) -> Iterator[tuple[hooklab.HookedTransformer, list[str]]]:
    """A new client on the server (nothing fetched yet) and the paths it requests from now on."""
    model = hooklab.connect(server.url)
    requests: list[str] = []

    def record(request: httpx.Request) -> None:
        requests.append(request.url.path)

    model._transport.client.event_hooks["request"].append(record)
    yield model, requests
    model.close()


def _resolve(root: Any, dotted: str) -> Any:
    """``blocks.0.attn.hook_z`` by attribute access and indexing, as a user writes it."""
    node = root
    for part in dotted.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def test_hook_points_and_modules_as_in_tl(server: Served) -> None:
    model, tl = server.model, server.tl
    assert set(model.hook_dict) == set(tl.hook_dict)
    assert set(model.mod_dict) == set(tl.mod_dict)
    assert len(model.blocks) == tl.cfg.n_layers
    for name, tl_hook in tl.hook_dict.items():
        hook = _resolve(model, name)
        assert isinstance(hook, HookPoint) and hook is model.hook_dict[name], name
        assert hook.name == tl_hook.name == name
        if name.startswith("blocks."):
            assert hook.layer() == tl_hook.layer()
    for name in tl.mod_dict:
        if not name.split(".")[-1].startswith("hook_"):
            assert isinstance(_resolve(model, name), Module), name
            assert model.mod_dict[name].name == name
    for name, _ in tl.named_children():
        assert _resolve(model, name) is model.mod_dict[name], name
    assert [hook.name for hook in model.hook_points()] == list(model.hook_dict)


def test_named_parameters_as_in_tl(server: Served) -> None:
    model, tl = server.model, server.tl
    ours = list(model.named_parameters())
    ref = list(tl.named_parameters())
    assert [name for name, _ in ours] == [name for name, _ in ref]
    for (name, weight), (_, expected) in zip(ours, ref, strict=True):
        assert_close(weight, expected.detach(), name)
    assert len(list(model.parameters())) == len(ref)
    assert list(model.state_dict()) == [name for name, _ in ref]  # TL's, less its buffers
    block = [name for name, _ in model.blocks[1].named_parameters()]
    assert block == [name for name, _ in tl.blocks[1].named_parameters()]
    assert list(model.blocks[1].attn.state_dict()) == list(
        dict(tl.blocks[1].attn.named_parameters())
    )


def test_every_weight_alias_as_in_tl(server: Served) -> None:
    model, tl = server.model, server.tl
    names = ["W_E", "W_U", "b_U", "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in",
             "W_out", "b_in", "b_out", "W_pos", "W_gate", "W_E_pos"]  # fmt: skip
    for name in names:
        try:
            expected = getattr(tl, name)
        except AttributeError:  # W_pos of a rotary model: hooklab answers None
            continue
        if expected is None:
            assert getattr(model, name) is None, name
        else:
            assert_close(getattr(model, name), expected.detach(), name)
    attn, tl_attn = model.blocks[1].attn, tl.blocks[1].attn
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
        assert_close(getattr(attn, name), getattr(tl_attn, name).detach(), f"attn.{name}")
    assert_close(attn.OV.AB, tl_attn.OV.AB.detach(), "attn.OV")
    assert_close(attn.QK.AB, tl_attn.QK.AB.detach(), "attn.QK")
    assert_close(model.embed.W_E, tl.embed.W_E.detach(), "embed.W_E")
    assert_close(model.unembed.b_U, tl.unembed.b_U.detach(), "unembed.b_U")
    for name, _ in tl.blocks[1].mlp.named_parameters():
        assert_close(getattr(model.blocks[1].mlp, name), getattr(tl.blocks[1].mlp, name), name)
    with pytest.raises(AttributeError):
        _ = model.blocks[1].attn.W_nothing


def test_unprocessed_weights_as_in_tl(any_checkpoint: Path) -> None:
    """Without weight processing the norms keep their weights (LN: w and b, RMS: w)."""
    flags = dict.fromkeys(
        ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases"), False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl = load_tl_model(any_checkpoint, **flags)
    with serve(load_model(str(any_checkpoint), device="cpu", **flags)) as running:
        model = hooklab.connect(running.url)
        try:
            ours = list(model.named_parameters())
            assert [name for name, _ in ours] == [name for name, _ in tl.named_parameters()]
            for name, weight in ours:
                assert_close(weight, tl.get_parameter(name).detach(), name)
            assert_close(model.blocks[0].ln1.w, tl.blocks[0].ln1.w.detach(), "ln1.w")
            assert_close(model.ln_final.w, tl.ln_final.w.detach(), "ln_final.w")
        finally:
            model.close()


def test_weights_are_fetched_once_and_shared(
    server: Served, fresh: tuple[hooklab.HookedTransformer, list[str]]
) -> None:
    model, requests = fresh
    assert model.unembed.W_U is model.W_U is model.parameter("W_U")
    assert model.embed.W_E is model.W_E
    assert requests == ["/v1/weights/unembed.W_U", "/v1/weights/embed.W_E"]
    requests.clear()
    stacked = model.W_Q
    for layer, block in enumerate(model.blocks):
        assert block.attn.W_Q is block.attn.W_Q
        assert torch.equal(block.attn.W_Q, stacked[layer])
        assert block.attn.W_Q.data_ptr() == stacked[layer].data_ptr()  # a view, no copy
    assert requests == ["/v1/weights/W_Q"]
    requests.clear()
    before = model.blocks[0].mlp.W_out
    assert model.blocks[0].mlp.W_out is before
    assert requests == ["/v1/weights/blocks.0.mlp.W_out"]
    # A weight the model lacks (a folded norm's) is asked for once, then known to be missing.
    assert server.tl.cfg.normalization_type in ("LNPre", "RMSPre")
    for _ in range(2):
        with pytest.raises(KeyError):
            model.parameter("blocks.0.ln1.w")
    assert requests == ["/v1/weights/blocks.0.mlp.W_out", "/v1/weights/blocks.0.ln1.w"]


def test_state_dict_is_lazy(
    server: Served, fresh: tuple[hooklab.HookedTransformer, list[str]]
) -> None:
    model, requests = fresh
    state = model.state_dict()
    assert len(state) == len(list(server.tl.named_parameters()))
    assert requests == []
    assert_close(state["unembed.W_U"], server.tl.unembed.W_U.detach(), "unembed.W_U")
    assert requests == ["/v1/weights/unembed.W_U"]
    names = iter(model.named_parameters())
    name, _ = next(names)
    assert name == "embed.W_E" and requests[-1] == "/v1/weights/embed.W_E"


def test_hook_point_add_hook_and_remove_hooks(server: Served) -> None:
    model, tl = server.model, server.tl
    tokens = sample_tokens(tl)
    kept = ("blocks.0.hook_resid_post", hooks.scale(0.5))
    model.add_hook(*kept)
    hook_point = model.blocks[1].attn.hook_z
    hook_point.add_hook(hooks.ablate())
    hook_point.add_hook(hooks.scale(2.0))
    assert model._hooks[0] == kept and len(model._hooks) == 3
    expected = tl.run_with_hooks(
        tokens,
        fwd_hooks=[
            ("blocks.0.hook_resid_post", lambda x, hook: x * 0.5),
            ("blocks.1.attn.hook_z", lambda z, hook: z * 0.0),
        ],
    )
    assert_close(model(tokens), expected, "hooked logits")
    hook_point.remove_hooks()
    assert model._hooks == [kept]  # only what the hook point added is gone
    only_kept = tl.run_with_hooks(
        tokens, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x * 0.5)]
    )
    assert_close(model(tokens), only_kept, "after remove_hooks")
    model.reset_hooks()
    hook_point.remove_hooks()  # nothing left to remove: no error
    with pytest.raises(ValueError):
        model.hook_embed.layer()


def test_cfg_as_in_tl(server: Served) -> None:
    cfg, ref = server.model.cfg, server.tl.cfg
    assert isinstance(cfg, hooklab.config.HookedTransformerConfig)
    fields = [
        "n_layers", "d_model", "d_head", "n_heads", "d_mlp", "d_vocab", "d_vocab_out", "n_ctx",
        "act_fn", "eps", "normalization_type", "positional_embedding_type", "rotary_dim",
        "rotary_base", "rotary_adjacent_pairs", "parallel_attn_mlp", "gated_mlp", "final_rms",
        "attn_only", "use_attn_scale", "attn_scale", "default_prepend_bos", "dtype",
        "original_architecture", "n_params", "use_attn_result", "use_split_qkv_input",
        "use_hook_mlp_in", "use_attn_in", "init_mode", "n_devices", "attention_dir",
        "attn_scores_soft_cap", "output_logits_soft_cap", "use_local_attn", "use_hook_tokens",
    ]  # fmt: skip
    for field in fields:
        assert getattr(cfg, field) == getattr(ref, field), field
    assert isinstance(cfg.dtype, torch.dtype)
    assert cfg.device == "cpu"  # where the client's tensors live
    assert set(ref.to_dict()) <= set(cfg.to_dict())
    assert cfg.is_layer_norm_activation() == ref.is_layer_norm_activation()
    assert "HookedTransformerConfig" in repr(cfg)


def test_loss_fn_as_in_tl(server: Served) -> None:
    model, tl = server.model, server.tl
    tokens = tl.to_tokens(PROMPTS, padding_side="left")
    mask = (tokens != tl.tokenizer.pad_token_id).long()
    logits = tl(tokens, attention_mask=mask).detach()
    for attention_mask in (None, mask, mask.bool()):
        for per_token in (False, True):
            ours = model.loss_fn(logits, tokens, attention_mask, per_token)
            ref = tl.loss_fn(logits, tokens, attention_mask, per_token)
            assert ours.shape == ref.shape and torch.equal(ours, ref), (attention_mask, per_token)
    assert_close(model.loss_fn(model(tokens), tokens), tl(tokens, return_type="loss"), "loss")


def test_tokenizer_helpers_run_locally(
    server: Served, fresh: tuple[hooklab.HookedTransformer, list[str]]
) -> None:
    model, requests = fresh
    tl = server.tl
    assert requests == []  # the tokenizer is fetched on first use
    assert torch.equal(model.to_tokens(PROMPTS), tl.to_tokens(PROMPTS))
    assert requests == ["/v1/tokenizer"]
    tokens = tl.to_tokens(PROMPTS[0])
    for _ in range(2):
        assert model.to_str_tokens(PROMPTS[0]) == tl.to_str_tokens(PROMPTS[0])
        assert model.to_str_tokens(tokens) == tl.to_str_tokens(tokens)
        assert model.to_string(tokens[0, 2]) == tl.to_string(tokens[0, 2])
        assert model.to_string(tokens) == tl.to_string(tokens)
        word = tl.to_string(tokens[0, 2:3])
        assert model.to_single_token(word) == tl.to_single_token(word)
        assert model.get_token_position(word, PROMPTS[0]) == tl.get_token_position(word, PROMPTS[0])
    assert requests == ["/v1/tokenizer"]


def test_local_tokens_are_the_servers(server: Served) -> None:
    """Strings sent to the server tokenise as the local helpers do, so ``model(text)`` and
    ``model(model.to_tokens(text))`` are the same run."""
    model = server.model
    for prepend_bos in (None, True, False):
        for side in ("left", "right"):
            body = {"input": PROMPTS, "prepend_bos": prepend_bos, "padding_side": side}
            served = model._transport.post_json("/v1/tokenize", body)
            local = model.to_tokens(PROMPTS, prepend_bos=prepend_bos, padding_side=side)
            assert local.tolist() == served["tokens"], (prepend_bos, side)
