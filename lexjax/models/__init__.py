"""One file per architecture, each a complete LM (tokens [batch, length] -> logits), all built on
`lexjax.models.lm.LanguageModel`; encoders add `lexjax.models.encoder.EncoderHeads`; the ViT
(images -> class logits) is an `Encoder`."""
from lexjax.models.block_recurrent import BlockRecurrentTransformer, RecurrentCarry
from lexjax.models.deberta import DeBERTa
from lexjax.models.encoder import Encoder, EncoderHeads
from lexjax.models.flash import Flash
from lexjax.models.gss import GSS, GSSTransformer
from lexjax.models.kernelized_rpe import KernelizedRPE, KernelizedRPEEncoder
from lexjax.models.late_mask import LateMask
from lexjax.models.lm import AttentionLanguageModel, LanguageModel
from lexjax.models.luna import Luna, LunaEncoder
from lexjax.models.mega import Mega
from lexjax.models.perceiver_ar import PerceiverAR
from lexjax.models.ripple_vit import RippleViT
from lexjax.models.spade import Spade
from lexjax.models.transformer import Transformer
from lexjax.models.vit import ViT
from lexjax.models.yoso import YosoEncoder

__all__ = ["LanguageModel", "AttentionLanguageModel", "Transformer", "Flash", "GSS",
           "GSSTransformer", "Mega", "PerceiverAR", "Spade", "BlockRecurrentTransformer",
           "RecurrentCarry", "Encoder", "EncoderHeads", "DeBERTa",
           "LateMask", "Luna", "LunaEncoder", "YosoEncoder", "KernelizedRPE",
           "KernelizedRPEEncoder", "ViT", "RippleViT"]
