"""Mega's multi-dimensional damped EMA (lexjax.layers.ema) against the paper's recurrence (eq. 5)
in float64, hand-worked kernels that pin the paper's naming of α and δ, a direct O(N²)
convolution for gradients, and long lengths."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from helpers import step_through
from lexjax.layers.ema import DampedEMA, ema_flops_per_token
from lexjax.training.state import check_logical_axes


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def paper_recurrence(x: np.ndarray, params: dict) -> np.ndarray:
    """Eq. 5 in float64: u_t = β x_t, h_t = α u_t + (1 − α δ) h_{t−1}, y_t = ηᵀ h_t."""
    p = {k: np.asarray(v, np.float64) for k, v in nn.unbox(params).items()}
    alpha, delta = sigmoid(p["alpha_logit"]), sigmoid(p["delta_logit"])
    eta = p["eta"] / np.sqrt(p["eta"].shape[-1])
    h = np.zeros(x.shape[:1] + alpha.shape)
    ys = []
    for t in range(x.shape[1]):
        h = alpha * (p["beta"] * x[:, t, :, None]) + (1 - alpha * delta) * h
        ys.append(np.sum(eta * h, axis=-1))
    return np.stack(ys, axis=1)


def init_ema(features=3, ema_dim=4, length=16, seed=0):
    layer = DampedEMA(features, ema_dim)
    return layer, layer.init(jax.random.PRNGKey(seed), jnp.zeros((1, length, features)))


def with_params(variables, **values):
    params = dict(nn.unbox(variables["params"]))
    params.update({k: jnp.asarray(v, jnp.float32) for k, v in values.items()})
    return {"params": params}


def test_fft_equals_paper_recurrence(rng):
    layer, variables = init_ema(length=50)
    x = rng.normal(size=(2, 50, 3))
    got = layer.apply(variables, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, paper_recurrence(x, variables["params"]), rtol=1e-4,
                               atol=1e-5)


def test_hand_worked_kernels_follow_the_papers_alpha_and_delta():
    """α weights the input and δ damps the memory (the reference code swaps the names)."""
    layer, variables = init_ema(features=1, ema_dim=1)
    big = 40.0  # sigmoid(±40) = 1 or 0 in float32
    # α = 1, δ = 0: h_t = β x_t + h_{t−1}, a running sum: K[t] = η β for all t.
    v = with_params(variables, alpha_logit=[[big]], delta_logit=[[-big]], beta=[[2.0]],
                    eta=[[3.0]])
    np.testing.assert_allclose(layer.apply(v, 6, method=DampedEMA.kernel), [[6.0] * 6],
                               rtol=1e-6)
    # α = 1/2, δ = 1: K[t] = η β α (1 − α)^t = 2^-(t+1).
    v = with_params(variables, alpha_logit=[[0.0]], delta_logit=[[big]], beta=[[1.0]],
                    eta=[[1.0]])
    np.testing.assert_allclose(layer.apply(v, 5, method=DampedEMA.kernel),
                               [[0.5, 0.25, 0.125, 0.0625, 0.03125]], rtol=1e-6)
    # α = 1/2, δ = 1/2 (both logits 0) with h = 2, η̃ = (1, 1): K[t] = 2 · (1/√2)(1/2)(3/4)^t.
    layer2, variables2 = init_ema(features=1, ema_dim=2)
    v = with_params(variables2, alpha_logit=[[0.0, 0.0]], delta_logit=[[0.0, 0.0]],
                    beta=[[1.0, 1.0]], eta=[[1.0, 1.0]])
    want = [2 * 0.5 * 0.75 ** t / np.sqrt(2) for t in range(4)]
    np.testing.assert_allclose(layer2.apply(v, 4, method=DampedEMA.kernel), [want], rtol=1e-6)


def test_recurrent_step_equals_fft(rng):
    layer, variables = init_ema(length=20)
    x = jnp.asarray(rng.normal(size=(2, 20, 3)), jnp.float32)
    np.testing.assert_allclose(step_through(layer, variables, x, DampedEMA.step),
                               layer.apply(variables, x), rtol=1e-4, atol=1e-5)


def test_gradients_equal_direct_convolution(rng):
    layer, variables = init_ema(length=32)
    x = jnp.asarray(rng.normal(size=(2, 32, 3)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(2, 32, 3)), jnp.float32)

    def direct(v, inputs):
        kernel = layer.apply(v, inputs.shape[1], method=DampedEMA.kernel)
        lag = jnp.arange(32)[:, None] - jnp.arange(32)[None, :]
        toeplitz = jnp.where(lag >= 0, kernel[:, jnp.clip(lag, 0)], 0.0)
        return jnp.einsum("cts,bsc->btc", toeplitz, inputs, precision="highest")

    def grads(fn):
        return jax.jit(jax.grad(lambda v, inputs: jnp.sum(fn(v, inputs) * weights),
                                argnums=(0, 1)))(variables, x)

    for got, want in zip(jax.tree_util.tree_leaves(grads(layer.apply)),
                         jax.tree_util.tree_leaves(grads(direct))):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_finite_and_exact_at_long_lengths():
    """q = 1 − αδ ≈ 1 − 1e-6: long memory over 2^16 positions, no overflow or drift."""
    layer, variables = init_ema(features=1, ema_dim=2)
    v = with_params(variables, alpha_logit=[[0.0, 3.0]], delta_logit=[[-13.8, 0.0]],
                    beta=[[1.0, -1.0]], eta=[[1.0, 0.5]])
    length = 1 << 16
    kernel = np.asarray(layer.apply(v, length, method=DampedEMA.kernel))[0]
    assert np.all(np.isfinite(kernel))
    alpha = sigmoid(np.array([0.0, 3.0]))
    q = 1 - alpha * sigmoid(np.array([-13.8, 0.0]))
    t = np.array([0, 5, 4097, length - 1])
    want = (np.array([1.0, -0.5]) * alpha / np.sqrt(2))[:, None] * q[:, None] ** t
    np.testing.assert_allclose(kernel[t], want.sum(0), rtol=1e-4)
    x = jnp.ones((1, length, 1))
    assert bool(jnp.all(jnp.isfinite(layer.apply(v, x))))


def test_init_and_axes():
    layer, variables = init_ema(features=2, ema_dim=6)
    check_logical_axes(variables["params"])
    beta = np.asarray(nn.unbox(variables["params"])["beta"])
    np.testing.assert_allclose(beta, np.tile([1, -1, 1, -1, 1, -1], (2, 1)), atol=0.1)
    assert ema_flops_per_token(2, 6, 1024) > 2 * 2 * 6
