"""One attention core for the zoo: a mask language (`MaskSpec`) and `attend` with several
implementations that agree (reference, blocked XLA, and kernels that register themselves)."""
from lexjax.attention.common import ContentBias, RelativeBias, Rotation
from lexjax.attention.dispatch import IMPLEMENTATIONS, attend, register_implementation
from lexjax.attention.masks import MaskSpec

__all__ = ["MaskSpec", "RelativeBias", "ContentBias", "Rotation", "attend",
           "register_implementation", "IMPLEMENTATIONS"]
