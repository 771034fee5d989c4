"""TransformerLens's *Main Demo*, section by section, as a user runs it on a small model.

Each function is one section: code written against TransformerLens's ``HookedTransformer``
(``model``) and nothing else, returning what the user looks at. The fixture checkpoints have a
tokenizer trained on Python's stdlib sources, so the text is Python-flavoured English whose
words are tokens of that vocabulary.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import einops
import torch
from transformer_lens import utilities

TEXT = "If the value is not None, return the name of the file. Otherwise raise an error."
SHORT = "return the value"


def loss_and_cache(model: Any) -> dict[str, Any]:
    """Run the model, read its loss, cache every activation and poke at the cache."""
    tokens = model.to_tokens(TEXT)
    logits, loss = model(TEXT, return_type="both")
    print(f"Model loss: {loss.item():.4f}")
    per_token = model(tokens, return_type="loss", loss_per_token=True)

    cached_logits, cache = model.run_with_cache(TEXT, remove_batch_dim=True)
    pattern = cache["pattern", 0]  # [head, query, key]
    # How much each head of layer 0 attends to the previous token.
    previous = pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1)

    # Caching only the patterns must not change the logits, nor the patterns themselves.
    filtered_logits, filtered = model.run_with_cache(
        tokens, names_filter=lambda name: name.endswith("hook_pattern")
    )
    plain_logits = model(tokens)
    return {
        "str_tokens": model.to_str_tokens(TEXT),
        "logits": logits,
        "loss": loss,
        "loss_item": loss.item(),
        "loss_per_token": per_token,
        "loss_fn": model.loss_fn(logits, tokens),
        "loss_fn_per_token": model.loss_fn(logits, tokens, per_token=True),
        "cache_keys": sorted(cache.keys()),
        "pattern_L0": pattern,
        "attn_scores_L0": cache["attn_scores", 0],
        "previous_token_attention": previous,
        "resid_post_last_layer": cache["resid_post", -1],
        "mlp_post_L0": cache["post", 0],
        "ln_final_scale": cache["scale"],
        "embed": cache["embed"],
        "filtered_keys": sorted(filtered.keys()),
        "same_logits_cached_or_not": torch.equal(cached_logits, plain_logits),
        "same_logits_filtered_or_not": torch.equal(filtered_logits, plain_logits),
        "same_pattern_filtered_or_not": torch.equal(filtered["pattern", 0][0], pattern),
    }


def tokenizer_helpers(model: Any) -> dict[str, Any]:
    """The tokenization helpers, in every input form the demos use."""
    tokenizer = model.tokenizer
    tokens = model.to_tokens(SHORT)
    batch = model.to_tokens([SHORT, TEXT])
    value = model.to_single_token(" value")
    utilities.test_prompt("If the name is not None, return the", "value", model)
    encoded = tokenizer([SHORT, TEXT], padding=True, return_tensors="pt")
    return {
        "to_tokens": tokens,
        "to_tokens_no_bos": model.to_tokens(SHORT, prepend_bos=False),
        "to_tokens_batch": batch,
        "to_tokens_left_padded": model.to_tokens([SHORT, TEXT], padding_side="left"),
        "str_tokens": model.to_str_tokens(SHORT),
        "str_tokens_no_bos": model.to_str_tokens(SHORT, prepend_bos=False),
        "str_tokens_list": model.to_str_tokens([SHORT, "raise an error"]),
        "str_tokens_1d": model.to_str_tokens(tokens[0]),
        "str_tokens_2d": model.to_str_tokens(tokens),
        "str_tokens_0d": model.to_str_tokens(tokens[0, -1]),
        "to_string_int": model.to_string(int(tokens[0, -1])),
        "to_string_0d": model.to_string(tokens[0, -1]),
        "to_string_1d": model.to_string(tokens[0]),
        "to_string_2d": model.to_string(batch),
        "to_string_list": model.to_string(tokens[0].tolist()),
        "single_token": value,
        "single_str_token": model.to_single_str_token(value),
        "position_first": model.get_token_position(" the", "the name of the file"),
        "position_last": model.get_token_position(" the", "the name of the file", mode="last"),
        "position_of_id": model.get_token_position(value, tokens),
        "bos_id": tokenizer.bos_token_id,
        "eos_id": tokenizer.eos_token_id,
        "pad_id": tokenizer.pad_token_id,
        "bos_token": tokenizer.bos_token,
        "padding_side": tokenizer.padding_side,
        "encode": tokenizer.encode(TEXT),
        "decode": tokenizer.decode(tokenizer.encode(TEXT)),
        "call_input_ids": encoded["input_ids"],
        "call_attention_mask": encoded["attention_mask"],
        "ids_to_tokens": tokenizer.convert_ids_to_tokens(tokens[0].tolist()),
        "vocab_size": len(tokenizer),
    }


def weights_and_modules(model: Any) -> dict[str, Any]:
    """Weights by their TransformerLens names, the module tree, the config, factored circuits."""
    ov = model.OV[1, 0]  # layer 1, head 0
    full_ov = model.W_E @ ov @ model.W_U
    parameters = [(name, tuple(param.shape)) for name, param in model.named_parameters()]
    cfg = model.cfg
    return {
        "W_E": model.W_E,
        "W_U": model.W_U,
        "b_U": model.unembed.b_U,
        "W_Q_L0": model.blocks[0].attn.W_Q,
        "W_O": model.W_O,
        "W_in_L1": model.blocks[1].mlp.W_in,
        "embed_W_E_is_W_E": model.embed.W_E is model.W_E,
        "unembed_W_U_is_W_U": model.unembed.W_U is model.W_U,
        "state_dict_W_U": model.state_dict()["unembed.W_U"],
        "parameters": parameters,
        "n_parameters": sum(param.numel() for param in model.parameters()),
        "hook_dict": sorted(model.hook_dict),
        "hook_z_name": model.blocks[1].attn.hook_z.name,
        "mod_dict_has_attn": "blocks.0.attn" in model.mod_dict,
        "cfg": {
            field: getattr(cfg, field)
            for field in (
                "n_layers",
                "d_model",
                "n_heads",
                "d_head",
                "d_mlp",
                "d_vocab",
                "d_vocab_out",
                "n_ctx",
                "act_fn",
                "normalization_type",
                "positional_embedding_type",
                "default_prepend_bos",
                "n_key_value_heads",
                "parallel_attn_mlp",
                "dtype",
            )
        },
        "ov_AB": ov.AB,
        "ov_singular_values": ov.S,
        "full_ov_norm": full_ov.norm(),
    }


def print_every_hook(model: Any) -> dict[str, Any]:
    """A hook on every point that prints its name and shape (the demo's first hook)."""

    def show(activation: torch.Tensor, hook: Any) -> None:
        print(hook.name, activation.shape)

    model.run_with_hooks(SHORT, return_type=None, fwd_hooks=[(lambda name: True, show)])
    return {}


def hook_context(model: Any) -> dict[str, Any]:
    """A hook that keeps something in ``hook.ctx``, read back from the hook point afterwards."""
    name = utilities.get_act_name("resid_post", 0)

    def remember_norms(resid: torch.Tensor, hook: Any) -> None:
        hook.ctx["norms"] = resid.norm(dim=-1).detach()

    model.run_with_hooks(SHORT, return_type=None, fwd_hooks=[(name, remember_norms)])
    point = model.hook_dict[name]
    norms = point.ctx["norms"]
    point.clear_context()
    return {"norms": norms, "after_clear": sorted(point.ctx)}


def head_ablation(model: Any) -> dict[str, Any]:
    """Zero one head's values with a hook function that also prints what it sees."""
    layer, head = 0, 1

    def zero_head_values(value: torch.Tensor, hook: Any) -> torch.Tensor:
        print(f"Shape of the value tensor: {value.shape}")
        value[:, :, head, :] = 0.0
        return value

    original = model(TEXT, return_type="loss")
    ablated = model.run_with_hooks(
        TEXT, return_type="loss", fwd_hooks=[(utilities.get_act_name("v", layer), zero_head_values)]
    )
    print(f"Original loss: {original.item():.3f}")
    print(f"Ablated loss: {ablated.item():.3f}")
    return {"original": original, "ablated": ablated}


def residual_patching_loop(model: Any) -> dict[str, Any]:
    """Patch the clean residual stream into the corrupted run, layer by layer and position by
    position, with a hook built by ``partial``; score each patch by the logit difference."""
    clean = "When name and value went to the file, name gave the list to"
    corrupted = "When name and value went to the file, value gave the list to"
    right, wrong = model.to_single_token(" value"), model.to_single_token(" name")
    clean_tokens, corrupted_tokens = model.to_tokens(clean), model.to_tokens(corrupted)
    assert clean_tokens.shape == corrupted_tokens.shape

    def logit_diff(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, right] - logits[0, -1, wrong]

    clean_logits, clean_cache = model.run_with_cache(clean_tokens)
    corrupted_logits = model(corrupted_tokens)
    print(f"Clean logit diff: {logit_diff(clean_logits).item():.4f}")
    print(f"Corrupted logit diff: {logit_diff(corrupted_logits).item():.4f}")

    def patch_residual(resid: torch.Tensor, hook: Any, position: int) -> torch.Tensor:
        resid[:, position, :] = clean_cache[hook.name][:, position, :]
        return resid

    n_positions = clean_tokens.shape[1]
    results = torch.zeros(model.cfg.n_layers, n_positions)
    for layer in range(model.cfg.n_layers):
        for position in range(n_positions):
            patched = model.run_with_hooks(
                corrupted_tokens,
                fwd_hooks=[
                    (
                        utilities.get_act_name("resid_pre", layer),
                        partial(patch_residual, position=position),
                    )
                ],
            )
            results[layer, position] = logit_diff(patched).item()
    return {"clean": logit_diff(clean_logits), "patched": results}


def induction_heads(model: Any) -> dict[str, Any]:
    """Repeated random tokens: loss on each half, and every head's induction score written by
    a hook into a tensor indexed by ``hook.layer()``."""
    seq_len, batch = 12, 4
    generator = torch.Generator().manual_seed(0)
    random_tokens = torch.randint(10, model.cfg.d_vocab, (batch, seq_len), generator=generator)
    bos = torch.full((batch, 1), model.tokenizer.bos_token_id)
    repeated = torch.cat([bos, random_tokens, random_tokens], dim=1)

    per_token = model(repeated, return_type="loss", loss_per_token=True)
    first_half = per_token[:, :seq_len].mean()
    second_half = per_token[:, seq_len:].mean()
    print(f"Loss on the first half: {first_half.item():.3f}, second half: {second_half.item():.3f}")

    scores = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)

    def induction_score(pattern: torch.Tensor, hook: Any) -> None:
        # Attention from each token of the second half to the token after its earlier copy.
        stripe = pattern.diagonal(dim1=-2, dim2=-1, offset=1 - seq_len)
        scores[hook.layer(), :] = einops.reduce(stripe, "batch head pos -> head", "mean")

    model.run_with_hooks(
        repeated,
        return_type=None,
        fwd_hooks=[(lambda name: name.endswith("pattern"), induction_score)],
    )

    # The demo hands patterns to a plotting library, which reads them as nested lists.
    shown: list[list[list[float]]] = []

    def show_pattern(pattern: torch.Tensor, hook: Any) -> None:
        shown.append(pattern[0, 0].tolist())

    model.run_with_hooks(
        repeated[:1], return_type=None, fwd_hooks=[("blocks.1.attn.hook_pattern", show_pattern)]
    )
    return {
        "per_token_loss": per_token,
        "first_half": first_half.item(),
        "second_half": second_half.item(),
        "induction_scores": scores,
        "shown_pattern": shown,
    }


def steering_generate(model: Any) -> dict[str, Any]:
    """Greedy generation, then again with a steering vector (the difference of two cached
    residual streams) added by a hook function during ``generate``."""
    prompt = "If the value is not None"
    layer = 1
    name = utilities.get_act_name("resid_pre", layer)
    _, plus = model.run_with_cache(" return", names_filter=name)
    _, minus = model.run_with_cache(" raise", names_filter=name)
    steering = plus[name][0, -1] - minus[name][0, -1]

    def add_steering(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        return resid + 4.0 * steering

    plain = model.generate(prompt, max_new_tokens=8, do_sample=False, verbose=False)
    with model.hooks(fwd_hooks=[(name, add_steering)]):
        steered = model.generate(prompt, max_new_tokens=8, do_sample=False, verbose=False)
        steered_tokens = model.generate(
            model.to_tokens(prompt), max_new_tokens=8, do_sample=False, verbose=False
        )
    # A plain call after the block is unsteered again.
    after = model.generate(prompt, max_new_tokens=8, do_sample=False)
    return {
        "steering_vector": steering,
        "plain": plain,
        "steered": steered,
        "steered_tokens": steered_tokens,
        "after_block": after,
    }


SECTIONS = (
    loss_and_cache,
    tokenizer_helpers,
    weights_and_modules,
    print_every_hook,
    hook_context,
    head_ablation,
    residual_patching_loop,
    induction_heads,
    steering_generate,
)
