"""What each supported Hugging Face architecture is in the zoo's own terms: the model's fields
(`Conversion.fields`, written into config.gin) and where each lexjax parameter comes from
(`Conversion.tensors`).

Layout conventions bridged here:
- torch `Linear` weights are `[out, in]`, lexjax kernels `[in, out]` (GPT-2's `Conv1D` already
  is `[in, out]`); per-head projections become `[embed, heads, head_dim]` and the output
  projection `[heads, head_dim, embed]`.
- Fused q/k/v projections: GPT-2 and MPT concatenate q | k | v; GPT-NeoX and BLOOM interleave
  them per head (`[heads, 3, head_dim]`).
- Rotary pairs: Llama and GPT-NeoX rotate channel i with channel i + r/2 (the half split), the
  zoo's RoPE rotates neighbours (2i, 2i + 1). The query and key channels of every head are
  permuted into the interleaved order (`interleave_rotary_channels`): q . k is unchanged, so the
  logits are too.
- An attention scale other than 1/sqrt(head_dim) (GPT-2's `scale_attn_by_inverse_layer_idx`,
  MPT's `softmax_scale`) is folded into the query projection.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator, Optional

import numpy as np

from lexjax.errors import UserError


class UnsupportedCheckpoint(UserError, ValueError):
    """A checkpoint whose architecture, or one of whose options, the converter cannot express."""


Tensors = Callable[["Lookup"], Iterator[tuple[tuple[str, ...], np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class Conversion:
    """One checkpoint in the zoo's terms.

    Attributes:
      model: the lexjax model class ("Transformer" or "Encoder").
      fields: the model's fields, as Python values or `GinObject`s (written into config.gin).
      objective: "causal" (CausalLM) or "mlm" (MaskedLM).
      max_positions: the longest input the checkpoint was trained at (its position table or
        configured context), for the run's TRAIN_LENGTH.
      tensors: yields (lexjax parameter path, array) pairs from a `Lookup` of the checkpoint.
    """

    model: str
    fields: dict
    objective: str
    max_positions: int
    tensors: Tensors


@dataclasses.dataclass(frozen=True)
class GinObject:
    """A configurable to write as `@name()` with its own bindings (a position scheme, a Norm)."""

    name: str
    bindings: dict = dataclasses.field(default_factory=dict)


class Lookup:
    """Tensors by Hugging Face name, with or without the base model's prefix (checkpoints saved
    from the bare model, e.g. `GPT2Model`, lack "transformer.")."""

    def __init__(self, reader, prefix: str):
        self.reader, self.prefix = reader, prefix
        self.used: set[str] = set()  # the names read so far

    def name(self, name: str) -> Optional[str]:
        for candidate in (self.prefix + name, name):
            if candidate in self.reader:
                return candidate
        return None

    def has(self, name: str) -> bool:
        return self.name(name) is not None

    def __call__(self, *names: str) -> np.ndarray:
        """The first of `names` the checkpoint holds (names relative to the base model; a name
        starting with "/" is taken as it is, e.g. "/lm_head.weight")."""
        for name in names:
            found = (name[1:] if name[1:] in self.reader else None) if name.startswith("/") \
                else self.name(name)
            if found is not None:
                self.used.add(found)
                return self.reader.get(found)
        from lexjax.convert.reader import CheckpointFormatError
        raise CheckpointFormatError(f"the checkpoint lacks tensor {names[0].lstrip('/')!r}"
                                    f"{' (or ' + ', '.join(names[1:]) + ')' if names[1:] else ''}")


# -- layout helpers -------------------------------------------------------------------------------
def linear(weight: np.ndarray) -> np.ndarray:
    """torch Linear `[out, in]` -> kernel `[in, out]`."""
    return np.ascontiguousarray(weight.T)


def heads_in(kernel: np.ndarray, heads: int) -> np.ndarray:
    """`[embed, heads * head_dim]` -> `[embed, heads, head_dim]`."""
    return kernel.reshape(kernel.shape[0], heads, -1)


def heads_out(kernel: np.ndarray, heads: int) -> np.ndarray:
    """`[heads * head_dim, embed]` -> `[heads, head_dim, embed]`."""
    return kernel.reshape(heads, -1, kernel.shape[-1])


def interleave_rotary_channels(x: np.ndarray, rotary_dim: int) -> np.ndarray:
    """Permutes the last axis (head_dim) so the half-split rotary pairs (i, i + r/2) become
    neighbours (2i, 2i + 1); channels past `rotary_dim` keep their place."""
    half = rotary_dim // 2
    order = np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)
    order = np.concatenate([order, np.arange(rotary_dim, x.shape[-1])])
    return x[..., order]


def split_per_head_qkv(weight: np.ndarray, bias: Optional[np.ndarray], heads: int):
    """GPT-NeoX / BLOOM fused projection (torch `[heads * 3 * head_dim, embed]`, per head q, k,
    v) -> three (kernel `[embed, heads, head_dim]`, bias `[heads, head_dim]` or None)."""
    kernel = linear(weight).reshape(weight.shape[1], heads, 3, -1)
    b = None if bias is None else bias.reshape(heads, 3, -1)
    return [(kernel[:, :, i], None if b is None else b[:, i]) for i in range(3)]


def split_concatenated_qkv(kernel: np.ndarray, bias: Optional[np.ndarray], heads: int):
    """GPT-2 / MPT fused projection (kernel `[embed, 3 * embed]`: q | k | v) -> three
    (kernel `[embed, heads, head_dim]`, bias `[heads, head_dim]` or None)."""
    kernels = np.split(kernel, 3, axis=1)
    biases = [None] * 3 if bias is None else np.split(bias, 3)
    return [(heads_in(k, heads), None if b is None else b.reshape(heads, -1))
            for k, b in zip(kernels, biases)]


def attention(prefix: tuple[str, ...], q, k, v, out_kernel, out_bias) -> Iterator:
    """The (path, array) pairs of one `SelfAttention`: q, k, v as (kernel, bias) pairs."""
    for name, (kernel, bias) in zip(("query", "key", "value"), (q, k, v)):
        yield prefix + ("attention", name, "kernel"), kernel
        if bias is not None:
            yield prefix + ("attention", name, "bias"), bias
    yield prefix + ("attention", "out", "kernel"), out_kernel
    if out_bias is not None:
        yield prefix + ("attention", "out", "bias"), out_bias


def norm(path: tuple[str, ...], scale: np.ndarray, bias: Optional[np.ndarray] = None) -> Iterator:
    yield path + ("scale",), scale
    if bias is not None:
        yield path + ("bias",), bias


def dense(path: tuple[str, ...], kernel: np.ndarray, bias: Optional[np.ndarray] = None) -> Iterator:
    yield path + ("kernel",), kernel
    if bias is not None:
        yield path + ("bias",), bias


def scaled_query(pair, factor: float):
    """A (kernel, bias) query pair multiplied by `factor` (an attention scale folded in)."""
    kernel, bias = pair
    return kernel * factor, None if bias is None else bias * factor


def rotary_pair(pair, rotary_dim: int):
    kernel, bias = pair
    return (interleave_rotary_channels(kernel, rotary_dim),
            None if bias is None else interleave_rotary_channels(bias, rotary_dim))


def norm_spec(kind: str, epsilon: float, bias: bool = True) -> GinObject:
    return GinObject("lexjax.layers.Norm", {"kind": kind, "epsilon": float(epsilon),
                                            "bias": bias})


def gelu_activation(name: str, architecture: str) -> str:
    """A checkpoint's activation name -> the zoo's MLP activation."""
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "bloom_gelu"):
        return "gelu"
    if name == "gelu":
        return "gelu_exact"
    raise UnsupportedCheckpoint(f"{architecture} with activation {name!r} is not supported "
                                "(supported: gelu, gelu_new, gelu_pytorch_tanh)")


def refuse(architecture: str, option: str, value: Any) -> None:
    raise UnsupportedCheckpoint(f"{architecture} with {option}={value!r} cannot be converted "
                                "(the zoo has no equivalent; convert a checkpoint without it)")


def common_fields(vocab: int, layers: int, embed: int, heads: int, mlp: int) -> dict:
    return dict(vocab_size=vocab, num_layers=layers, embed_dim=embed, num_heads=heads,
                mlp_dim=mlp, scale_tied_logits=False)


def rope_position(config: dict, architecture: str, fraction: float = 1.0) -> GinObject:
    """RoPE from `rope_theta` and any rope scaling (`rope_parameters` or `rope_scaling`)."""
    parameters = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    parameters.update({k: v for k, v in scaling.items() if k not in parameters})
    base = parameters.get("rope_theta", config.get("rope_theta", config.get(
        "rotary_emb_base", 10000.0)))
    bindings = {"base": float(base), "fraction": float(fraction)}
    kind = parameters.get("rope_type", parameters.get("type", "default"))
    if kind == "linear":
        bindings["interpolation"] = float(parameters["factor"])
    elif kind == "llama3":
        bindings["llama3_scaling"] = (
            float(parameters["factor"]), float(parameters["low_freq_factor"]),
            float(parameters["high_freq_factor"]),
            int(parameters["original_max_position_embeddings"]))
    elif kind != "default":
        refuse(architecture, "rope scaling", kind)
    return GinObject("lexjax.positions.RoPE", bindings)


def rotary_fraction(config: dict) -> float:
    parameters = config.get("rope_parameters") or {}
    return float(parameters.get("partial_rotary_factor", config.get(
        "partial_rotary_factor", config.get("rotary_pct", 1.0))))


# -- architectures -------------------------------------------------------------------------------
def gpt2(config: dict) -> Conversion:
    heads, embed = config["n_head"], config["n_embd"]
    head_dim = embed // heads
    if config.get("add_cross_attention"):
        refuse("gpt2", "add_cross_attention", True)
    fields = dict(common_fields(config["vocab_size"], config["n_layer"], embed, heads,
                                config.get("n_inner") or 4 * embed),
                  position=GinObject("lexjax.positions.Learned",
                                     {"max_length": config["n_positions"]}),
                  norm=norm_spec("layernorm", config.get("layer_norm_epsilon", 1e-5)),
                  use_bias=True, tie_embeddings=True,
                  mlp_activation=gelu_activation(config.get("activation_function", "gelu_new"),
                                                 "gpt2"))
    scale_weights = config.get("scale_attn_weights", True)

    def tensors(t: Lookup):
        yield ("token_embedding", "embedding"), t("wte.weight")
        yield ("position", "embedding"), t("wpe.weight")
        for i in range(config["n_layer"]):
            p, layer = f"h.{i}.", (f"layer_{i}",)
            yield from norm(layer + ("pre_attention_norm",), t(p + "ln_1.weight"),
                            t(p + "ln_1.bias"))
            q, k, v = split_concatenated_qkv(t(p + "attn.c_attn.weight"),
                                             t(p + "attn.c_attn.bias"), heads)
            factor = (1.0 if scale_weights else math.sqrt(head_dim)) / (
                i + 1 if config.get("scale_attn_by_inverse_layer_idx") else 1)
            yield from attention(layer, scaled_query(q, factor), k, v,
                                 heads_out(t(p + "attn.c_proj.weight"), heads),
                                 t(p + "attn.c_proj.bias"))
            yield from norm(layer + ("pre_mlp_norm",), t(p + "ln_2.weight"), t(p + "ln_2.bias"))
            yield from dense(layer + ("mlp", "wi"), t(p + "mlp.c_fc.weight"),
                             t(p + "mlp.c_fc.bias"))
            yield from dense(layer + ("mlp", "wo"), t(p + "mlp.c_proj.weight"),
                             t(p + "mlp.c_proj.bias"))
        yield from norm(("final_norm",), t("ln_f.weight"), t("ln_f.bias"))

    return Conversion("Transformer", fields, "causal", config["n_positions"], tensors)


def llama(config: dict) -> Conversion:
    heads, embed = config["num_attention_heads"], config["hidden_size"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or embed // heads
    attention_bias, mlp_bias = config.get("attention_bias", False), config.get("mlp_bias", False)
    if attention_bias != mlp_bias:
        refuse("llama", "attention_bias != mlp_bias", (attention_bias, mlp_bias))
    if config.get("hidden_act", "silu") != "silu":
        refuse("llama", "hidden_act", config["hidden_act"])
    if config.get("pretraining_tp", 1) != 1:
        refuse("llama", "pretraining_tp", config["pretraining_tp"])
    tied = bool(config.get("tie_word_embeddings", False))
    fields = dict(common_fields(config["vocab_size"], config["num_hidden_layers"], embed, heads,
                                config["intermediate_size"]),
                  num_kv_heads=kv_heads, head_dim=head_dim,
                  position=rope_position(config, "llama"),
                  norm=norm_spec("rmsnorm", config.get("rms_norm_eps", 1e-6)),
                  use_bias=bool(attention_bias), tie_embeddings=tied, mlp_activation="swiglu")

    def tensors(t: Lookup):
        yield ("token_embedding", "embedding"), t("embed_tokens.weight")
        for i in range(config["num_hidden_layers"]):
            p, layer = f"layers.{i}.", (f"layer_{i}",)
            yield from norm(layer + ("pre_attention_norm",), t(p + "input_layernorm.weight"))

            def projection(name, n):
                bias = t(p + f"self_attn.{name}.bias") if attention_bias else None
                return (heads_in(linear(t(p + f"self_attn.{name}.weight")), n),
                        None if bias is None else bias.reshape(n, -1))

            q = rotary_pair(projection("q_proj", heads), head_dim)
            k = rotary_pair(projection("k_proj", kv_heads), head_dim)
            out_bias = t(p + "self_attn.o_proj.bias") if attention_bias else None
            yield from attention(layer, q, k, projection("v_proj", kv_heads),
                                 heads_out(linear(t(p + "self_attn.o_proj.weight")), heads),
                                 out_bias)
            yield from norm(layer + ("pre_mlp_norm",), t(p + "post_attention_layernorm.weight"))
            for ours, theirs in (("wi_gate", "gate_proj"), ("wi", "up_proj"),
                                 ("wo", "down_proj")):
                yield from dense(layer + ("mlp", ours), linear(t(p + f"mlp.{theirs}.weight")),
                                 t(p + f"mlp.{theirs}.bias") if mlp_bias else None)
        yield from norm(("final_norm",), t("norm.weight"))
        if not tied:
            yield ("logits", "kernel"), linear(t("/lm_head.weight"))

    return Conversion("Transformer", fields, "causal",
                      config.get("max_position_embeddings", 2048), tensors)


def fused_qkv_layer(t: Lookup, prefix: str, index: int, attention_name: str, heads: int,
                    rotary_dim: Optional[int] = None) -> Iterator:
    """One GPT-NeoX / BLOOM block (`prefix`, e.g. "h.3."): layer norms with biases, the fused
    per-head `query_key_value` and `dense` of `attention_name`, `dense_h_to_4h` and
    `dense_4h_to_h`; `rotary_dim` channels of q and k are reordered for RoPE when given."""
    p, layer = prefix, (f"layer_{index}",)
    yield from norm(layer + ("pre_attention_norm",), t(p + "input_layernorm.weight"),
                    t(p + "input_layernorm.bias"))
    a = p + attention_name
    q, k, v = split_per_head_qkv(t(a + "query_key_value.weight"),
                                 t(a + "query_key_value.bias"), heads)
    if rotary_dim is not None:
        q, k = rotary_pair(q, rotary_dim), rotary_pair(k, rotary_dim)
    yield from attention(layer, q, k, v, heads_out(linear(t(a + "dense.weight")), heads),
                         t(a + "dense.bias"))
    yield from norm(layer + ("pre_mlp_norm",), t(p + "post_attention_layernorm.weight"),
                    t(p + "post_attention_layernorm.bias"))
    yield from dense(layer + ("mlp", "wi"), linear(t(p + "mlp.dense_h_to_4h.weight")),
                     t(p + "mlp.dense_h_to_4h.bias"))
    yield from dense(layer + ("mlp", "wo"), linear(t(p + "mlp.dense_4h_to_h.weight")),
                     t(p + "mlp.dense_4h_to_h.bias"))


def gpt_neox(config: dict) -> Conversion:
    heads, embed = config["num_attention_heads"], config["hidden_size"]
    head_dim = embed // heads
    fraction = rotary_fraction(config)
    rotary_dim = int(head_dim * fraction)
    bias = config.get("attention_bias", True)
    fields = dict(common_fields(config["vocab_size"], config["num_hidden_layers"], embed, heads,
                                config["intermediate_size"]),
                  position=rope_position(config, "gpt_neox", fraction),
                  norm=norm_spec("layernorm", config.get("layer_norm_eps", 1e-5)),
                  use_bias=True, parallel_block=bool(config.get("use_parallel_residual", True)),
                  tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                  mlp_activation=gelu_activation(config.get("hidden_act", "gelu"), "gpt_neox"))
    if not bias:
        refuse("gpt_neox", "attention_bias", bias)

    def tensors(t: Lookup):
        yield ("token_embedding", "embedding"), t("embed_in.weight")
        for i in range(config["num_hidden_layers"]):
            yield from fused_qkv_layer(t, f"layers.{i}.", i, "attention.", heads, rotary_dim)
        yield from norm(("final_norm",), t("final_layer_norm.weight"),
                        t("final_layer_norm.bias"))
        if not fields["tie_embeddings"]:
            yield ("logits", "kernel"), linear(t("/embed_out.weight", "/lm_head.weight"))

    return Conversion("Transformer", fields, "causal",
                      config.get("max_position_embeddings", 2048), tensors)


def bloom(config: dict) -> Conversion:
    heads = config.get("n_head", config.get("num_attention_heads"))
    embed = config.get("hidden_size", config.get("n_embed"))
    layers = config.get("n_layer", config.get("num_hidden_layers"))
    if config.get("apply_residual_connection_post_layernorm"):
        refuse("bloom", "apply_residual_connection_post_layernorm", True)
    fields = dict(common_fields(config["vocab_size"], layers, embed, heads, 4 * embed),
                  position=GinObject("lexjax.positions.ALiBi"),
                  norm=norm_spec("layernorm", config.get("layer_norm_epsilon", 1e-5)),
                  use_bias=True, embedding_norm=True, tie_embeddings=True, mlp_activation="gelu")

    def tensors(t: Lookup):
        yield ("token_embedding", "embedding"), t("word_embeddings.weight")
        yield from norm(("embedding_norm",), t("word_embeddings_layernorm.weight"),
                        t("word_embeddings_layernorm.bias"))
        for i in range(layers):
            yield from fused_qkv_layer(t, f"h.{i}.", i, "self_attention.", heads)
        yield from norm(("final_norm",), t("ln_f.weight"), t("ln_f.bias"))

    # ALiBi needs no table: any length runs; 2048 is BLOOM's training context.
    return Conversion("Transformer", fields, "causal", config.get("seq_length", 2048), tensors)


def mpt_alibi_slopes(heads: int, alibi_bias_max: float) -> tuple[float, ...]:
    """MPT's head slopes: 2^(-alibi_bias_max * i / P), i = 1..P, P the next power of 2 >= heads;
    for other head counts the odd-indexed slopes first, then the even-indexed ones, cut at
    `heads` (the paper's slopes when alibi_bias_max is 8; written out because MPT configs may
    set another maximum)."""
    power = 2 ** math.ceil(math.log2(heads))
    slopes = 1.0 / 2.0 ** (np.arange(1, power + 1, dtype=np.float32) * (alibi_bias_max / power))
    if power != heads:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:heads]
    return tuple(float(s) for s in slopes)


def mpt(config: dict) -> Conversion:
    heads, embed = config["n_heads"], config["d_model"]
    attn = config.get("attn_config") or {}
    for option, default in (("clip_qkv", None), ("qk_ln", False), ("prefix_lm", False),
                            ("attn_uses_sequence_id", False)):
        if attn.get(option, default) not in (default,):
            refuse("mpt", f"attn_config.{option}", attn[option])
    if not attn.get("alibi", True):
        refuse("mpt", "attn_config.alibi", False)
    if config.get("logit_scale") is not None:
        refuse("mpt", "logit_scale", config["logit_scale"])
    no_bias = bool(config.get("no_bias", True))
    fields = dict(common_fields(config["vocab_size"], config["n_layers"], embed, heads,
                                config.get("expansion_ratio", 4) * embed),
                  position=GinObject("lexjax.positions.ALiBi", {"slopes": mpt_alibi_slopes(
                      heads, attn.get("alibi_bias_max", 8))}),
                  norm=norm_spec("layernorm", config.get("layer_norm_epsilon", 1e-5),
                                 bias=not no_bias),
                  use_bias=not no_bias, tie_embeddings=True, mlp_activation="gelu_exact")
    softmax_scale = attn.get("softmax_scale")
    factor = 1.0 if softmax_scale is None else softmax_scale * math.sqrt(embed // heads)

    def tensors(t: Lookup):
        def maybe(name):
            return None if no_bias else t(name)

        yield ("token_embedding", "embedding"), t("wte.weight")
        for i in range(config["n_layers"]):
            p, layer = f"blocks.{i}.", (f"layer_{i}",)
            yield from norm(layer + ("pre_attention_norm",), t(p + "norm_1.weight"),
                            maybe(p + "norm_1.bias"))
            q, k, v = split_concatenated_qkv(linear(t(p + "attn.Wqkv.weight")),
                                             maybe(p + "attn.Wqkv.bias"), heads)
            yield from attention(layer, scaled_query(q, factor), k, v,
                                 heads_out(linear(t(p + "attn.out_proj.weight")), heads),
                                 maybe(p + "attn.out_proj.bias"))
            yield from norm(layer + ("pre_mlp_norm",), t(p + "norm_2.weight"),
                            maybe(p + "norm_2.bias"))
            yield from dense(layer + ("mlp", "wi"), linear(t(p + "ffn.up_proj.weight")),
                             maybe(p + "ffn.up_proj.bias"))
            yield from dense(layer + ("mlp", "wo"), linear(t(p + "ffn.down_proj.weight")),
                             maybe(p + "ffn.down_proj.bias"))
        yield from norm(("final_norm",), t("norm_f.weight"), maybe("norm_f.bias"))

    return Conversion("Transformer", fields, "causal", config.get("max_seq_len", 2048), tensors)


def bert_projection(t: Lookup, prefix: str, name: str, heads: int):
    """A BERT-style layer's `attention.self.<name>` as (kernel `[embed, heads, head_dim]`, bias
    `[heads, head_dim]`)."""
    return (heads_in(linear(t(prefix + f"attention.self.{name}.weight")), heads),
            t(prefix + f"attention.self.{name}.bias").reshape(heads, -1))


def bert_embedding(t: Lookup, token_types: bool) -> Iterator:
    """The word table (plus token type 0, which BERT-style models add to every token) and the
    embedding LayerNorm."""
    words = t("embeddings.word_embeddings.weight")
    if token_types:
        words = words + t("embeddings.token_type_embeddings.weight")[0]
    yield ("token_embedding", "embedding"), words
    yield from norm(("embedding_norm",), t("embeddings.LayerNorm.weight"),
                    t("embeddings.LayerNorm.bias"))


def bert_layer(t: Lookup, i: int, heads: int, qkv: tuple[str, str, str]) -> Iterator:
    """Encoder layer i of a BERT-style (post-norm, biased) stack; `qkv`: its projections'
    names."""
    p, layer = f"encoder.layer.{i}.", (f"layer_{i}",)
    yield from attention(layer, *(bert_projection(t, p, name, heads) for name in qkv),
                         heads_out(linear(t(p + "attention.output.dense.weight")), heads),
                         t(p + "attention.output.dense.bias"))
    yield from norm(layer + ("post_attention_norm",), t(p + "attention.output.LayerNorm.weight"),
                    t(p + "attention.output.LayerNorm.bias"))
    yield from dense(layer + ("mlp", "wi"), linear(t(p + "intermediate.dense.weight")),
                     t(p + "intermediate.dense.bias"))
    yield from dense(layer + ("mlp", "wo"), linear(t(p + "output.dense.weight")),
                     t(p + "output.dense.bias"))
    yield from norm(layer + ("post_mlp_norm",), t(p + "output.LayerNorm.weight"),
                    t(p + "output.LayerNorm.bias"))


def bert_mlm_head(t: Lookup, transform: str, head: str, untied: bool) -> Iterator:
    """BERT's MLM head: the transform (`<transform>dense`, `<transform>LayerNorm`), the decoder
    (`logits` when the embedding table holds more than the word table), the output bias."""
    yield from dense(("mlm_dense",), linear(t(transform + "dense.weight")),
                     t(transform + "dense.bias"))
    yield from norm(("mlm_norm",), t(transform + "LayerNorm.weight"),
                    t(transform + "LayerNorm.bias"))
    if untied:
        yield ("logits", "kernel"), linear(t(head + "decoder.weight",
                                             "embeddings.word_embeddings.weight"))
    yield ("logits_bias",), t(head + "bias", head + "decoder.bias")


def roformer(config: dict) -> Conversion:
    heads, embed = config["num_attention_heads"], config["hidden_size"]
    if config.get("embedding_size", embed) != embed:
        refuse("roformer", "embedding_size", config["embedding_size"])
    if config.get("rotary_value"):
        refuse("roformer", "rotary_value", True)
    eps = config.get("layer_norm_eps", 1e-12)
    activation = gelu_activation(config.get("hidden_act", "gelu"), "roformer")
    # HF adds token-type embedding 0 to every token and ties the MLM decoder to the word table
    # alone: the zoo's embedding holds word + type 0, the logits projection the word table.
    fields = dict(common_fields(config["vocab_size"], config["num_hidden_layers"], embed, heads,
                                config["intermediate_size"]),
                  position=GinObject("lexjax.positions.RoPE", {"base": 10000.0}),
                  norm=norm_spec("layernorm", eps), norm_position="post", use_bias=True,
                  embedding_norm=True, tie_embeddings=False, logits_bias=True,
                  mlp_activation=activation)

    def tensors(t: Lookup):
        yield from bert_embedding(t, t.has("embeddings.token_type_embeddings.weight"))
        for i in range(config["num_hidden_layers"]):
            yield from bert_layer(t, i, heads, ("query", "key", "value"))
        yield from bert_mlm_head(t, "/cls.predictions.transform.", "/cls.predictions.",
                                 untied=True)

    return Conversion("Encoder", fields, "mlm", config.get("max_position_embeddings", 1536),
                      tensors)


def deberta_v2(config: dict) -> Conversion:
    heads, embed = config["num_attention_heads"], config["hidden_size"]
    terms = config.get("pos_att_type") or []
    if isinstance(terms, str):
        terms = [t.strip() for t in terms.lower().split("|") if t.strip()]
    for option, value, allowed in (
            ("relative_attention", config.get("relative_attention", False), (True,)),
            ("position_biased_input", config.get("position_biased_input", True), (False,)),
            ("norm_rel_ebd", config.get("norm_rel_ebd", "none"), ("layer_norm",)),
            ("conv_kernel_size", config.get("conv_kernel_size", 0), (0,)),
            ("embedding_size", config.get("embedding_size", embed), (embed,))):
        if value not in allowed:
            refuse("deberta_v2", option, value)
    if not terms or set(terms) - {"c2p", "p2c"}:
        refuse("deberta_v2", "pos_att_type", terms)
    max_relative = config.get("max_relative_positions", -1)
    if max_relative < 1:
        max_relative = config["max_position_embeddings"]
    buckets = max(config.get("position_buckets", -1), 0)
    eps = config.get("layer_norm_eps", 1e-7)
    token_types = config.get("type_vocab_size", 0) > 0
    fields = dict(common_fields(config["vocab_size"], config["num_hidden_layers"], embed, heads,
                                config["intermediate_size"]),
                  position_buckets=buckets, max_relative_positions=max_relative,
                  position_terms=tuple(terms),
                  share_position_projections=bool(config.get("share_att_key", False)),
                  enhanced_mask_decoder=False, norm=norm_spec("layernorm", eps),
                  norm_position="post", use_bias=True, embedding_norm=True,
                  tie_embeddings=not token_types, logits_bias=True,
                  mlp_activation=gelu_activation(config.get("hidden_act", "gelu"), "deberta_v2"))
    legacy = config.get("legacy", True)
    head = "/cls.predictions." if legacy else "/lm_predictions.lm_head."

    def tensors(t: Lookup):
        yield from bert_embedding(t, token_types)
        yield ("relative_embeddings",), t("encoder.rel_embeddings.weight")
        yield from norm(("relative_norm",), t("encoder.LayerNorm.weight"),
                        t("encoder.LayerNorm.bias"))
        for i in range(config["num_hidden_layers"]):
            yield from bert_layer(t, i, heads, ("query_proj", "key_proj", "value_proj"))
            if not fields["share_position_projections"]:
                for ours, theirs, term in (("position_key", "pos_key_proj", "c2p"),
                                           ("position_query", "pos_query_proj", "p2c")):
                    if term in terms:
                        kernel, bias = bert_projection(t, f"encoder.layer.{i}.", theirs, heads)
                        yield from dense((f"layer_{i}", "attention", ours), kernel, bias)
        yield from bert_mlm_head(t, head + ("transform." if legacy else ""), head,
                                 untied=token_types)

    return Conversion("DeBERTa", fields, "mlm", config.get("max_position_embeddings", 512),
                      tensors)


# model_type (config.json) -> (converter, the base model's tensor-name prefix)
ARCHITECTURES: dict[str, tuple[Callable[[dict], Conversion], str]] = {
    "gpt2": (gpt2, "transformer."),
    "llama": (llama, "model."),
    "gpt_neox": (gpt_neox, "gpt_neox."),
    "bloom": (bloom, "transformer."),
    "mpt": (mpt, "transformer."),
    "roformer": (roformer, "roformer."),
    "deberta-v2": (deberta_v2, "deberta."),
}
