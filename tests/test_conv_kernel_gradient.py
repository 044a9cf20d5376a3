"""`layers.conv_general_dilated`: the 3x3 convolution whose kernel gradient XLA:CPU gets as
per-tap contractions. Values and both gradients must be the convolution's, checked against a
closed form written out in numpy; every other convolution is `lax.conv_general_dilated`'s."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_bs.models import layers


def _conv(f, features, **kwargs):
    return nn.Conv(features, (3, 3), conv_general_dilated=f, **kwargs)


def _numpy_conv3x3_and_grads(x, k, g):
    """out[b,h,w,o] = Σ_{i,j,c} xp[b,h+i,w+j,c] k[i,j,c,o]; dK and dx of Σ out·g, by hand."""
    _, height, width, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).astype(np.float64)
    out = sum(
        np.einsum("bhwc,co->bhwo", xp[:, i : i + height, j : j + width], k[i, j])
        for i in range(3)
        for j in range(3)
    )
    dk = np.stack(
        [
            np.einsum("bhwc,bhwo->co", xp[:, i : i + height, j : j + width], g)
            for i in range(3)
            for j in range(3)
        ]
    ).reshape(k.shape)
    dxp = np.zeros_like(xp)
    for i in range(3):
        for j in range(3):
            dxp[:, i : i + height, j : j + width] += np.einsum("bhwo,co->bhwc", g, k[i, j])
    return out, dk, dxp[:, 1:-1, 1:-1]


def test_the_3x3_conv_and_its_gradients_match_the_closed_form():
    rng = np.random.default_rng(0)
    # H ≠ W, so a swapped tap fails; H·W ≥ MIN_TAPS_PIXELS, so the per-tap path runs.
    x = rng.standard_normal((2, 32, 33, 4)).astype(np.float32)
    g = rng.standard_normal((2, 32, 33, 3)).astype(np.float32)
    conv = _conv(layers.conv_general_dilated, 3, padding=((1, 1), (1, 1)), use_bias=False)
    params = conv.init(jax.random.key(0), x)
    k = np.asarray(params["params"]["kernel"])

    def loss(params, x):
        return jnp.sum(conv.apply(params, x) * g)

    (dparams, dx) = jax.grad(loss, argnums=(0, 1))(params, x)
    out, dk, dx_ref = _numpy_conv3x3_and_grads(x, k, g)
    # float32 sums of ≤ 36 products of O(1) terms: 1e-5 relative is ~100 ulps of headroom.
    np.testing.assert_allclose(conv.apply(params, x), out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dparams["params"]["kernel"], dk, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    # On the CPU the kernel gradient is no convolution but nine per-tap contractions (loss is
    # linear in the output, so its gradient needs neither the forward nor dx).
    text = jax.jit(jax.grad(loss)).lower(params, x).as_text()
    assert text.count("stablehlo.convolution") == 0 and text.count("stablehlo.dot_general") == 9


@pytest.mark.parametrize(
    "kwargs",
    [
        {"padding": ((1, 1), (1, 1))},  # on an 8x8 map: under MIN_TAPS_PIXELS
        {"padding": ((1, 1), (1, 1)), "strides": (2, 2)},
        {"padding": "VALID"},
        {"padding": ((1, 1), (1, 1)), "kernel_dilation": (2, 2)},
    ],
)
def test_other_convolutions_are_lax_convolutions(kwargs):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    ours, plain = (_conv(f, 3, **kwargs) for f in (layers.conv_general_dilated, None))
    params = plain.init(jax.random.key(0), x)
    for f in (
        lambda m: m.apply(params, x),
        lambda m: jax.grad(lambda p: m.apply(p, x).sum())(params),
    ):
        jax.tree.map(np.testing.assert_array_equal, f(ours), f(plain))
