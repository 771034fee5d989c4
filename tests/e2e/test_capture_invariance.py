"""Through the real server and client: a request's numbers do not depend on what it captures.

The engine-level guarantee (``tests/engine/test_capture_invariance.py``) seen from a notebook: a
plain forward, ``run_with_cache`` of one name and of every hook point, and ``run_with_hooks`` with
a spec that leaves its activation as it is give ``torch.equal`` logits and activations — what
TransformerLens users check — and stay within 1e-4 of TransformerLens 3.9. Requests run one at a
time here, so none is merged with another's into a shared batch (which rounds differently).
"""

from __future__ import annotations

import torch

from hooklab import hooks

from .e2e_helpers import assert_close
from .e2e_servers import Served, sample_tokens


def test_same_bits_whatever_a_request_captures(server: Served) -> None:
    model = server.model
    tokens = sample_tokens(server.tl)
    last = f"blocks.{server.tl.cfg.n_layers - 1}"
    resid, pattern = f"{last}.hook_resid_post", "blocks.0.attn.hook_pattern"

    plain = torch.as_tensor(model(tokens))
    one_logits, one = model.run_with_cache(tokens, names_filter=resid, return_cache_object=False)
    full_logits, full = model.run_with_cache(tokens, return_cache_object=False)
    unchanged = torch.as_tensor(
        model.run_with_hooks(tokens, fwd_hooks=[(pattern, hooks.scale(1.0))])
    )

    for what, logits in (("one name", one_logits), ("full", full_logits), ("scale 1", unchanged)):
        assert torch.equal(torch.as_tensor(logits), plain), f"logits of {what} != plain forward"
    assert torch.equal(one[resid], full[resid]), f"{resid}: one-name cache != full cache"

    ref_logits, ref = server.tl.run_with_cache(tokens, names_filter=[resid, pattern])
    assert_close(plain, ref_logits, "logits")
    assert_close(full[resid], ref[resid], resid)
    assert_close(full[pattern], ref[pattern], pattern)
