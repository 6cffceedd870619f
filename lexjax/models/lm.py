"""The language-model base every model of the zoo builds on.

`LanguageModel` owns what all the models share: the fields every model config binds (vocabulary,
depth, width, MLP width, position scheme, norm, tied logits, dropout, compute dtype, remat), the
token embedding with any absolute position embedding, the output logits, remat, packed-document
segment ids, and one incremental-decoding interface. A model subclasses it and writes its
`backbone` (the layers between the embedding and the logits); `AttentionLanguageModel` adds the
fields and the block of models built from multi-head attention layers.

Calling convention (every model):

    logits = model.apply(variables, tokens, segment_ids=None, deterministic=True)
    # tokens int32 [batch, length] -> float32 logits [batch, length, vocab] (Perceiver AR: the
    # last min(length, num_latents) positions), causal.

`segment_ids` (int32 `[batch, length]`, packed documents) keep documents apart: a model whose
`keeps_segments_apart` is True gives each document of a packed row the logits it would get alone;
any other model refuses them with a `ValueError` naming why (its architecture mixes the whole
row), and the trainer feeds it padded rows instead (lexjax.data).

Decoding (every model), pure functions of the variables and a cache pytree:

    logits, cache = model.prefill(variables, prompt, max_length=256)  # [b, n] -> [b, n', vocab]
    logits, cache = model.decode_step(variables, cache, token)         # [b] -> [b, vocab]

Inside, a decode call is `model.apply({"params": p, "cache": cache}, tokens, decode=True,
mutable=["cache"])`: the model reads its tokens' positions from the cache's `index`, and its
layers read and update their own cache entries (`lexjax.layers.decoding`). Models whose decode
call takes a whole chunk of tokens (`decodes_chunks`) prefill in one pass; the others step
through the prompt one token at a time.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lexjax.attention import MaskSpec
from lexjax.layers import Embedding, Norm, compute_dtype, dense, make_norm, with_activation_axes
from lexjax.layers.decoder import NORM_POSITIONS, DecoderLayer
from lexjax.layers.mlp import MLP_ACTIVATIONS
from lexjax.positions import PositionScheme
from lexjax.positions.base import PrebuiltBias

# The size macros of configs/models/*.gin, by field: error messages name what a user sets.
MACROS = {"vocab_size": "VOCAB_SIZE", "num_layers": "NUM_LAYERS", "embed_dim": "EMBED_DIM",
          "mlp_dim": "MLP_DIM", "num_heads": "NUM_HEADS", "dtype": "DTYPE",
          "chunk_size": "CHUNK_SIZE"}

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

# The "cache" collection of a decoding model: a pytree of arrays.
Cache = Any


def segment_positions(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """int32 `[batch, length]`: each token's position within its segment (a run of equal ids)."""
    length = segment_ids.shape[1]
    index = jnp.arange(length, dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


class LanguageModel(nn.Module, kw_only=True):
    """Base of every LM: int32 tokens `[batch, length]` -> float32 logits `[batch, length,
    vocab_size]` (see the module docstring).

    Attributes:
      vocab_size, num_layers, embed_dim, mlp_dim: the size macros (VOCAB_SIZE, NUM_LAYERS,
        EMBED_DIM, MLP_DIM); what a "layer" and the MLP width mean is the model's to say.
      position: the position scheme (a `PositionScheme` template), or None for none at all.
      norm: "rmsnorm" or "layernorm", or a `lexjax.layers.Norm` (epsilon, bias).
      tie_embeddings: logits from the token embedding (scaled by embed_dim^-0.5 when
        `scale_tied_logits`), else a separate `logits` projection.
      embedding_norm: a norm after the token (and absolute position) embedding (BLOOM, BERT).
      logits_bias: a learned bias `[vocab]` on the logits (BERT's MLM head).
      dropout_rate: embedding and residual dropout (training only).
      dtype: compute dtype name; parameters and logits are float32.
      remat_policy: one of `REMAT_POLICIES`, applied to each layer in training.
    """

    vocab_size: int
    num_layers: int
    embed_dim: int
    mlp_dim: int
    position: Optional[PositionScheme] = None
    norm: str | Norm = "rmsnorm"
    tie_embeddings: bool = True
    scale_tied_logits: bool = True
    embedding_norm: bool = False
    logits_bias: bool = False
    dropout_rate: float = 0.0
    dtype: str = "float32"
    remat_policy: str = "none"

    # What the architecture does; subclasses override.
    final_norm: ClassVar[bool] = True  # a norm between the backbone and the logits
    decodes_chunks: ClassVar[bool] = False  # a decode call takes several tokens (one-pass prefill)
    mixes_segments: ClassVar[Optional[str]] = None  # why packed documents cannot be kept apart
    padding_side: ClassVar[str] = "right"  # where padded training rows put their padding
    bidirectional: ClassVar[bool] = False  # every position sees the whole input (an encoder)

    def __post_init__(self):
        self.check()  # a bad field fails where the model is built (build_model: a ConfigError)
        super().__post_init__()

    @nn.nowrap
    def field_name(self, field: str) -> str:
        """`Class.field (MACRO)`, how error messages name a field."""
        macro = f" ({MACROS[field]})" if field in MACROS else ""
        return f"{type(self).__name__}.{field}{macro}"

    # -- what a subclass provides -------------------------------------------------------------
    def backbone(self, x: jnp.ndarray, positions: jnp.ndarray, *,
                 segment_ids: Optional[jnp.ndarray], deterministic: bool,
                 decode: bool) -> jnp.ndarray:
        """The layers: embedded tokens `[batch, length, embed]` at `positions [length]` ->
        hidden states `[batch, length', embed]` for the logits."""
        raise NotImplementedError(f"{type(self).__name__} must define backbone()")

    @nn.nowrap
    def check(self) -> None:
        """Raises a ValueError naming a bad field; subclasses extend it (call super)."""
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {self.remat_policy!r}; use one of "
                             f"{sorted(REMAT_POLICIES)}")
        for name in ("vocab_size", "num_layers", "embed_dim", "mlp_dim"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{self.field_name(name)} must be a positive int, got "
                                 f"{value!r}")
        try:
            compute_dtype(self.dtype)
        except ValueError as e:
            raise ValueError(f"{self.field_name('dtype')}: {e}") from None

    # -- the forward pass ---------------------------------------------------------------------
    @property
    def keeps_segments_apart(self) -> bool:
        """Whether `segment_ids` are honoured exactly (else they are refused)."""
        return self.mixes_segments is None

    @property
    def packs_documents(self) -> bool:
        """Whether training rows pack several documents (told apart by segment ids); else each
        row holds one document piece, padded (`lexjax.training.inputs`)."""
        return self.keeps_segments_apart

    @property
    def compute_dtype(self) -> jnp.dtype:
        return compute_dtype(self.dtype)

    @property
    def max_positions(self) -> Optional[int]:
        """The most positions the model reads (its position scheme's table; None: any)."""
        return None if self.position is None else self.position.max_positions

    @property
    def position_template(self) -> Optional[PositionScheme]:
        """An unbound copy of `position` for the layers to clone (each attention layer clones it,
        so learned biases are per layer; unbound, so a scanned stack does not lift the model's
        own position parameters, such as a learned absolute table)."""
        return None if self.position is None else self.position.clone(parent=None)

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, *, segment_ids: Optional[jnp.ndarray] = None,
                 deterministic: bool = True, decode: bool = False) -> jnp.ndarray:
        """int32 `tokens [batch, length]` -> float32 logits `[batch, length', vocab]`.

        Args:
          segment_ids: optional int32 `[batch, length]`: packed documents, kept apart.
          deterministic: no dropout (evaluation); False needs a "dropout" rng.
          decode: consume the tokens after those the "cache" collection holds (see the module
            docstring); at cache creation (`init`) this sizes the cache.
        """
        self.check_inputs(tokens, segment_ids, decode)
        positions = self.token_positions(tokens.shape[1], decode)
        embedding = self.token_embedding()
        x = self.embed(embedding, tokens, positions, segment_ids, deterministic)
        x = self.backbone(x, positions, segment_ids=segment_ids, deterministic=deterministic,
                          decode=decode)
        return self.head(embedding, x, segment_ids=segment_ids, deterministic=deterministic)

    def head(self, embedding: Embedding, x: jnp.ndarray, *, segment_ids: Optional[jnp.ndarray],
             deterministic: bool) -> jnp.ndarray:
        """The model's outputs from the backbone's hidden states `[batch, length, embed]`: the
        LM's float32 logits `[batch, length, vocab]` (`output_logits`); encoders add heads."""
        return self.output_logits(embedding, x)

    @nn.nowrap
    def check_inputs(self, tokens: jnp.ndarray, segment_ids: Optional[jnp.ndarray],
                     decode: bool) -> None:
        """Clear errors for bad token shapes and segment ids."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be int32 [batch, length], got shape {tokens.shape}")
        if segment_ids is None:
            return
        if not self.keeps_segments_apart:
            raise ValueError(
                f"{type(self).__name__} cannot keep packed documents apart: "
                f"{self.mixes_segments}. Call it without segment_ids (the trainer feeds such "
                "models padded rows, one document piece each)")
        if decode:
            raise ValueError("segment_ids are for packed training rows, not for decoding")
        if segment_ids.shape != tokens.shape:
            raise ValueError(f"segment_ids must have the tokens' shape {tokens.shape}, got "
                             f"{segment_ids.shape}")

    def token_positions(self, length: int, decode: bool) -> jnp.ndarray:
        """int32 positions `[length]` of the tokens: 0..length-1 as a numpy constant (rotation
        tables then fold into the compiled step), or, when decoding, the next `length`
        positions after those the cache holds (its `index`, advanced here)."""
        if not decode:
            return np.arange(length, dtype=np.int32)
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        positions = index.value + jnp.arange(length, dtype=jnp.int32)
        if not self.is_initializing():
            index.value = index.value + length
        return positions

    def token_embedding(self) -> Embedding:
        """The token embedding table `[vocab, embed]` (also the tied output projection)."""
        return Embedding(self.vocab_size, self.embed_dim, dtype=self.compute_dtype,
                         name="token_embedding")

    def embed(self, embedding: Embedding, tokens: jnp.ndarray, positions: jnp.ndarray,
              segment_ids: Optional[jnp.ndarray], deterministic: bool) -> jnp.ndarray:
        """Token embeddings plus any absolute position embedding (at each token's position
        within its segment when `segment_ids` are given), normalised if `embedding_norm`, after
        dropout: `[b, n, embed]`."""
        x = embedding(tokens)
        if self.position is not None:
            where = positions if segment_ids is None else segment_positions(segment_ids)
            absolute = self.position.embed(where, self.embed_dim)
            if absolute is not None:
                x = x + absolute.astype(x.dtype)
        if self.embedding_norm:
            x = make_norm(self.norm, dtype=self.compute_dtype, name="embedding_norm")(x)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        return with_activation_axes(x)

    def output_logits(self, embedding: Embedding, x: jnp.ndarray) -> jnp.ndarray:
        """float32 logits `[batch, length, vocab]` from hidden states `[batch, length, embed]`:
        the final norm (unless the model has none), then the tied embedding (scaled by
        embed_dim^-0.5) or a separate `logits` projection."""
        if self.has_final_norm:
            x = self.final_normalization(x)
        return self.vocab_logits(embedding, x)

    @property
    def has_final_norm(self) -> bool:
        """Whether a norm sits between the backbone and the outputs (`final_norm`)."""
        return self.final_norm

    @property
    def projections_have_bias(self) -> bool:
        """Whether the model's dense projections carry biases (heads follow it)."""
        return False

    def final_normalization(self, x: jnp.ndarray) -> jnp.ndarray:
        """The norm between the backbone and the outputs, `final_norm`: `[b, n, embed]`."""
        return make_norm(self.norm, dtype=self.compute_dtype, name="final_norm")(x)

    def vocab_logits(self, embedding: Embedding, x: jnp.ndarray) -> jnp.ndarray:
        """float32 logits `[batch, length, vocab]`: the tied embedding (scaled by
        embed_dim^-0.5 if `scale_tied_logits`), or a separate `logits` projection, of
        `x [batch, length, embed]`; plus `logits_bias`."""
        if self.tie_embeddings:
            logits = embedding.attend(x)
            if self.scale_tied_logits:
                logits = logits * (self.embed_dim ** -0.5)
        else:
            logits = dense(self.vocab_size, ("embed", "vocab"), dtype=x.dtype,
                           name="logits")(x).astype(jnp.float32)
        if self.logits_bias:
            logits = logits + self.param(
                "logits_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                (self.vocab_size,), jnp.float32)
        return logits

    @nn.nowrap
    def remat(self, layer_cls: type[nn.Module], decode: bool = False,
              scanned: bool = False) -> type[nn.Module]:
        """`layer_cls`, rematerialized under `remat_policy` in training (not when decoding)."""
        if self.remat_policy == "none" or decode:
            return layer_cls
        return nn.remat(layer_cls, policy=REMAT_POLICIES[self.remat_policy],
                        prevent_cse=not scanned)

    # -- decoding -----------------------------------------------------------------------------
    @nn.nowrap
    def init_cache(self, batch_size: int, max_length: int) -> Cache:
        """The empty cache for decoding `batch_size` sequences of up to `max_length` tokens:
        the "cache" collection a decode call on `max_length` tokens creates, zero-filled (no
        parameters are initialised)."""
        tokens = jax.ShapeDtypeStruct((batch_size, max_length), jnp.int32)
        shapes = jax.eval_shape(
            lambda t: self.init(jax.random.PRNGKey(0), t, decode=True), tokens)
        return jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes["cache"])

    @nn.nowrap
    def _decode_call(self, variables: Any, cache: Cache, tokens: jnp.ndarray
                     ) -> tuple[jnp.ndarray, Cache]:
        """One decode call: `tokens [batch, n]` after those in `cache` -> (their logits, the
        updated cache). Several tokens at once only from `prefill` (an empty cache) for models
        that `decodes_chunks`."""
        logits, updated = self.apply({"params": variables["params"], "cache": cache}, tokens,
                                     decode=True, mutable=["cache"])
        return logits, updated["cache"]

    @nn.nowrap
    def prefill(self, variables: Any, prompt: jnp.ndarray, *, max_length: int
                ) -> tuple[jnp.ndarray, Cache]:
        """Reads `prompt [batch, n]` (1 <= n <= max_length) into a fresh cache for decoding up to
        `max_length` tokens in all. Returns the forward pass's logits on the prompt (their last
        row predicts token n) and the cache for `decode_step`."""
        batch, n = prompt.shape
        if not 1 <= n <= max_length:
            raise ValueError(f"prefill needs 1 <= prompt length ({n}) <= max_length "
                             f"({max_length})")
        if self.max_positions is not None and max_length > self.max_positions:
            raise ValueError(f"max_length {max_length} exceeds the {self.max_positions} "
                             f"positions {type(self).__name__} can read (its position table)")
        cache = self.init_cache(batch, max_length)
        if self.decodes_chunks:
            return self._decode_call(variables, cache, prompt)

        def step(cache, token):
            logits, cache = self._decode_call(variables, cache, token[:, None])
            return cache, logits[:, -1]

        cache, logits = jax.lax.scan(step, cache, jnp.swapaxes(prompt, 0, 1))
        return jnp.swapaxes(logits, 0, 1), cache

    @nn.nowrap
    def decode_step(self, variables: Any, cache: Cache, token: jnp.ndarray
                    ) -> tuple[jnp.ndarray, Cache]:
        """Consumes `token [batch]` (int32) after those in `cache`; returns the logits
        `[batch, vocab]` predicting the next token, and the updated cache. Positions must stay
        below the cache's `max_length` (not checked under jit: a full-mask key/value cache then
        keeps only the last `max_length` keys, and other caches are not valid)."""
        logits, cache = self._decode_call(variables, cache, token[:, None])
        return logits[:, -1], cache


class ChunkedAttention:
    """A mixin for models whose attention stays inside non-overlapping chunks of their
    `chunk_size` field (None, where a model allows it: every earlier token)."""

    @property
    def mask(self) -> MaskSpec:
        """Causal attention within chunks of `chunk_size` (all earlier tokens when None)."""
        return MaskSpec(causal=True, chunk=self.chunk_size)

    @nn.nowrap
    def check_chunk_size(self, none_means: Optional[str]) -> None:
        """A ValueError unless `chunk_size` is a positive int, or None when `none_means`
        names what None selects (e.g. "FLASH-Quad")."""
        size = self.chunk_size
        if size is None and none_means:
            return
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            allowed = f" or None ({none_means})" if none_means else ""
            raise ValueError(f"{self.field_name('chunk_size')} must be a positive int{allowed}, "
                             f"got {size!r}")


class AttentionLanguageModel(LanguageModel, kw_only=True):
    """A `LanguageModel` whose layers include multi-head (grouped-query) attention blocks.

    Attributes:
      num_heads: query heads (NUM_HEADS); num_kv_heads: key/value heads (None = num_heads).
      head_dim: per-head width (None = embed_dim // num_heads).
      mlp_activation: one of `lexjax.layers.mlp.MLP_ACTIVATIONS` ("gelu", "gelu_exact",
        "squared_relu", "silu", "swiglu").
      attention_impl: the `lexjax.attention.attend` implementation ("auto", "xla",
        "reference", "pallas", ...).
      attention_block_size: block length of blocked implementations (None: their default).
      share_relative_bias: one relative-bias table for every layer (T5's choice, and SPADE's
        reference), built once under "shared_position"; False (default): a table per layer.
    """

    num_heads: int
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    mlp_activation: str = "gelu"
    attention_impl: str = "auto"
    attention_block_size: Optional[int] = None
    share_relative_bias: bool = False

    #: the block of the stack: a `DecoderLayer`, or a subclass with another attention (YOSO,
    #: kernelized attention), whose extra fields `decoder_layer_fields` adds
    layer_class: ClassVar[type[DecoderLayer]] = DecoderLayer

    @property
    def head_features(self) -> int:
        """The per-head width: `head_dim`, or embed_dim // num_heads."""
        return self.head_dim or self.embed_dim // self.num_heads

    @property
    def key_value_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @nn.nowrap
    def check(self) -> None:
        super().check()
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f"{self.field_name('mlp_activation')} must be one of "
                             f"{MLP_ACTIVATIONS}, got {self.mlp_activation!r}")
        if self.num_heads < 1 or self.num_heads % self.key_value_heads:
            raise ValueError(f"{self.field_name('num_heads')} = {self.num_heads} must be a "
                             f"positive multiple of num_kv_heads ({self.key_value_heads})")
        if self.head_dim is None and self.embed_dim % self.num_heads:
            raise ValueError(f"{self.field_name('embed_dim')} = {self.embed_dim} does not split "
                             f"into {self.num_heads} heads (NUM_HEADS); change one, or set "
                             f"{type(self).__name__}.head_dim")

    def decoder_layer(self, mask: MaskSpec, *, deterministic: bool, decode: bool, name: str,
                      scanned: bool = False) -> DecoderLayer:
        """A Transformer block (`layer_class`) of this model's sizes under `mask`
        (rematerialized in training under `remat_policy`)."""
        layer_cls = self.remat(self.layer_class, decode, scanned)
        return layer_cls(**self.decoder_layer_fields(mask, deterministic, decode), name=name)

    @nn.nowrap
    def decoder_layer_fields(self, mask: MaskSpec, deterministic: bool, decode: bool) -> dict:
        """The `DecoderLayer` fields of this model under `mask`."""
        return dict(num_heads=self.num_heads, head_dim=self.head_features, mlp_dim=self.mlp_dim,
                    position=self.layer_position(), mask=mask,
                    num_kv_heads=self.num_kv_heads,
                    norm=self.norm, mlp_activation=self.mlp_activation,
                    dropout_rate=self.dropout_rate, attention_impl=self.attention_impl,
                    attention_block_size=self.attention_block_size, dtype=self.compute_dtype,
                    deterministic=deterministic, decode=decode)

    def setup(self):
        if self.share_relative_bias and self.position is not None:
            self.shared_position = self.position_template

    @nn.nowrap
    def layer_position(self) -> Optional[PositionScheme]:
        """The position scheme the attention layers clone: `position_template`, or with
        `share_relative_bias` a `PrebuiltBias` holding the one shared table's bias."""
        template = self.position_template
        if not self.share_relative_bias or template is None:
            return template
        bias = self.shared_position.relative_bias(self.num_heads, self.head_features)
        return PrebuiltBias(scheme=template, bias=bias, parent=None)

    @nn.nowrap
    def block_macs(self, keys_per_query: float) -> float:
        """Multiply-adds per token of one decoder block's matmuls: the q, k, v and output
        projections, the MLP, and scores and values over `keys_per_query` keys."""
        projections = self.embed_dim * self.head_features * 2 * (self.num_heads
                                                                 + self.key_value_heads)
        mlp = self.embed_dim * self.mlp_dim * (3 if self.mlp_activation == "swiglu" else 2)
        return projections + mlp + 2 * self.num_heads * self.head_features * keys_per_query


class BlockLayout(nn.Module, kw_only=True):
    """Where the norms of a model's `DecoderLayer` blocks sit and whether its projections carry
    biases: the layouts official checkpoints need (`lexjax.convert`). Mix in before the
    `AttentionLanguageModel` it extends (`class MyModel(BlockLayout, AttentionLanguageModel)`).

    Attributes:
      norm_position: "pre" (norms before each branch, and a final norm) or "post" (BERT's
        norms after each residual sum, no final norm).
      use_bias: the attention and MLP projections (and an MLM head's transform) have biases.
    """

    norm_position: str = "pre"
    use_bias: bool = False

    @nn.nowrap
    def check(self) -> None:
        super().check()
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(f"{self.field_name('norm_position')} must be one of "
                             f"{NORM_POSITIONS}, got {self.norm_position!r}")

    @property
    def has_final_norm(self) -> bool:
        return self.final_norm and self.norm_position == "pre"

    @property
    def projections_have_bias(self) -> bool:
        return self.use_bias

    @nn.nowrap
    def decoder_layer_fields(self, mask: MaskSpec, deterministic: bool, decode: bool) -> dict:
        return dict(super().decoder_layer_fields(mask, deterministic, decode),
                    norm_position=self.norm_position, use_bias=self.use_bias)
