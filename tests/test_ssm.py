"""Diagonal state-space layers (lexjax.layers.ssm) against independent float64 references: the FFT
convolution against a direct causal convolution, the blocked Vandermonde kernel against its
closed form, the layer against the explicit recurrence, the FFT path's gradients against a direct
O(N²) convolution, and numerical safety at long lengths."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import step_through
from lexjax.layers.ssm import (RECURRENT_VARIANTS, VARIANTS, DiagonalSSM, causal_fft_conv,
                               complex_expm1,
                               fft_conv_flops, fft_length, hippo_skew_eigenvalues,
                               initial_eigenvalues, power_kernel)
from lexjax.training.state import check_logical_axes


def direct_causal_conv(u: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """float64 `y[b, t, c] = Σ_{s ≤ t} kernel[c, t − s] u[b, s, c]`."""
    b, n, c = u.shape
    y = np.zeros((b, n, c))
    for t in range(n):
        for s in range(t + 1):
            y[:, t] += kernel[:, t - s] * u[:, s]
    return y


def recurrence(u: np.ndarray, z: np.ndarray, coeff: np.ndarray, d: np.ndarray) -> np.ndarray:
    """float64 `x_k = z x_{k−1} + u_k`, `y_k = Re(coeff · x_k) + d u_k`; u `[b, n, h]`,
    z and coeff `[h, N]`."""
    b, n, h = u.shape
    x = np.zeros((b, h, z.shape[-1]), np.complex128)
    ys = []
    for k in range(n):
        x = z * x + u[:, k, :, None]
        ys.append(np.sum(coeff * x, axis=-1).real + d * u[:, k])
    return np.stack(ys, axis=1)


def continuous_params(params: dict, variant: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z [h, N], C̃ [h, N], D [h]) in float64 from a DiagonalSSM's raw parameters, written out from
    the DSS / GSS formulas independently of the layer's code."""
    p = {k: np.asarray(v, np.float64) for k, v in nn.unbox(params).items()}
    re = -np.exp(p["lambda_log_neg_re"])
    if variant == "gss":
        lam = re + 1j * np.exp(p["lambda_log_im"])
        dt_lam = np.broadcast_to(lam, p["c_re"].shape)
    else:
        lam = re + 1j * p["lambda_im"]
        dt = np.exp(p["log_dt"])
        dt_lam = dt[:, :1] * re + 1j * dt[:, -1:] * p["lambda_im"]
    c = p["c_re"] + 1j * p["c_im"]
    return np.exp(dt_lam), c * (np.exp(dt_lam) - 1) / lam, p["d"]


def init_ssm(variant, features=3, state_dim=8, length=16, seed=0):
    layer = DiagonalSSM(features, state_dim, variant=variant)
    u = jnp.zeros((1, length, features))
    return layer, layer.init(jax.random.PRNGKey(seed), u)


def test_fft_length_is_the_smallest_5_smooth_size_without_wraparound():
    def smooth(n):
        for p in (2, 3, 5):
            while n % p == 0:
                n //= p
        return n == 1
    for length in range(1, 300):
        want = next(n for n in range(2 * length - 1, 4 * length + 1) if smooth(n))
        assert fft_length(length) == want, length
    assert fft_length(1024) == 2048


@pytest.mark.parametrize("length", [1, 7, 64, 100])
def test_fft_convolution_equals_direct_causal_convolution(rng, length):
    u = rng.normal(size=(2, length, 3))
    kernel = rng.normal(size=(3, length + 5))  # longer kernels are cut to the input length
    got = causal_fft_conv(jnp.asarray(u, jnp.float32), jnp.asarray(kernel, jnp.float32))
    np.testing.assert_allclose(got, direct_causal_conv(u, kernel), atol=2e-5 * length)


@pytest.mark.parametrize("length", [1, 2, 17, 100])
@pytest.mark.parametrize("kind", ["complex_per_channel", "complex_shared", "real"])
def test_power_kernel_equals_closed_form(rng, length, kind):
    n = 5
    if kind == "real":
        coeff = rng.normal(size=(3, n))
        log_base = np.log(rng.uniform(0.3, 0.999, size=(3, n)))
    else:
        coeff = rng.normal(size=(3, n)) + 1j * rng.normal(size=(3, n))
        shape = (3, n) if kind == "complex_per_channel" else (n,)
        log_base = -rng.uniform(0.001, 0.5, size=shape) + 1j * rng.uniform(0, 3, size=shape)
    dtype = jnp.float32 if kind == "real" else jnp.complex64
    got = power_kernel(jnp.asarray(coeff, dtype), jnp.asarray(log_base, dtype), length)
    steps = np.arange(length)
    want = np.einsum("cn,cnl->cl", coeff,
                     np.exp(np.broadcast_to(log_base, coeff.shape)[..., None] * steps)).real
    assert got.shape == (3, length) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_complex_expm1_has_no_cancellation():
    z = np.array([1e-7 + 2e-7j, -3e-6 + 1e-9j, 0.5 - 2j, -40 + 100j, 1e-20j])
    got = complex_expm1(jnp.asarray(z, jnp.complex64))
    np.testing.assert_allclose(got, np.expm1(z), rtol=1e-6, atol=1e-30)


def test_hippo_skew_eigenvalues_and_inits():
    evals = hippo_skew_eigenvalues(16)
    np.testing.assert_allclose(evals.real, 0, atol=1e-10)  # skew-symmetric: imaginary spectrum
    assert np.all(np.diff(evals.imag) <= 0) and np.all(evals.imag[:8] > 0)
    np.testing.assert_allclose(np.sort(evals.imag[:8]), np.sort(-evals.imag[8:]), rtol=1e-8)
    dss = initial_eigenvalues("dss", 8)
    np.testing.assert_allclose(dss, evals[:8] - 0.5)
    np.testing.assert_allclose(initial_eigenvalues("s4d_lin", 3), [-0.5, -0.5 + np.pi * 1j,
                                                                   -0.5 + 2 * np.pi * 1j])


@pytest.mark.parametrize("variant", RECURRENT_VARIANTS)
def test_layer_equals_explicit_recurrence(rng, variant):
    layer, variables = init_ssm(variant, length=40)
    u = rng.normal(size=(2, 40, 3))
    got = layer.apply(variables, jnp.asarray(u, jnp.float32))
    z, coeff, d = continuous_params(variables["params"], variant)
    want = recurrence(u, z, coeff, d)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # The kernel is the impulse response.
    impulse = np.zeros((1, 40, 3))
    impulse[:, 0] = 1.0
    kernel = layer.apply(variables, 40, method=DiagonalSSM.kernel)
    np.testing.assert_allclose(kernel, (recurrence(impulse, z, coeff, 0 * d)[0]).T,
                               rtol=1e-4, atol=1e-5 * np.abs(kernel).max())


@pytest.mark.parametrize("variant", RECURRENT_VARIANTS)
def test_recurrent_step_equals_convolution(rng, variant):
    layer, variables = init_ssm(variant, length=24)
    u = jnp.asarray(rng.normal(size=(2, 24, 3)), jnp.float32)
    np.testing.assert_allclose(step_through(layer, variables, u, DiagonalSSM.step),
                               layer.apply(variables, u), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["gss", "dss_exp", "dss"])
def test_gradients_equal_direct_convolution(rng, variant):
    layer, variables = init_ssm(variant, length=32)
    u = jnp.asarray(rng.normal(size=(2, 32, 3)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(2, 32, 3)), jnp.float32)

    def direct(v, x):
        """The same layer with an O(N²) Toeplitz convolution in place of the FFT."""
        kernel = layer.apply(v, x.shape[1], method=DiagonalSSM.kernel)
        lag = jnp.arange(32)[:, None] - jnp.arange(32)[None, :]
        toeplitz = jnp.where(lag >= 0, kernel[:, jnp.clip(lag, 0)], 0.0)  # [c, t, s]
        d = nn.unbox(v["params"])["d"]
        return jnp.einsum("cts,bsc->btc", toeplitz, x, precision="highest") + d * x

    def loss(fn, v, x):
        return jnp.sum(fn(v, x) * weights)

    fft_grads = jax.jit(jax.grad(lambda v, x: loss(layer.apply, v, x), argnums=(0, 1)))(
        variables, u)
    direct_grads = jax.jit(jax.grad(lambda v, x: loss(direct, v, x), argnums=(0, 1)))(
        variables, u)
    for got, want in zip(jax.tree_util.tree_leaves(fft_grads),
                         jax.tree_util.tree_leaves(direct_grads)):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_kernel_is_finite_and_accurate_at_long_lengths():
    """Slow modes (|Re| tiny) with fast rotation at 2^17 positions: no overflow, and the powers
    (each one exp, never a product of many) stay accurate far out."""
    length = 1 << 17
    log_base = np.array([-1e-5 + 0.37j, -2e-4 + 3.0j, -0.5 + 40.0j, -30.0 + 0.0j])
    coeff = np.array([[1.0 - 0.5j, 0.3j, 2.0, 1.0]])
    got = np.asarray(power_kernel(jnp.asarray(coeff, jnp.complex64),
                                  jnp.asarray(log_base, jnp.complex64), length))
    assert np.all(np.isfinite(got))
    sample = np.array([0, 1, 999, 65_537, length - 1])
    want = np.einsum("cn,nl->cl", coeff, np.exp(log_base[:, None] * sample)).real
    # Angle l·Im(log z) is formed in float32: absolute phase error ≈ 6e-8 · |angle|.
    np.testing.assert_allclose(got[:, sample], want, atol=2e-3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_layer_is_finite_for_extreme_parameters_at_long_lengths(variant):
    layer, variables = init_ssm(variant, features=2, state_dim=4, length=8)
    extreme = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 30.0), nn.unbox(variables))
    u = jnp.ones((1, 1 << 14, 2))
    apply = jax.jit(layer.apply)
    for params in (extreme, jax.tree_util.tree_map(lambda x: -x, extreme)):
        assert bool(jnp.all(jnp.isfinite(apply(params, u))))


def test_parameters_have_logical_axes_and_float32():
    for variant in VARIANTS:
        _, variables = init_ssm(variant)
        check_logical_axes(variables["params"])
        assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown SSM variant"):
        init_ssm("s4")


def test_fft_flops_grow_logarithmically():
    assert fft_conv_flops(8192) / fft_conv_flops(1024) == pytest.approx(
        np.log2(16384) / np.log2(2048), rel=0.05)


def reference_dss_softmax_kernel(log_dt, lambda_re, lambda_im, w, length, epsilon=1e-7):
    """`DSSKernel.forward` with version='softmax' (ag1988/dss @777084e,
    src/models/sequence/ss/standalone/dss.py) in float64: `log_dt [H, 2]` (sep_dt_re_im),
    `Lambda = re + i im [N]`, `W [H, N]` complex -> `[H, L]`."""
    lam = lambda_re + 1j * lambda_im
    dt = np.exp(log_dt)
    dt_lam = dt[:, :1] * lam.real + 1j * dt[:, 1:] * lam.imag  # [H, N]
    p = dt_lam[..., None] * np.arange(length)  # [H, N, L]
    gt_0 = lam.real > 0
    p = p - (dt_lam * (gt_0 * (length - 1)))[..., None]
    dt_lam_neg = dt_lam * (1 - 2 * gt_0)
    num = np.exp(dt_lam_neg) - 1
    den = np.exp(dt_lam_neg * length) - 1
    x = den * lam
    w = w * num * np.conj(x) / (x * np.conj(x) + epsilon)
    return np.einsum("hn,hnl->hl", w, np.exp(p)).real


@pytest.mark.parametrize("length", [1, 9, 50])
def test_dss_softmax_kernel_is_the_references(rng, length):
    """DSS's default kernel, including modes with Re λ > 0 (mirrored against overflow)."""
    layer, variables = init_ssm("dss", features=3, state_dim=6, length=length)
    params = nn.unbox(variables["params"])
    params["lambda_re"] = jnp.asarray([-0.5, 0.3, -2.0, 1.5, -0.01, 0.02], jnp.float32)
    params["log_dt"] = jnp.asarray(rng.uniform(-4, 0, size=(3, 2)), jnp.float32)
    got = layer.apply({"params": params}, length, method=DiagonalSSM.kernel)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    want = reference_dss_softmax_kernel(p["log_dt"], p["lambda_re"], p["lambda_im"],
                                        p["c_re"] + 1j * p["c_im"], length)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5 * np.abs(want).max())
    u = jnp.asarray(rng.normal(size=(2, length, 3)), jnp.float32)
    np.testing.assert_allclose(layer.apply({"params": params}, u),
                               direct_causal_conv(np.asarray(u), want) + p["d"] * np.asarray(u),
                               rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="normalised over the input's length"):
        layer.apply({"params": params}, u[:, 0], layer.initial_state(2),
                    method=DiagonalSSM.step)


def test_dss_softmax_gradients_are_the_references(rng):
    """The reference computes a growing mode's max-shift under `torch.no_grad()`, so its gradient
    is that of e^{lΔλ} alone: the same formula in jnp with the shift stop-gradiented, against
    the layer's gradients (all parameters, two modes with Re λ > 0)."""
    layer, variables = init_ssm("dss", features=2, state_dim=4, length=12)
    params = nn.unbox(variables["params"])
    params["lambda_re"] = jnp.asarray([-0.4, 0.3, -1.0, 0.8], jnp.float32)
    weights = jnp.asarray(rng.normal(size=(2, 12)), jnp.float32)

    def reference(p):
        lam = jax.lax.complex(p["lambda_re"], p["lambda_im"])
        dt = jnp.exp(p["log_dt"])
        dt_lam = jax.lax.complex(dt[:, :1] * p["lambda_re"], dt[:, 1:] * p["lambda_im"])
        gt_0 = p["lambda_re"] > 0
        exps = dt_lam[..., None] * jnp.arange(12)
        exps = exps - jax.lax.stop_gradient(dt_lam * gt_0 * 11)[..., None]
        neg = dt_lam * (1 - 2 * gt_0)
        x = (jnp.exp(neg * 12) - 1) * lam
        w = (jax.lax.complex(p["c_re"], p["c_im"]) * (jnp.exp(neg) - 1) * jnp.conj(x)
             / (jnp.abs(x) ** 2 + 1e-7))
        return jnp.sum(jnp.real(jnp.einsum("hn,hnl->hl", w, jnp.exp(exps))) * weights)

    def ours(p):
        return jnp.sum(layer.apply({"params": p}, 12, method=DiagonalSSM.kernel) * weights)
    got, want = jax.grad(ours)(params), jax.grad(reference)(params)
    for name in ("lambda_re", "lambda_im", "log_dt", "c_re", "c_im"):
        np.testing.assert_allclose(got[name], want[name], rtol=2e-3, atol=1e-4, err_msg=name)
