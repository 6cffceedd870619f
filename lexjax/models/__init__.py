"""One file per architecture, each a complete LM (tokens [batch, length] -> logits)."""
from lexjax.models.block_recurrent import BlockRecurrentTransformer, RecurrentCarry
from lexjax.models.flash import Flash
from lexjax.models.gss import GSS, GSSTransformer
from lexjax.models.mega import Mega
from lexjax.models.perceiver_ar import PerceiverAR
from lexjax.models.spade import Spade
from lexjax.models.transformer import DecoderLayer, Transformer

__all__ = ["Transformer", "DecoderLayer", "Flash", "GSS", "GSSTransformer", "Mega",
           "PerceiverAR", "Spade", "BlockRecurrentTransformer", "RecurrentCarry"]
