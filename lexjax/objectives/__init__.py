"""Training objectives: what a run trains its model to do.

An `Objective` owns what differs between the causal LM, masked-LM pre-training and
classification: the batches the train step reads, the loss and the metrics (computed inside the
jitted step), and how validation and `evaluate` score a run. `TrainConfig.objective` holds one
(default `CausalLM()`); a run gin picks another:

    lexjax.training.TrainConfig.objective = @lexjax.objectives.MaskedLM()
    lexjax.objectives.MaskedLM.mask_rate = %MASK_RATE

Modules: `base` (`Objective`, `CausalLM`), `masking` (BERT-style masking on device),
`masked_lm` (`MaskedLM`), `classification` (`Classification`, and `ImageClassification` for
images).
"""
from lexjax.objectives.base import CausalLM, Objective
from lexjax.objectives.classification import Classification, ImageClassification
from lexjax.objectives.masked_lm import MaskedLM
from lexjax.objectives.masking import mask_tokens, unit_starts

__all__ = ["Objective", "CausalLM", "MaskedLM", "Classification", "ImageClassification",
           "mask_tokens", "unit_starts"]
