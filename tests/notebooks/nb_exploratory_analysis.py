"""TransformerLens's *Exploratory Analysis Demo* (indirect object identification), section by
section, as a user runs it on a small model.

The fixture vocabulary has no personal names, so the "names" are identifier words that are
single tokens ("name", "value", "key", ...): "With name and value in the file, value gave it
to" → " name". Each section repeats the setup cells it needs (``ioi_setup``), as a
notebook's earlier cells would have run them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import einops
import torch
from transformer_lens import utilities

NAME_WORDS = (
    " name", " value", " key", " field", " module", " data", " args", " code",
    " text", " line", " mode", " type", " class", " group", " error", " result",
)  # fmt: skip
TEMPLATE = "With{} and{} in the file,{} gave it to"


@dataclass
class IOI:
    prompts: list[str]
    tokens: torch.Tensor
    corrupted_tokens: torch.Tensor
    answer_tokens: torch.Tensor  # [batch, 2]: right, wrong
    logits: torch.Tensor
    cache: Any
    logit_diff_directions: torch.Tensor  # [batch, d_model]


def logits_to_ave_logit_diff(
    logits: torch.Tensor, answer_tokens: torch.Tensor, per_prompt: bool = False
) -> torch.Tensor:
    final_logits = logits[:, -1, :]
    answer_logits = final_logits.gather(dim=-1, index=answer_tokens)
    diff = answer_logits[:, 0] - answer_logits[:, 1]
    return diff if per_prompt else diff.mean()


def ioi_setup(model: Any) -> IOI:
    # Only words that are one token each, so every prompt has the same length.
    names = [w for w in NAME_WORDS if len(model.to_str_tokens(w, prepend_bos=False)) == 1]
    pairs = [(a, b) for a in names for b in names if a != b]
    # The corrupted prompt swaps every mention of the two names: the answer flips.
    clean_prompts = [TEMPLATE.format(io, s, s) for io, s in pairs]
    corrupted_prompts = [TEMPLATE.format(s, io, io) for io, s in pairs]
    pair_tokens = torch.tensor(
        [[model.to_single_token(io), model.to_single_token(s)] for io, s in pairs]
    )
    # A random model barely tells the two apart: keep the four pairs it separates most, so the
    # normalised metric below is not a ratio of two tiny numbers.
    # (In batches of 48, as one would on a larger model.)
    gaps = []
    for start in range(0, len(pairs), 48):
        batch = slice(start, start + 48)
        clean_diff = logits_to_ave_logit_diff(
            model(clean_prompts[batch]), pair_tokens[batch], per_prompt=True
        )
        corrupted_diff = logits_to_ave_logit_diff(
            model(corrupted_prompts[batch]), pair_tokens[batch], per_prompt=True
        )
        gaps.append(clean_diff - corrupted_diff)
    gap = torch.cat(gaps)
    chosen = gap.topk(4).indices.tolist()
    prompts = [clean_prompts[i] for i in chosen]
    answer_tokens = pair_tokens[chosen]
    tokens = model.to_tokens(prompts)
    logits, cache = model.run_with_cache(tokens)
    directions = model.tokens_to_residual_directions(answer_tokens)
    return IOI(
        prompts=prompts,
        tokens=tokens,
        corrupted_tokens=model.to_tokens([corrupted_prompts[i] for i in chosen]),
        answer_tokens=answer_tokens,
        logits=logits,
        cache=cache,
        logit_diff_directions=directions[:, 0] - directions[:, 1],
    )


def residual_stack_to_logit_diff(stack: torch.Tensor, ioi: IOI) -> torch.Tensor:
    scaled = ioi.cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1)
    batch = ioi.tokens.shape[0]
    return einops.einsum(scaled, ioi.logit_diff_directions, "... batch d, batch d -> ...") / batch


def logit_diff_and_logit_lens(model: Any) -> dict[str, Any]:
    """The logit difference per prompt, recovered from the residual stream, and the logit lens
    over the accumulated residual stream."""
    ioi = ioi_setup(model)
    per_prompt = logits_to_ave_logit_diff(ioi.logits, ioi.answer_tokens, per_prompt=True)
    for prompt, diff in zip(ioi.prompts, per_prompt, strict=True):
        print(f"{prompt!r}: {diff.item():.3f}")
    final_resid = ioi.cache["resid_post", -1][:, -1, :]
    from_resid = residual_stack_to_logit_diff(final_resid[None], ioi)
    # Parallel attention + MLP blocks (NeoX) have no resid_mid.
    accumulated, labels = ioi.cache.accumulated_resid(
        layer=-1, incl_mid=not model.cfg.parallel_attn_mlp, pos_slice=-1, return_labels=True
    )
    return {
        "str_tokens": model.to_str_tokens(ioi.prompts[0]),
        "answer_tokens": ioi.answer_tokens,
        "per_prompt": per_prompt,
        "average": logits_to_ave_logit_diff(ioi.logits, ioi.answer_tokens).item(),
        "from_residual_stream": from_resid,
        "logit_lens": residual_stack_to_logit_diff(accumulated, ioi),
        "logit_lens_labels": labels,
        "accumulated_final_ln": ioi.cache.accumulated_resid(apply_ln=True, pos_slice=-1),
    }


def layer_and_head_attribution(model: Any) -> dict[str, Any]:
    """Direct logit attribution per layer output and per head, and the attention patterns of
    the heads that matter most."""
    ioi = ioi_setup(model)
    per_layer, layer_labels = ioi.cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    per_head, head_labels = ioi.cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    head_diff = einops.rearrange(
        residual_stack_to_logit_diff(per_head, ioi),
        "(layer head) -> layer head",
        layer=model.cfg.n_layers,
    )
    top = head_diff.flatten().abs().topk(3).indices.tolist()
    top_heads = [divmod(index, model.cfg.n_heads) for index in top]
    patterns = torch.stack([ioi.cache["pattern", layer][0, head] for layer, head in top_heads])
    # The cache's own attribution: the same numbers per prompt, against the wrong answers.
    head_attrs = ioi.cache.logit_attrs(
        per_head,
        tokens=ioi.answer_tokens[:, 0],
        incorrect_tokens=ioi.answer_tokens[:, 1],
        pos_slice=-1,
    )
    full, full_labels = ioi.cache.get_full_resid_decomposition(
        layer=-1, pos_slice=-1, expand_neurons=False, return_labels=True
    )
    return {
        "per_layer": residual_stack_to_logit_diff(per_layer, ioi),
        "layer_labels": layer_labels,
        "per_head": head_diff,
        "head_labels": head_labels,
        "top_heads": top_heads,
        "top_head_patterns": patterns,
        "logit_attrs": head_attrs,
        "full_decomposition": residual_stack_to_logit_diff(full, ioi),
        "full_labels": full_labels,
    }


def per_head_results_flag(model: Any) -> dict[str, Any]:
    """``set_use_attn_result``: each head's output as its own hook point, read from the cache
    and patched by a hook; the flag turned off again afterwards."""
    ioi = ioi_setup(model)
    last = model.cfg.n_layers - 1
    model.set_use_attn_result(True)
    try:
        _, cache = model.run_with_cache(ioi.tokens, names_filter=lambda n: n.endswith("result"))
        result = cache["result", last]  # [batch, pos, head, d_model]

        def drop_head_zero(out: torch.Tensor, hook: Any) -> torch.Tensor:
            out[:, :, 0, :] = 0.0
            return out

        dropped = model.run_with_hooks(
            ioi.tokens, fwd_hooks=[(utilities.get_act_name("result", last), drop_head_zero)]
        )
    finally:
        model.set_use_attn_result(False)
    final = result[:, -1]  # [batch, head, d_model]
    return {
        "result": result,
        "result_keys": sorted(cache.keys()),
        "head_logit_diff": residual_stack_to_logit_diff(final.transpose(0, 1), ioi),
        "without_head_zero": logits_to_ave_logit_diff(dropped, ioi.answer_tokens),
        "flag_after": model.cfg.use_attn_result,
    }


def patching_by_partial_hooks(model: Any) -> dict[str, Any]:
    """Activation patching by hand: clean activations patched into the corrupted run with hook
    functions built by ``partial`` over the clean cache: the residual stream, attention and
    MLP outputs per position, head outputs (z), values (v) and patterns per head."""
    ioi = ioi_setup(model)
    corrupted_logits = model(ioi.corrupted_tokens)
    clean_diff = logits_to_ave_logit_diff(ioi.logits, ioi.answer_tokens)
    corrupted_diff = logits_to_ave_logit_diff(corrupted_logits, ioi.answer_tokens)
    print(f"Clean: {clean_diff.item():.4f}, corrupted: {corrupted_diff.item():.4f}")

    def normalised(logits: torch.Tensor) -> torch.Tensor:
        diff = logits_to_ave_logit_diff(logits, ioi.answer_tokens)
        return (diff - corrupted_diff) / (clean_diff - corrupted_diff)

    def patch_component(component: torch.Tensor, hook: Any, pos: int, cache: Any) -> torch.Tensor:
        component[:, pos, :] = cache[hook.name][:, pos, :]
        return component

    def patch_component_copy(
        component: torch.Tensor, hook: Any, pos: int, cache: Any
    ) -> torch.Tensor:
        # The 3.x notebooks' form: edit a copy, assign a one-position slice.
        component = component.clone()
        component[:, pos : pos + 1, :] = cache[hook.name][:, pos, :].clone().unsqueeze(1)
        return component

    def patch_head(vector: torch.Tensor, hook: Any, head: int, cache: Any) -> torch.Tensor:
        vector[:, :, head, :] = cache[hook.name][:, :, head, :]
        return vector

    def patch_pattern(pattern: torch.Tensor, hook: Any, head: int, cache: Any) -> torch.Tensor:
        pattern[:, head, :, :] = cache[hook.name][:, head, :, :]
        return pattern

    n_layers, n_positions = model.cfg.n_layers, ioi.tokens.shape[1]
    results: dict[str, Any] = {"clean": clean_diff, "corrupted": corrupted_diff}
    for kind, patcher in (
        ("resid_pre", patch_component_copy),
        ("attn_out", patch_component),
        ("mlp_out", patch_component),
    ):
        scores = torch.zeros(n_layers, n_positions)
        for layer in range(n_layers):
            for pos in range(n_positions):
                hook_fn = partial(patcher, pos=pos, cache=ioi.cache)
                logits = model.run_with_hooks(
                    ioi.corrupted_tokens, fwd_hooks=[(utilities.get_act_name(kind, layer), hook_fn)]
                )
                scores[layer, pos] = normalised(logits)
        results[kind] = scores

    # Values are per key-value head (fewer than query heads under grouped-query attention).
    n_kv_heads = model.cfg.n_key_value_heads or model.cfg.n_heads
    for kind, head_patcher, n_heads in (
        ("z", patch_head, model.cfg.n_heads),
        ("v", patch_head, n_kv_heads),
        ("pattern", patch_pattern, model.cfg.n_heads),
    ):
        scores = torch.zeros(n_layers, n_heads)
        for layer in range(n_layers):
            for head in range(n_heads):
                hook_fn = partial(head_patcher, head=head, cache=ioi.cache)
                logits = model.run_with_hooks(
                    ioi.corrupted_tokens, fwd_hooks=[(utilities.get_act_name(kind, layer), hook_fn)]
                )
                scores[layer, head] = normalised(logits)
        results[kind] = scores
    return results


def head_scores_from_hooks(model: Any) -> dict[str, Any]:
    """Previous-token, duplicate-token and induction scores of every head, from three hook
    functions on each pattern that write into tensors indexed by ``hook.layer()``."""
    seq_len, batch = 10, 4
    generator = torch.Generator().manual_seed(1)
    random_tokens = torch.randint(10, model.cfg.d_vocab, (batch, seq_len), generator=generator)
    bos = torch.full((batch, 1), model.tokenizer.bos_token_id)
    repeated = torch.cat([bos, random_tokens, random_tokens], dim=1)
    shape = (model.cfg.n_layers, model.cfg.n_heads)
    previous, duplicate, induction = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)

    def stripe_mean(pattern: torch.Tensor, offset: int) -> torch.Tensor:
        # diagonal over (key, query): query i + offset attending to key i.
        stripe = pattern.diagonal(offset=offset, dim1=-1, dim2=-2)
        return einops.reduce(stripe, "batch head pos -> head", "mean")

    def previous_token_hook(pattern: torch.Tensor, hook: Any) -> None:
        previous[hook.layer()] = stripe_mean(pattern, 1)

    def duplicate_token_hook(pattern: torch.Tensor, hook: Any) -> None:
        duplicate[hook.layer()] = stripe_mean(pattern, seq_len)

    def induction_hook(pattern: torch.Tensor, hook: Any) -> None:
        induction[hook.layer()] = stripe_mean(pattern, seq_len - 1)

    def is_pattern(name: str) -> bool:
        return name.endswith("pattern")

    model.run_with_hooks(
        repeated,
        return_type=None,
        fwd_hooks=[
            (is_pattern, previous_token_hook),
            (is_pattern, duplicate_token_hook),
            (is_pattern, induction_hook),
        ],
    )
    return {"previous": previous, "duplicate": duplicate, "induction": induction}


def attention_scores_into_python(model: Any) -> dict[str, Any]:
    """Hooks that only read: attention scores copied into a dict, a printed summary that
    needs the values (``.item()``), and the last query row written into a tensor."""
    ioi = ioi_setup(model)
    saved: dict[str, torch.Tensor] = {}
    last_rows = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, ioi.tokens.shape[1])

    def save_scores(scores: torch.Tensor, hook: Any) -> None:
        saved[hook.name] = scores.detach().clone()

    def report_peak(scores: torch.Tensor, hook: Any) -> None:
        peak = scores[0].max().item()
        if peak > 0:
            print(f"{hook.name}: peak score {peak:.3f}")
        else:
            print(f"{hook.name}: no positive score")

    def keep_last_row(scores: torch.Tensor, hook: Any) -> None:
        last_rows[hook.layer()] = scores[0, :, -1, :]

    logits = model.run_with_hooks(
        ioi.tokens,
        fwd_hooks=[
            (lambda name: name.endswith("attn_scores"), save_scores),
            (lambda name: name.endswith("attn_scores"), report_peak),
            (lambda name: name.endswith("attn_scores"), keep_last_row),
        ],
    )
    return {
        "saved_names": list(saved),
        "saved": [saved[name] for name in saved],
        "last_rows": last_rows,
        # Read-only hooks must leave the outputs as they are.
        "logits_unchanged": torch.equal(logits, ioi.logits),
    }


def ablation_through_the_module_tree(model: Any) -> dict[str, Any]:
    """Ablate each last-layer head at the final position through
    ``model.blocks[l].attn.hook_z.add_hook``, then the same through ``model.add_hook`` and
    ``model.hooks``; hooks removed afterwards leave the model as it was."""
    ioi = ioi_setup(model)
    last = model.cfg.n_layers - 1

    def ablate_head(z: torch.Tensor, hook: Any, head: int) -> torch.Tensor:
        z = z.clone()
        z[:, -1, head, :] = 0.0
        return z

    per_head = []
    for head in range(model.cfg.n_heads):
        model.blocks[last].attn.hook_z.add_hook(partial(ablate_head, head=head))
        logits = model(ioi.tokens)
        per_head.append(logits_to_ave_logit_diff(logits, ioi.answer_tokens).item())
        model.reset_hooks()

    point = model.hook_dict[utilities.get_act_name("z", last)]
    point.add_hook(partial(ablate_head, head=0))
    through_hook_dict = logits_to_ave_logit_diff(model(ioi.tokens), ioi.answer_tokens)
    point.remove_hooks()
    removed = logits_to_ave_logit_diff(model(ioi.tokens), ioi.answer_tokens)

    def silence_mlp(out: torch.Tensor, hook: Any) -> torch.Tensor:
        return out * 0.0

    model.add_hook(utilities.get_act_name("mlp_out", 0), silence_mlp)
    via_add_hook = logits_to_ave_logit_diff(model(ioi.tokens), ioi.answer_tokens)
    model.reset_hooks()
    with model.hooks(fwd_hooks=[(utilities.get_act_name("mlp_out", 0), silence_mlp)]):
        via_context = logits_to_ave_logit_diff(model(ioi.tokens), ioi.answer_tokens)
    after = logits_to_ave_logit_diff(model(ioi.tokens), ioi.answer_tokens)
    return {
        "per_head": per_head,
        "through_hook_dict": through_hook_dict,
        "after_remove_hooks": removed,
        "mlp_silenced_add_hook": via_add_hook,
        "mlp_silenced_context": via_context,
        "after_all": after,
    }


SECTIONS = (
    logit_diff_and_logit_lens,
    layer_and_head_attribution,
    per_head_results_flag,
    patching_by_partial_hooks,
    head_scores_from_hooks,
    attention_scores_into_python,
    ablation_through_the_module_tree,
)
