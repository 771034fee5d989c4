"""hooklab's hooked-transformer runtime: TransformerLens 3.9 semantics in plain PyTorch.

model = load_model("gpt2")                      # or a local folder, or a .gguf file
logits, cache = model.run_with_cache(tokens)    # every hook point, TransformerLens names
model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", fn)])
model.generate(tokens, max_new_tokens=20)
pool = DecodePool(model, max_rows=16, max_positions=512)   # continuous batching of generations
"""

from .catalogue import act_names, hook_names
from .config import HookedConfig
from .decode_pool import DecodePool, PoolFull, RowGroup
from .hook_points import HookPoint, HookRun
from .loading import from_hf, load_hf, load_model, load_model_no_processing
from .model import (
    HookedTransformer,
    KVCache,
    Output,
    autograd_on,
    backward,
    lm_cross_entropy_loss,
)

__all__ = [
    "DecodePool",
    "HookPoint",
    "HookRun",
    "HookedConfig",
    "HookedTransformer",
    "KVCache",
    "Output",
    "PoolFull",
    "RowGroup",
    "act_names",
    "autograd_on",
    "backward",
    "from_hf",
    "hook_names",
    "lm_cross_entropy_loss",
    "load_hf",
    "load_model",
    "load_model_no_processing",
]
