"""``model.cfg``: TransformerLens 3.9's ``HookedTransformerConfig``, filled from the server.

Every field of TransformerLens's config exists here with its default and its derived values
(``n_heads``, ``d_mlp``, ``d_vocab_out``, ``rotary_dim``, ``attn_scale``, ``n_params``), so
``model.cfg.<name>`` reads as it does in TransformerLens. Two client-side choices:

* ``device`` is where the client's tensors live (``"cpu"``): notebooks write
  ``tokens.to(model.cfg.device)``, which must work on a laptop without the server's GPU. The
  server's device is ``server_device``.
* Fields the server adds that TransformerLens has not (``processing``, the weight processing it
  applied) are kept as plain attributes, and ``to_dict()`` includes them.
"""

from __future__ import annotations

import dataclasses
import math
import pprint
import random
from typing import Any

import torch


def _dtype(value: object) -> torch.dtype:
    """``"float32"``, ``"torch.bfloat16"`` or a torch dtype, as a torch dtype."""
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {value!r}")
    return dtype


@dataclasses.dataclass
class HookedTransformerConfig:
    """The fields and defaults of TransformerLens 3.9's ``HookedTransformerConfig``."""

    d_model: int
    d_head: int
    n_layers: int
    n_ctx: int
    n_heads: int = -1
    d_mlp: int | None = None
    d_vocab: int = -1
    device: str | None = None
    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    default_prepend_bos: bool = True
    positional_embedding_type: str = "standard"
    n_key_value_heads: int | None = None
    attn_only: bool = False
    gated_mlp: bool = False
    uses_rms_norm: bool = False
    eps: float = 1e-5
    layer_norm_folding: bool = False
    act_fn: str = "relu"
    normalization_type: str | None = "LN"
    num_experts: int | None = None
    experts_per_token: int | None = None
    final_rms: bool = False
    dtype: torch.dtype = torch.float32
    model_name: str = "custom"
    use_attn_scale: bool = True
    attn_scale: float = -1.0
    use_hook_mlp_in: bool = False
    use_attn_in: bool = False
    use_qk_norm: bool = False
    clip_qkv: float | None = None
    use_logn_attn: bool = False
    train_seq_length: int | None = None
    use_dynamic_ntk_rope: bool = False
    use_local_attn: bool = False
    ungroup_grouped_query_attention: bool = False
    original_architecture: str | None = None
    from_checkpoint: bool = False
    checkpoint_index: int | None = None
    checkpoint_label_type: str | None = None
    checkpoint_value: int | None = None
    tokenizer_name: str | None = None
    window_size: int | None = None
    attn_types: list[str] | None = None
    init_mode: str = "gpt2"
    n_devices: int = 1
    attention_dir: str = "causal"
    seed: int | None = None
    initializer_range: float = -1.0
    init_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    d_vocab_out: int = -1
    parallel_attn_mlp: bool = False
    rotary_dim: int | None = None
    n_params: int | None = None
    use_hook_tokens: bool = False
    tokenizer_prepends_bos: bool | None = None
    post_embedding_ln: bool = False
    rotary_base: float = 10000
    rotary_base_local: float | None = None
    rotary_scaling_factor: float = 1.0
    trust_remote_code: bool = False
    rotary_adjacent_pairs: bool = False
    load_in_4bit: bool = False
    quantization_method: str | None = None
    relative_attention_max_distance: int | None = None
    relative_attention_num_buckets: int | None = None
    decoder_start_token_id: int | None = None
    tie_word_embeddings: bool = False
    use_normalization_before_and_after: bool = False
    attn_scores_soft_cap: float = -1.0
    output_logits_soft_cap: float = -1.0
    use_NTK_by_parts_rope: bool = False
    NTK_by_parts_low_freq_factor: float = 1.0
    NTK_by_parts_high_freq_factor: float = 4.0
    NTK_by_parts_factor: float = 8.0
    NTK_original_ctx_len: int = 8192
    use_yarn_rope: bool = False
    yarn_factor: float = 1.0
    yarn_attention_factor: float = 1.0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_original_max_position_embeddings: int = 4096
    yarn_truncate: bool = True
    yarn_global_attn_only: bool = False
    use_attention_sinks: bool = False
    norm_topk_prob: bool = False
    # hooklab's own: the device the server runs the model on.
    server_device: str | None = dataclasses.field(default=None, init=False)

    def __post_init__(self) -> None:
        # The values TransformerLens derives when a field is left at its default.
        self.dtype = _dtype(self.dtype)
        if self.n_heads == -1:
            if self.d_model % self.d_head:
                raise ValueError(f"d_model ({self.d_model}) must divide by d_head ({self.d_head})")
            self.n_heads = self.d_model // self.d_head
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        if self.device is None:
            self.device = "cpu"
        if self.initializer_range < 0:
            self.initializer_range = (
                0.8 / math.sqrt(self.d_model) if self.init_mode == "gpt2" else 1.0
            )
        if self.d_vocab_out == -1:
            self.d_vocab_out = self.d_vocab
        if self.positional_embedding_type == "rotary" and self.rotary_dim is None:
            self.rotary_dim = self.d_head
        if self.use_attn_scale and self.attn_scale == -1.0:
            self.attn_scale = math.sqrt(self.d_head)
        self.n_params = self._count_hidden_params()

    def _count_hidden_params(self) -> int:
        """TransformerLens's ``n_params``: attention and MLP weight matrices only."""
        count = self.n_layers * self.d_model * self.d_head * self.n_heads * 4
        if not self.attn_only:
            assert self.d_mlp is not None
            per_layer = self.d_model * self.d_mlp * (2 + self.gated_mlp)
            if self.num_experts:
                per_layer = (per_layer + self.d_model) * self.num_experts
            count += self.n_layers * per_layer
        return count

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> HookedTransformerConfig:
        """A config from a dict of fields; a dtype may be given by name."""
        return cls(**config_dict)

    @classmethod
    def from_server(cls, fields: dict[str, Any]) -> HookedTransformerConfig:
        """The config of a served model (``GET /v1/model``'s ``cfg``). Fields TransformerLens
        lacks stay attributes; the client's tensors live on the CPU (``server_device`` is the
        server's)."""
        known = {spec.name for spec in dataclasses.fields(cls) if spec.init}
        values = {name: value for name, value in fields.items() if name in known}
        values["device"] = "cpu"
        config = cls(**values)
        for name, value in fields.items():
            if name not in known:
                setattr(config, name, value)
        config.server_device = fields.get("device")
        return config

    @classmethod
    def unwrap(cls, config: dict[str, Any] | HookedTransformerConfig) -> HookedTransformerConfig:
        return cls.from_dict(config) if isinstance(config, dict) else config

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return "HookedTransformerConfig:\n" + pprint.pformat(self.to_dict())

    def set_seed_everywhere(self, seed: int) -> None:
        torch.manual_seed(seed)
        random.seed(seed)

    def is_layer_norm_activation(self) -> bool:
        return self.act_fn is not None and self.act_fn.endswith("_ln")
