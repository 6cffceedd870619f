"""Rotary schemes: RoPE (Su et al. 2021), its axial 2-D form for image patches (RoPE2D),
and xPos (Sun et al. 2023).

Pairing convention: **interleaved** pairs (x[2i], x[2i+1]) are rotated by angle p * theta_i,
theta_i = base^(-2i/d), as in RoFormer, GPT-J and the xPos reference code (torchscale). This is not
the half-split layout of GPT-NeoX/LLaMA; weights are not interchangeable between the two.
"""
from __future__ import annotations

from typing import Optional

import gin
import jax.numpy as jnp
import numpy as np

from lexjax.positions.base import PositionScheme


def _array_module(*arrays):
    """numpy when every given (not None) input is a numpy array (positions known when the model
    is traced: the tables become constants, which XLA reads instead of recomputing sin/cos/exp
    inside every fusion that consumes them), jax.numpy otherwise (positions traced, e.g. when
    decoding)."""
    return np if all(isinstance(a, np.ndarray) for a in arrays if a is not None) else jnp


def inverse_frequencies(head_dim: int, base: float) -> np.ndarray:
    """theta_i = base^(-2i/d), float32 `[head_dim // 2]`."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    return (base ** (-np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)).astype(np.float32)


def rotary_angles(positions: jnp.ndarray, head_dim: int, base: float,
                  inv_freq: np.ndarray | None = None) -> jnp.ndarray:
    """`positions [..., length]` -> float32 angles `[..., length, 1, head_dim // 2]`
    (the singleton broadcasts over heads), at `inv_freq` (default `inverse_frequencies`);
    numpy in, numpy out."""
    xp = _array_module(positions)
    if inv_freq is None:
        inv_freq = inverse_frequencies(head_dim, base)
    return (positions.astype(xp.float32)[..., None] * inv_freq)[..., None, :]


def max_wavelength_frequencies(head_dim: int, max_wavelength: float) -> np.ndarray:
    """Perceiver AR's theta_i = max_wavelength^(-i / (d/2 - 1)), float32 `[head_dim // 2]`
    (1 for a single pair)."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    if not max_wavelength > 1:
        raise ValueError(f"RoPE.max_wavelength must be > 1, got {max_wavelength!r}")
    bands = head_dim // 2
    exponents = np.arange(bands, dtype=np.float64) / max(bands - 1, 1)
    return (float(max_wavelength) ** -exponents).astype(np.float32)


def llama3_frequencies(inv_freq: np.ndarray, factor: float, low_freq_factor: float,
                       high_freq_factor: float, original_max_positions: int) -> np.ndarray:
    """Llama 3.1's frequency scaling of `inv_freq [d/2]`: wavelengths longer than
    original_max_positions / low_freq_factor are stretched by `factor`, those shorter than
    original_max_positions / high_freq_factor kept, and the band between interpolated
    smoothly."""
    wavelength = 2 * np.pi / inv_freq.astype(np.float64)
    smooth = (original_max_positions / wavelength - low_freq_factor) / (
        high_freq_factor - low_freq_factor)
    smooth = np.clip(smooth, 0.0, 1.0)
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return scaled.astype(np.float32)


def rotation_tables(angles: jnp.ndarray, scale: jnp.ndarray | None = None
                    ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`(cos, signed_sin)`, each float32 `[..., length, 1, head_dim]`, from `angles`
    `[..., length, 1, head_dim // 2]` (and `scale`, same shape, multiplying pair i): the factors
    `rotate_pairs` applies to x and to its pair-swapped copy. numpy in, numpy out."""
    xp = _array_module(angles, scale)
    cos, sin = xp.cos(angles), xp.sin(angles)
    if scale is not None:
        cos, sin = cos * scale, sin * scale
    signs = np.tile(np.asarray([-1.0, 1.0], np.float32), angles.shape[-1])
    return xp.repeat(cos, 2, axis=-1), xp.repeat(sin, 2, axis=-1) * signs


def rotate_pairs(x: jnp.ndarray, angles: jnp.ndarray,
                 scale: jnp.ndarray | None = None) -> jnp.ndarray:
    """Rotates interleaved pairs of `x [batch, length, heads, head_dim]` by `angles`
    (`[..., length, 1, head_dim // 2]`), optionally multiplying pair i by `scale[..., i]`.
    Computed in float32, returned in x's dtype.

    As `x * cos + swap(x) * (-sin, sin)` over the full head dimension (swap exchanges the two
    members of each pair): elementwise work XLA fuses, without splitting and re-stacking pairs.
    """
    cos, sin = rotation_tables(angles, scale)
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    swapped = x32.reshape(x.shape[:-1] + (half, 2))[..., ::-1].reshape(x.shape)
    return (x32 * cos + swapped * sin).astype(x.dtype)


@gin.register(module="lexjax.positions")
class RoPE(PositionScheme):
    """Rotary position embedding: q_n . k_m depends on n - m only.

    Attributes:
      base: theta_i = base^(-2i/r) over the r rotated channels.
      fraction: the leading `int(fraction * head_dim)` channels are rotated, the rest pass
        through (GPT-NeoX's rotary_pct; 1.0: all).
      interpolation: positions are divided by it (position interpolation, Chen et al. 2023:
        a model trained at length L reads L * interpolation; HF's "linear" rope scaling).
      llama3_scaling: `(factor, low_freq_factor, high_freq_factor, original_max_positions)`:
        Llama 3.1's per-frequency scaling (`llama3_frequencies`), or None.
      max_wavelength: Perceiver AR's spacing instead of `base`: theta_i =
        max_wavelength^(-i / (r/2 - 1)), i = 0 .. r/2 - 1, log-spaced from 1 down to
        1 / max_wavelength inclusive (the reference's `_make_rotation_matrices`; there
        max_wavelength is the maximum context length).
    """

    base: float = 10000.0
    fraction: float = 1.0
    interpolation: float = 1.0
    llama3_scaling: Optional[tuple[float, float, float, int]] = None
    max_wavelength: Optional[float] = None

    @property
    def rotates_keys_alone(self) -> bool:
        return True

    def rotary_dim(self, head_dim: int) -> int:
        """The number of rotated channels of a head."""
        rotated = int(self.fraction * head_dim)
        if not 0 < self.fraction <= 1 or rotated < 2 or rotated % 2:
            raise ValueError(f"RoPE.fraction = {self.fraction} of head_dim {head_dim} must "
                             f"rotate a positive even number of channels, got {rotated}")
        return rotated

    def frequencies(self, rotary_dim: int) -> np.ndarray:
        """float32 `[rotary_dim // 2]`: theta_i after interpolation and any Llama 3 scaling."""
        if self.max_wavelength is not None:
            inv_freq = max_wavelength_frequencies(rotary_dim, self.max_wavelength)
        else:
            inv_freq = inverse_frequencies(rotary_dim, self.base)
        if self.llama3_scaling is not None:
            inv_freq = llama3_frequencies(inv_freq, *self.llama3_scaling)
        return (inv_freq / np.float32(self.interpolation)).astype(np.float32)

    def rotate(self, q, k, q_positions, k_positions):
        rotated = self.rotary_dim(q.shape[-1])
        inv_freq = self.frequencies(rotated)

        def apply(x, positions):
            angles = rotary_angles(positions, rotated, self.base, inv_freq)
            if rotated == x.shape[-1]:
                return rotate_pairs(x, angles)
            return jnp.concatenate([rotate_pairs(x[..., :rotated], angles),
                                    x[..., rotated:]], axis=-1)

        return apply(q, q_positions), apply(k, k_positions)


def grid_coordinates(positions: jnp.ndarray, grid_width: int
                     ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(rows, columns) of flattened row-major grid positions `[..., length]`: p // W and
    p % W; numpy in, numpy out."""
    return positions // grid_width, positions % grid_width


@gin.register(module="lexjax.positions")
class RoPE2D(PositionScheme):
    """Axial 2-D RoPE for patches on a grid (Heo et al. 2024, "RoPE-Axial"): the flattened
    position p of a patch is the cell (p // grid_width, p % grid_width); the first half of each
    head's channels (interleaved pairs, as `RoPE`) turn with the column, the second half with
    the row, each half with RoPE's frequencies over its d/2 channels. q . k then depends on
    the 2-D offset (row_q - row_k, col_q - col_k) only; on a 1 x W grid it is
    `RoPE(base, fraction=0.5)`.

    Attributes:
      base: theta_i = base^(-2i/(d/2)) on each axis (100: the paper's, for grids of tens).
      grid_width: patches per row; the ViT sets it from its grid (`ViT.position_template`).
    """

    base: float = 100.0
    grid_width: Optional[int] = None

    @property
    def rotates_keys_alone(self) -> bool:
        return True

    def angles(self, positions: jnp.ndarray, head_dim: int) -> jnp.ndarray:
        """float32 angles `[..., length, 1, head_dim // 2]`: the columns' pairs, then the
        rows'."""
        if not isinstance(self.grid_width, (int, np.integer)) or self.grid_width < 1:
            raise ValueError(f"RoPE2D.grid_width must be the grid's patches per row, got "
                             f"{self.grid_width!r}; use it in a lexjax.models.ViT, which sets it")
        if head_dim % 4:
            raise ValueError(f"RoPE2D splits each head into two rotary halves: head_dim must be "
                             f"a multiple of 4, got {head_dim}")
        half = head_dim // 2
        inv_freq = inverse_frequencies(half, self.base)
        rows, columns = grid_coordinates(positions, int(self.grid_width))
        xp = _array_module(positions)
        return xp.concatenate([rotary_angles(columns, half, self.base, inv_freq),
                               rotary_angles(rows, half, self.base, inv_freq)], axis=-1)

    def rotate(self, q, k, q_positions, k_positions):
        d = q.shape[-1]
        return (rotate_pairs(q, self.angles(q_positions, d)),
                rotate_pairs(k, self.angles(k_positions, d)))


def xpos_decay_base(head_dim: int, gamma: float) -> np.ndarray:
    """zeta_i = (2i + gamma * d) / ((1 + gamma) * d), i = 0 .. d/2 - 1 (LeX eq. 9)."""
    return (np.arange(0, head_dim, 2, dtype=np.float32) + gamma * head_dim) / (
        (1 + gamma) * head_dim)


@gin.register(module="lexjax.positions")
class XPos(PositionScheme):
    """xPos: RoPE whose pair i is scaled by zeta_i^(n/B) on the query at n and zeta_i^(-m/B) on the
    key at m (B = `scale_base` = 512, gamma = 0.4), so q_n . k_m carries zeta^((n-m)/B): a decay
    with distance on top of the rotation, still a function of n - m only.

    Numerics: exponents are taken relative to the centre c of the key positions (as the
    reference code centres them), zeta^((n-c)/B) and zeta^(-(m-c)/B), computed as
    exp(x * log zeta) in float32: the product is unchanged, and the largest exponent is halved.
    At 64K tokens the largest factor is 0.2857^(-64) ~ 1e35, inside the float32/bfloat16 range;
    past ~72K it is not. Under a local mask (blockwise causal attention, MaskSpec(blockwise=...),
    as the LeX paper evaluates) the attention applies the rotation block by block, with positions
    relative to each query block (`rotates_per_block`), as the reference code recomputes the
    scales per window: finite at any length. Causal use only: for m > n the factor grows with
    distance.
    """

    base: float = 10000.0
    scale_base: float = 512.0
    gamma: float = 0.4

    @property
    def rotates_per_block(self) -> bool:
        return True

    def scales(self, positions: jnp.ndarray, centre: jnp.ndarray, head_dim: int,
               sign: float) -> jnp.ndarray:
        """zeta^(sign * (p - centre)/B): `[..., length]` -> float32 `[..., length, 1, d // 2]`."""
        xp = _array_module(positions, centre)
        log_zeta = np.log(xpos_decay_base(head_dim, self.gamma))
        power = sign * (positions - centre).astype(xp.float32)[..., None] / self.scale_base
        return xp.exp(power * log_zeta)[..., None, :]

    def rotate(self, q, k, q_positions, k_positions):
        d = q.shape[-1]
        centre = (k_positions[..., :1] + k_positions[..., -1:]) // 2
        q_scale = self.scales(q_positions, centre, d, sign=1.0)
        k_scale = self.scales(k_positions, centre, d, sign=-1.0)
        return (rotate_pairs(q, rotary_angles(q_positions, d, self.base), q_scale),
                rotate_pairs(k, rotary_angles(k_positions, d, self.base), k_scale))
