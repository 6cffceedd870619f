"""Diagonal state-space layers: DSS (Gupta, Gu, Berant 2022), GSS's simplified DSS kernel (Mehta
et al. 2022) and S4D's initialisation (Gu et al. 2022), plus the two numerical tools the SSM and
EMA layers share: a blocked Vandermonde kernel and causal convolution by FFT.

One channel h of a diagonal SSM with N complex modes, after discretisation:

    x_k = z ⊙ x_{k-1} + u_k,    y_k = Re(C̃ · x_k) + D u_k          (x_k ∈ C^N)

so `y = K * u + D u` with the causal kernel `K[l] = Re Σ_n C̃_n z_n^l`. Training convolves by FFT
(O(L log L)); decoding runs the recurrence (O(N) per token). (DSS_softmax, variant "dss",
instead normalises its kernel over the input's length: no recurrence, so it does not decode.)
DSS_exp's continuous parameters give `z = exp(Δλ)` and `C̃ = W (e^{Δλ} − 1) / λ` (zero-order
hold); GSS absorbs Δ (Δ = 1).

Numerics (the known pitfalls of SSM kernels): kernels, powers and FFTs run in float32 / complex64
whatever the compute dtype; Re λ = −exp(·) < 0 and Δ = exp(·) > 0 by parameterisation, so
every |z| < 1 and no power overflows at any length (DSS_softmax's modes with Re λ > 0 are
evaluated mirrored, as powers of 1/z); each power is one `exp(l · log z)` of an exactly
representable integer l (no repeated multiplication, so errors do not grow with l); `(e^{Δλ} − 1)`
is a complex expm1 (no cancellation for small |Δλ|); matmuls building kernels use HIGHEST precision
(TPUs otherwise round f32 matmul inputs to bf16).
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SSM_CHANNELS = "ssm_channels"  # logical axis of independent SSM channels (H)
SSM_STATE = "ssm_state"  # logical axis of the modes of one channel's state (N)

# Variants whose kernel is an impulse response `Re Σ C̃ z^l` (a recurrence: they decode token by
# token and run at any length); "dss" (DSS_softmax) renormalises its kernel over the length.
RECURRENT_VARIANTS = ("gss", "dss_exp", "s4d_lin")
VARIANTS = RECURRENT_VARIANTS + ("dss",)
SOFTMAX_EPSILON = 1e-7  # the DSS reference's `reciprocal` epsilon


def complex_expm1(z: jnp.ndarray) -> jnp.ndarray:
    """exp(z) − 1 for complex z without cancellation when |z| is small:
    `(expm1(a) cos b − 2 sin²(b/2)) + i e^a sin b` for z = a + ib."""
    a, b = jnp.real(z), jnp.imag(z)
    real = jnp.expm1(a) * jnp.cos(b) - 2.0 * jnp.square(jnp.sin(0.5 * b))
    return jax.lax.complex(real, jnp.exp(a) * jnp.sin(b))


def fft_length(length: int) -> int:
    """The smallest 2^a 3^b 5^c ≥ 2·length − 1: room for a linear (not circular) convolution of
    two length-`length` signals, on an FFT size with only small prime factors (e.g. 2048 at
    length 1024, 200 at 100)."""
    target = max(1, 2 * length - 1)
    best = 1 << (target - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            n = p35
            while n < target:
                n *= 2
            best = min(best, n)
            p35 *= 3
        p5 *= 5
    return best


def causal_fft_conv(u: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """Causal convolution `y[b, t, c] = Σ_{s ≤ t} kernel[c, t − s] · u[b, s, c]` by FFT.

    Args:
      u: `[batch, length, channels]` (any float dtype; transformed in float32).
      kernel: `[channels, k_len]` with `k_len ≥ length` (positions beyond `length` are unused).
    Returns:
      float32 `[batch, length, channels]`. Zero padding to ≥ 2·length − 1 leaves no circular
      wrap-around, so y at t depends on u at s ≤ t only.
    """
    length = u.shape[1]
    n = fft_length(length)
    u_f = jnp.fft.rfft(jnp.swapaxes(u.astype(jnp.float32), 1, 2), n=n)  # [b, c, n/2+1]
    k_f = jnp.fft.rfft(kernel[:, :length].astype(jnp.float32), n=n)  # [c, n/2+1]
    y = jnp.fft.irfft(u_f * k_f, n=n)[..., :length]
    return jnp.swapaxes(y, 1, 2)


def fft_conv_flops(length: int) -> float:
    """Estimated FLOPs per token and channel of `causal_fft_conv` at `length`: three real FFTs of
    size n (input, kernel, inverse; ≈ 2.5 n log2 n each) and the n/2 + 1 complex products."""
    n = fft_length(length)
    return (3 * 2.5 * n * math.log2(n) + 6 * (n // 2 + 1)) / length


def power_kernel(coeff: jnp.ndarray, log_base: jnp.ndarray, length: int) -> jnp.ndarray:
    """`K[c, l] = Re Σ_n coeff[c, n] · exp(l · log_base[c, n])` for l = 0 .. length − 1.

    A two-level Vandermonde product: with l = a·B + b (B the power of two ≥ √length),
    `exp(l g) = exp(aB g) · exp(b g)`, so K is the real part of a batched matmul
    `[c, A, n] x [(c), n, B]`: memory O(channels · N · √length), not O(channels · N · length),
    and the work, channels · N · length multiply-adds, runs on the matrix units.

    Args:
      coeff: `[channels, N]`, complex64 or float32.
      log_base: `[channels, N]`, or `[N]` when the bases are shared by all channels; complex64 or
        float32 with real part ≤ 0 (|base| ≤ 1, so no power overflows).
      length: kernel length.
    Returns:
      float32 `[channels, length]`.
    """
    inner_len = 1 << max(0, math.ceil(math.log2(max(length, 1)) / 2))
    outer_len = -(-length // inner_len)
    outer_steps = jnp.arange(outer_len, dtype=jnp.float32) * inner_len
    inner_steps = jnp.arange(inner_len, dtype=jnp.float32)
    outer = coeff[..., None, :] * jnp.exp(outer_steps[:, None] * log_base[..., None, :])  # [c,A,n]
    inner = jnp.exp(log_base[..., None] * inner_steps)  # [(c), n, B]
    spec = "can,cnb->cab" if inner.ndim == 3 else "can,nb->cab"
    product = functools.partial(jnp.einsum, spec, precision=jax.lax.Precision.HIGHEST,
                                preferred_element_type=jnp.float32)
    if jnp.iscomplexobj(outer):
        k = product(outer.real, inner.real) - product(outer.imag, inner.imag)
    else:
        k = product(outer, inner)
    return k.reshape(k.shape[0], outer_len * inner_len)[:, :length]


@functools.lru_cache(maxsize=None)
def hippo_skew_eigenvalues(n: int) -> np.ndarray:
    """Eigenvalues (complex128 `[n]`, largest imaginary part first) of the skew-symmetric part
    `(A − Aᵀ)/2` of the strictly lower HiPPO-LegS matrix `A_ij = √((2i+1)(2j+1))`, i > j."""
    x = 2.0 * np.arange(n) + 1.0
    hippo = np.tril(np.sqrt(np.outer(x, x)), k=-1)
    evals = np.linalg.eigvals((hippo - hippo.T) / 2)
    return evals[np.argsort(-evals.imag, kind="stable")]


def initial_eigenvalues(variant: str, state_dim: int) -> np.ndarray:
    """Continuous-time λ (complex128 `[state_dim]`, Re λ < 0) of the deterministic inits:
    "dss" / "dss_exp": DSS's `hippo_skew_pos_imag`, the skew-HiPPO eigenvalues of size 2N with
    positive imaginary part, minus 1/2 (S4D-LegS); "s4d_lin": S4D-Lin, λ_n = −1/2 + iπn."""
    if variant in ("dss", "dss_exp"):
        return hippo_skew_eigenvalues(2 * state_dim)[:state_dim] - 0.5
    if variant == "s4d_lin":
        return -0.5 + 1j * np.pi * np.arange(state_dim)
    raise ValueError(f"no deterministic eigenvalues for variant {variant!r}")


def _constant(values: np.ndarray):
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.asarray(np.broadcast_to(values, shape), dtype)
    return init


def _log_uniform_rows(low: float, high: float):
    """log Δ ~ U[log low, log high] per row `[h, k]`, the same value in each of the k columns."""
    def init(key, shape, dtype=jnp.float32):
        rows = jax.random.uniform(key, shape[:1] + (1,), dtype, math.log(low), math.log(high))
        return jnp.broadcast_to(rows, shape)
    return init


class DiagonalSSM(nn.Module):
    """A diagonal state-space layer over `features` independent channels:
    `u [batch, length, features] -> K * u + D ⊙ u` (same shape, float32).

    `variant` picks parameterisation and initialisation:
      - "gss" (GSS's simplified DSS kernel): λ = −exp(λ_re) + i·exp(λ_im) shared by all
        channels, no Δ (absorbed), C ~ N(0, 1) complex [H, N], D ~ N(0, 1) — every parameter
        N(0, 1), the GSS paper's "random initialisation works well for LM";
      - "dss" (DSS_softmax, the DSS paper's and reference's default `version='softmax'`):
        λ = re + i·im unconstrained, shared by all channels, initialised at DSS's skew-HiPPO
        eigenvalues; per-channel step sizes Δ = exp(log_dt), log-uniform in [dt_min, dt_max],
        separate for the real and imaginary part of λ (DSS's sep_dt_re_im) when `separate_dt`;
        W ~ N(0, 1) complex; D ~ N(0, 1). The kernel is normalised over the L positions of the
        input (a softmax over positions of each mode's powers):
        `K[l] = Re Σ_n W_n (e^{Δλ_n} − 1) / (λ_n (e^{LΔλ_n} − 1)) e^{lΔλ_n}`, modes with
        Re λ > 0 mirrored (the reference's max-shift) so no power overflows. Outputs depend on
        the input's length, so it does not decode token by token;
      - "dss_exp" (DSS_exp): as "dss" with Re λ = −exp(log_neg_re) < 0 and
        `K[l] = Re Σ_n W_n (e^{Δλ_n} − 1) / λ_n e^{lΔλ_n}`: a recurrence (S4D-LegS with DSS's W
        init);
      - "s4d_lin": as "dss_exp" with S4D-Lin eigenvalues λ_n = −1/2 + iπn and C ~ complex
        N(0, 1) (variance 1/2 per part, S4D's init).
    `state_dim` counts complex modes (S4D's N/2 conjugate pairs = N here).
    """

    features: int
    state_dim: int = 64
    variant: str = "dss_exp"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    separate_dt: bool = True

    def setup(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown SSM variant {self.variant!r}; use one of {VARIANTS}")
        h, n = self.features, self.state_dim
        channel_modes = nn.with_logical_partitioning
        normal = nn.initializers.normal(1.0)
        if self.variant == "gss":
            self.lambda_log_neg_re = self.param(
                "lambda_log_neg_re", channel_modes(normal, (SSM_STATE,)), (n,), jnp.float32)
            self.lambda_log_im = self.param(
                "lambda_log_im", channel_modes(normal, (SSM_STATE,)), (n,), jnp.float32)
            c_std = 1.0
        else:
            evals = initial_eigenvalues(self.variant, n)
            if self.variant == "dss":
                self.lambda_re = self.param(
                    "lambda_re", channel_modes(_constant(evals.real), (SSM_STATE,)), (n,),
                    jnp.float32)
            else:
                self.lambda_log_neg_re = self.param(
                    "lambda_log_neg_re", channel_modes(_constant(np.log(-evals.real)),
                                                       (SSM_STATE,)), (n,), jnp.float32)
            self.lambda_im = self.param(
                "lambda_im", channel_modes(_constant(evals.imag), (SSM_STATE,)), (n,), jnp.float32)
            self.log_dt = self.param(
                "log_dt", channel_modes(_log_uniform_rows(self.dt_min, self.dt_max),
                                        (SSM_CHANNELS, None)),
                (h, 2 if self.separate_dt else 1), jnp.float32)
            c_std = math.sqrt(0.5) if self.variant == "s4d_lin" else 1.0
        c_init = channel_modes(nn.initializers.normal(c_std), (SSM_CHANNELS, SSM_STATE))
        self.c_re = self.param("c_re", c_init, (h, n), jnp.float32)
        self.c_im = self.param("c_im", c_init, (h, n), jnp.float32)
        self.d = self.param("d", channel_modes(normal, (SSM_CHANNELS,)), (h,), jnp.float32)

    def discretized(self) -> tuple[jnp.ndarray, jnp.ndarray]:
        """`(C̃ [features, N] complex64, log z)`: log z = Δλ, `[features, N]` (per-channel Δ) or
        `[N]` ("gss": Δ = 1, shared by all channels); Re log z < 0 (the recurrent variants)."""
        if self.variant not in RECURRENT_VARIANTS:
            raise ValueError(f"the {self.variant!r} SSM kernel is normalised over the input's "
                             f"length, so it has no recurrence to decode with: use one of "
                             f"{RECURRENT_VARIANTS}")
        re = -jnp.exp(self.lambda_log_neg_re)
        if self.variant == "gss":
            lam = jax.lax.complex(re, jnp.exp(self.lambda_log_im))
            log_z = lam
        else:
            lam = jax.lax.complex(re, self.lambda_im)
            dt = jnp.exp(self.log_dt)  # [h, 1 or 2]: steps for (real, imaginary) parts
            log_z = jax.lax.complex(dt[:, :1] * re, dt[:, -1:] * self.lambda_im)
        c = jax.lax.complex(self.c_re, self.c_im)
        return c * complex_expm1(log_z) / lam, log_z

    def kernel(self, length: int) -> jnp.ndarray:
        """float32 `[features, length]`: `K[h, l] = Re Σ_n C̃[h, n] z[h, n]^l` (for "dss", the
        softmax kernel of an input of `length` positions)."""
        if self.variant == "dss":
            return self.softmax_kernel(length)
        coeff, log_z = self.discretized()
        return power_kernel(coeff, log_z, length)

    def softmax_kernel(self, length: int) -> jnp.ndarray:
        """DSS_softmax, float32 `[features, length]`. A mode with Re λ > 0 is evaluated
        mirrored: `e^{lΔλ} / Σ_r e^{rΔλ} = e^{−(L−1−l)Δλ} / Σ_r e^{−rΔλ}`, so both halves are
        powers of a base of modulus ≤ 1 (`power_kernel`), the second read backwards."""
        dt = jnp.exp(self.log_dt)  # [h, 1 or 2]
        lam = jax.lax.complex(self.lambda_re, self.lambda_im)
        dt_lam = jax.lax.complex(dt[:, :1] * self.lambda_re, dt[:, -1:] * self.lambda_im)
        growing = self.lambda_re > 0  # [N]
        log_base = jnp.where(growing, -dt_lam, dt_lam)  # [h, N], Re ≤ 0
        denominator = complex_expm1(log_base * length) * lam
        # W (e^{Δλ} − 1) / (λ (e^{LΔλ} − 1)), the division as the reference's `reciprocal`
        coeff = (jax.lax.complex(self.c_re, self.c_im) * complex_expm1(log_base)
                 * jnp.conj(denominator) / (jnp.abs(denominator) ** 2 + SOFTMAX_EPSILON))
        # The reference shifts a growing mode's exponents by (L−1)Δλ under no_grad; the factor
        # below is 1 but gives the mirrored terms the reference's gradient (that of e^{lΔλ}).
        shift = jnp.exp((length - 1) * (dt_lam - jax.lax.stop_gradient(dt_lam)))
        decaying = power_kernel(jnp.where(growing, 0.0, coeff), log_base, length)
        mirrored = power_kernel(jnp.where(growing, coeff * shift, 0.0), log_base,
                                length)[:, ::-1]
        return decaying + mirrored

    def __call__(self, u: jnp.ndarray) -> jnp.ndarray:
        """`u [batch, length, features]` -> float32 `[batch, length, features]`, by FFT."""
        y = causal_fft_conv(u, self.kernel(u.shape[1]))
        return y + self.d * u.astype(jnp.float32)

    @nn.nowrap
    def initial_state(self, batch: int) -> jnp.ndarray:
        """The zero state: complex64 `[batch, features, N]`."""
        return jnp.zeros((batch, self.features, self.state_dim), jnp.complex64)

    def step(self, u: jnp.ndarray, state: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """One recurrent step: `u [batch, features]`, `state [batch, features, N]` ->
        (float32 `y [batch, features]`, the next state). Equals `__call__` token by token."""
        coeff, log_z = self.discretized()
        u = u.astype(jnp.float32)
        state = jnp.exp(log_z) * state + u[..., None]
        y = jnp.sum((coeff * state).real, axis=-1)
        return y + self.d * u, state


def ssm_kernel_flops(features: int, state_dim: int) -> float:
    """FLOPs per token of building a complex `power_kernel` once per sequence (two real matmuls
    of features·N·length multiply-adds)."""
    return 4.0 * features * state_dim


def ssm_flops_per_token(features: int, state_dim: int, length: int) -> float:
    """Forward FLOPs per token of `DiagonalSSM` at `length`: kernel, FFT convolution, D skip."""
    return ssm_kernel_flops(features, state_dim) + features * (fft_conv_flops(length) + 2)

