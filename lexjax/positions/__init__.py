"""Every position scheme of the zoo behind one interface (`PositionScheme`, see base.py):
NoPE, Sinusoidal, Learned (hook a: embed); RoPE, RoPE2D (image patches), XPos (hook b: rotate
q, k); ALiBi, Sandwich, Kerple, T5Buckets, Mega's SimpleRelativeBias and RotaryRelativeBias (hook c:
relative bias as a function of q_pos - k_pos)."""
from lexjax.positions.absolute import Learned, NoPE, Sinusoidal, sinusoidal_table
from lexjax.positions.alibi import ALiBi, alibi_slopes
from lexjax.positions.base import PositionScheme
from lexjax.positions.kerple import Kerple, kerple_log_bias, kerple_power_bias
from lexjax.positions.learned_offsets import RotaryRelativeBias, SimpleRelativeBias
from lexjax.positions.rotary import (RoPE, RoPE2D, XPos, rotary_angles, rotate_pairs,
                                     rotation_tables, xpos_decay_base)
from lexjax.positions.sandwich import Sandwich, sandwich_frequencies
from lexjax.positions.t5 import T5Buckets, relative_position_bucket

__all__ = [
    "PositionScheme", "NoPE", "Sinusoidal", "Learned", "RoPE", "RoPE2D", "XPos", "ALiBi",
    "Sandwich", "Kerple", "T5Buckets", "SimpleRelativeBias", "RotaryRelativeBias",
    "alibi_slopes", "sinusoidal_table", "rotary_angles", "rotate_pairs",
    "rotation_tables", "xpos_decay_base", "sandwich_frequencies", "kerple_log_bias",
    "kerple_power_bias", "relative_position_bucket",
]
