"""Reusable building blocks; every parameter carries logical axis names."""
from lexjax.layers.attention import SelfAttention
from lexjax.layers.basic import (ACTIVATION_EMBED, ACTIVATION_HEADS, Embedding, Layer, Norm,
                                 compute_dtype, dense, make_norm, with_activation_axes)
from lexjax.layers.mlp import MLP

__all__ = ["SelfAttention", "MLP", "Embedding", "Layer", "Norm", "dense", "make_norm",
           "compute_dtype", "with_activation_axes", "ACTIVATION_EMBED", "ACTIVATION_HEADS"]
