"""One file per architecture, each a complete LM (tokens [batch, length] -> logits)."""
from lexjax.models.perceiver_ar import PerceiverAR
from lexjax.models.transformer import DecoderLayer, Transformer

__all__ = ["Transformer", "DecoderLayer", "PerceiverAR"]
