"""The model's configuration, and the arithmetic that needs nothing but the configuration.

`ModelConfig` is what `model.json` stores next to the weights and, with its
field docstrings, the `model` section of the pipeline's config, so its field
names and defaults are a file format: a new field gets a default that reproduces the
model as it was before the field existed (learned positions, LayerNorm, exact
GELU, tied unembedding, one KV head per query head, a pre-norm decoder).
`param_count` counts
parameters from the config alone (the presets table and the FLOPs estimate use it
without building a model); `flops_per_token` is the training cost used for MFU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

POS_ENCODINGS = ("learned", "sinusoidal", "rope", "alibi", "none", "t5", "xl")
MEMORY_POS_ENCODINGS = ("xl", "rope", "alibi", "none")  # relative: defined across a segment boundary
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "gelu_tanh", "swiglu", "relu", "geglu")
ROPE_SCALINGS = ("none", "linear", "ntk", "yarn")
FAMILIES = ("decoder", "encoder", "encoder-decoder", "xlnet")
GATED_MLPS = ("swiglu", "geglu")
NORM_POSITIONS = ("pre", "post")


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"ModelConfig.{field}: {message}")


@dataclass
class ModelConfig:
    """The transformer's architecture; also the `model` section of an experiment config (one declaration)."""

    # Read by pydantic when the pipeline validates a config (a plain dict: this module does not import pydantic).
    __pydantic_config__ = {"extra": "forbid", "use_attribute_docstrings": True, "allow_inf_nan": False}

    vocab_size: int | None = None
    """Vocabulary size; in a pipeline config it comes from the tokenizer, never from this section."""
    family: Literal["decoder", "encoder", "encoder-decoder", "xlnet"] = "decoder"
    """decoder: causal self-attention and a next-token head (GPT, LLaMA); encoder: bidirectional self-attention and a masked-LM head, a dense layer + norm before the unembedding (BERT, RoBERTa); encoder-decoder: an encoder stack and a decoder stack whose blocks also attend to the encoder's output (T5); xlnet: a Transformer-XL stack (pos_encoding xl) with XLNet's two-stream attention, trained on permutation language modelling."""
    norm_position: Literal["pre", "post"] = "pre"
    """pre: a norm before each sub-layer and one at the end (GPT-2, LLaMA); post: a norm after each residual addition and one over the embeddings, none at the end (the original paper's sub-layers, BERT's embeddings)."""
    n_layer: int = 4
    """Transformer blocks (an encoder-decoder: the encoder's)."""
    n_decoder_layer: int | None = None
    """encoder-decoder: the decoder's blocks (default n_layer); unset for the other families."""
    n_head: int = 4
    """Attention (query) heads."""
    n_kv_head: int | None = None
    """Key/value heads: n_head (multi-head, default), a divisor (grouped-query), 1 (multi-query)."""
    d_model: int = 128
    """Residual stream width; head_dim = d_model / n_head."""
    d_ff: int | None = None
    """MLP hidden width (default 4 * d_model; about 8/3 * d_model for SwiGLU, rounded up to a multiple of 64)."""
    max_seq_len: int = 256
    """Training context; the size of a learned position table."""
    pos_encoding: Literal["learned", "sinusoidal", "rope", "alibi", "none", "t5", "xl"] = "learned"
    """Positional encoding (all but learned can score windows longer than max_seq_len); t5: T5's bucketed relative position bias, one table per stack shared by its layers (encoder-decoder only, for now); xl: Transformer-XL's relative encoding, sinusoids of the distance projected per layer plus the learned content and position biases u and v (decoder only)."""
    memory_len: int = 0
    """Transformer-XL segment memory: each layer also attends over the previous memory_len positions' hidden states, carried detached from the previous segment (training then reads consecutive windows per batch row); 0: none. Needs a relative encoding: xl, rope, alibi or none."""
    rel_buckets: int = 32
    """t5: relative-position buckets (half exact, half logarithmic; an encoder's split by direction)."""
    rel_max_distance: int = 128
    """t5: distances from here on share the last bucket."""
    scale_attention: bool = True
    """Divide attention scores by sqrt(head_dim); T5 does not (its initialisation absorbs the scale)."""
    rope_theta: float = 10000.0
    """RoPE base wavelength."""
    rope_scaling: Literal["none", "linear", "ntk", "yarn"] = "none"
    """RoPE context extension used in training: position interpolation, NTK-aware base, or YaRN."""
    rope_factor: float = 1.0
    """Context extension factor for rope_scaling."""
    rope_original_max_seq_len: int | None = None
    """The context the RoPE was first trained at (YaRN's reference; default max_seq_len)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalisation."""
    mlp: Literal["gelu", "gelu_tanh", "swiglu", "relu", "geglu"] = "gelu"
    """MLP activation: exact GELU, GPT-2's tanh approximation, LLaMA's SwiGLU, ReLU (T5), or GEGLU (T5 v1.1's gated tanh-GELU)."""
    tie_embeddings: bool = True
    """Share the token embedding with the unembedding."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and residual branches (training only)."""
    bias: bool = True
    """Biases in every linear layer and in LayerNorm."""
    norm_eps: float = 1e-5
    """Normalisation epsilon."""
    init_std: float = 0.02
    """Init std; residual output projections get init_std / sqrt(2 * n_layer)."""
    activation_checkpointing: bool = field(default=False, metadata={"fingerprint": False})
    """Recompute each block in the backward pass (less memory, same result)."""

    def __post_init__(self) -> None:
        _check(self.vocab_size is None or self.vocab_size > 0, "vocab_size", f"must be > 0, got {self.vocab_size}")
        for name in ("n_layer", "n_head", "d_model", "max_seq_len"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _check(self.d_model % self.n_head == 0, "d_model", f"{self.d_model} is not divisible by n_head {self.n_head}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        _check(self.n_kv_head > 0 and self.n_head % self.n_kv_head == 0, "n_kv_head",
               f"{self.n_kv_head} must divide n_head {self.n_head}")
        _check(self.pos_encoding in POS_ENCODINGS, "pos_encoding", f"{self.pos_encoding!r} is not one of {POS_ENCODINGS}")
        _check(self.norm in NORMS, "norm", f"{self.norm!r} is not one of {NORMS}")
        _check(self.mlp in MLPS, "mlp", f"{self.mlp!r} is not one of {MLPS}")
        _check(self.family in FAMILIES, "family", f"{self.family!r} is not one of {FAMILIES}")
        _check(self.norm_position in NORM_POSITIONS, "norm_position", f"{self.norm_position!r} is not one of {NORM_POSITIONS}")
        _check(self.rope_scaling in ROPE_SCALINGS, "rope_scaling", f"{self.rope_scaling!r} is not one of {ROPE_SCALINGS}")
        _check(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
        _check(self.rope_factor >= 1.0, "rope_factor", f"must be >= 1, got {self.rope_factor}")
        _check(self.rope_original_max_seq_len is None or self.rope_original_max_seq_len >= 1, "rope_original_max_seq_len",
               f"must be >= 1, got {self.rope_original_max_seq_len}")
        _check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        _check(self.norm_eps > 0 and self.init_std > 0, "norm_eps/init_std", f"must be > 0, got {self.norm_eps}/{self.init_std}")
        if self.pos_encoding == "rope":
            _check(self.head_dim % 2 == 0, "d_model", f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.family == "encoder-decoder" and self.n_decoder_layer is None:
            self.n_decoder_layer = self.n_layer
        _check(self.n_decoder_layer is None or (self.family == "encoder-decoder" and self.n_decoder_layer >= 1),
               "n_decoder_layer", f"must be >= 1 and only an encoder-decoder has one, got {self.n_decoder_layer} "
               f"with family {self.family!r}")
        _check(self.rel_buckets >= 2 and self.rel_max_distance >= 1, "rel_buckets",
               f"rel_buckets must be >= 2 and rel_max_distance >= 1, got {self.rel_buckets}, {self.rel_max_distance}")
        _check((self.pos_encoding == "t5") == (self.family == "encoder-decoder"), "pos_encoding",
               f"an encoder-decoder takes pos_encoding 't5' and only it takes that (for now): got "
               f"{self.pos_encoding!r} with family {self.family!r}")
        _check(self.pos_encoding != "xl" or self.family in ("decoder", "xlnet"), "pos_encoding",
               f"'xl' is a decoder's or XLNet's encoding (for now), not {self.family!r}'s")
        _check(self.family != "xlnet" or self.pos_encoding == "xl", "pos_encoding",
               f"XLNet takes Transformer-XL's relative encoding, pos_encoding 'xl', got {self.pos_encoding!r}")
        _check(self.memory_len >= 0, "memory_len", f"must be >= 0, got {self.memory_len}")
        _check(self.memory_len == 0 or (self.family in ("decoder", "xlnet") and self.pos_encoding in MEMORY_POS_ENCODINGS),
               "memory_len", f"a segment memory needs a decoder or XLNet with a relative pos_encoding {MEMORY_POS_ENCODINGS}: "
               f"absolute positions restart in every segment, so the memory's would clash; got family "
               f"{self.family!r}, pos_encoding {self.pos_encoding!r}")
        if self.d_ff is None:
            # SwiGLU has three matrices instead of two: 8/3 * d keeps the MLP's parameters at ~8 d^2 (LLaMA),
            # rounded up to a multiple of 64 for friendly matmul shapes.
            self.d_ff = 4 * self.d_model if self.mlp not in GATED_MLPS else 64 * math.ceil(8 * self.d_model / 3 / 64)
        _check(self.d_ff >= 1, "d_ff", f"must be >= 1, got {self.d_ff}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def causal(self) -> bool:
        """Whether each position attends only to itself and the positions before it (the decoder)."""
        return self.family == "decoder"

    @property
    def rope_original_len(self) -> int:
        return self.rope_original_max_seq_len or self.max_seq_len

    def to_dict(self) -> dict:
        return asdict(self)


def param_count(cfg: ModelConfig) -> int:
    """Parameters of `GPT(cfg)`, counted from the config alone (a tied matrix counts once). Pre- and post-norm
    have as many norms (post-norm's embedding norm stands in for the final one)."""
    d, hd = cfg.d_model, cfg.head_dim
    norm = d * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    b = int(cfg.bias)
    qkv_out = (cfg.n_head + 2 * cfg.n_kv_head) * hd
    attn = d * qkv_out + b * qkv_out + cfg.n_head * hd * d + b * d
    up = 2 * cfg.d_ff if cfg.mlp in GATED_MLPS else cfg.d_ff
    mlp = d * up + b * up + cfg.d_ff * d + b * d
    if cfg.pos_encoding == "xl":  # per layer: the distance projection and the biases u and v
        attn += d * cfg.n_head * hd + 2 * cfg.n_head * hd
    if cfg.family == "xlnet":  # attention without biases; the query stream's start vector; the unembedding's bias
        attn -= b * (qkv_out + d)
        final = norm if cfg.norm_position == "pre" else 0
        return cfg.vocab_size * d + cfg.n_layer * (2 * norm + attn + mlp) + final + d + cfg.vocab_size \
            + (0 if cfg.tie_embeddings else cfg.vocab_size * d)
    total = cfg.vocab_size * d + cfg.n_layer * (2 * norm + attn + mlp) + norm
    if cfg.family == "encoder-decoder":  # the decoder: self-attention, cross-attention, MLP, three norms; two bias tables
        cross = d * cfg.n_head * hd + b * cfg.n_head * hd + d * 2 * cfg.n_kv_head * hd + b * 2 * cfg.n_kv_head * hd \
            + cfg.n_head * hd * d + b * d
        total += cfg.n_decoder_layer * (3 * norm + attn + cross + mlp) + norm + 2 * cfg.rel_buckets * cfg.n_head
    total += cfg.max_seq_len * d if cfg.pos_encoding == "learned" else 0
    total += 0 if cfg.tie_embeddings else cfg.vocab_size * d
    if cfg.family == "encoder":  # the masked-LM head: dense d -> d, a norm, and a bias on the unembedding
        total += d * d + b * d + norm + b * cfg.vocab_size
    return total


def flops_per_token(cfg: ModelConfig, *, seq_len: int | None = None) -> int:
    """Training FLOPs (forward + backward) per token at context `seq_len` (default max_seq_len).

    6N + 12 * n_layer * d_model * seq_len, as in the PaLM paper (appendix B) and the
    Chinchilla paper (appendix F): 2 FLOPs per multiply-add in the forward pass and
    twice that in the backward pass over every parameter that takes part in a matmul,
    plus the attention scores and the weighted sum of values (QK^T and AV: 2 * 2 *
    n_layer * seq_len * d_model forward, x3 with the backward pass; the causal mask
    is not discounted, as in both papers; a segment memory adds its memory_len keys). N excludes embedding *lookups* (the
    position table, and the token table when the unembedding is a separate matrix)
    and includes the unembedding matmul. MFU = tokens/s * flops_per_token / peak FLOP/s.
    """
    T = seq_len if seq_len is not None else cfg.max_seq_len
    lookups = (cfg.max_seq_len * cfg.d_model if cfg.pos_encoding == "learned" else 0)
    lookups += 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    n_matmul = param_count(cfg) - lookups
    return 6 * n_matmul + 12 * cfg.n_layer * cfg.d_model * (T + cfg.memory_len)  # a memory adds keys to attend
