"""One file per architecture, each a complete LM (tokens [batch, length] -> logits)."""
from lexjax.models.transformer import DecoderLayer, Transformer

__all__ = ["Transformer", "DecoderLayer"]
