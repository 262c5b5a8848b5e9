"""The fused weight-gradient + Adam kernel (`kernels.dw_adam`): optax's arithmetic, CUDA lowering."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export

from jaxrl_sparse.kernels import dw_adam as fz

TRITON = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


def _inputs(M, K, N, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    x, dy = jax.random.normal(ks[0], (M, K)), jax.random.normal(ks[1], (M, N))
    p = jax.random.normal(ks[2], (K, N))
    mu, nu = 0.1 * jax.random.normal(ks[3], (K, N)), 0.01 * jax.random.uniform(ks[4], (K, N))
    mask = jax.random.bernoulli(ks[5], 0.7, (K, N))
    return x, dy, p, mu, nu, mask


@pytest.mark.parametrize("M,masked,layout", [(40, False, {}), (37, True, {}),  # 37: rows padded to the dot tile
                                             (37, True, dict(transposed=True, prefetch=True))])
def test_kernel_is_optax_adam_on_the_weight_gradient(M, masked, layout):
    """The kernel (interpreted on the CPU) against optax.adam applied to g = xᵀ dy (masked), at
    step 3 (bias corrections not 1): new weights and both moments."""
    K, N = 32, 64
    x, dy, p, mu, nu, mask = _inputs(M, K, N)
    hyper = fz.AdamHyper(lr=1e-2, eps=1e-6)
    g = np.asarray(x, np.float64).T @ np.asarray(dy, np.float64)
    if masked:
        g = g * np.asarray(mask)
    opt = optax.adam(hyper.lr, eps=hyper.eps)
    state = (optax.ScaleByAdamState(jnp.int32(2), mu, nu), optax.EmptyState())
    upd, (st, _) = opt.update(jnp.asarray(g, jnp.float32), state, p)
    want = (optax.apply_updates(p, upd), st.mu, st.nu)
    blocks = fz.fit_blocks(K, N, fz.Blocks(bk=64, bn=32, bm=16, **layout))
    assert blocks[:3] == (32, 32, 16)
    got = fz.dw_adam(x, dy, p, mu, nu, fz.corrections(st.count, hyper), mask if masked else None,
                     hyper=hyper, blocks=blocks, interpret=True)
    for name, a, b in zip(("p", "mu", "nu"), got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6, err_msg=name)
    assert float(jnp.max(jnp.abs(got[0] - p))) > 1e-3  # the step moved the weights
    if masked:  # masked entries: zero gradient, the moments only decay
        np.testing.assert_allclose(np.asarray(got[1])[~np.asarray(mask)], 0.9 * np.asarray(mu)[~np.asarray(mask)],
                                   rtol=1e-6)


def test_fewer_programs_than_tiles_walk_every_tile():
    """blocks.programs: 3 programs step through the 6 tiles of a [64, 96] weight (2 each, rows and
    columns of tiles both > 1): the same step as the plain-jnp reference, every tile updated."""
    x, dy, p, mu, nu, mask = _inputs(40, 64, 96, seed=2)
    hyper = fz.AdamHyper(lr=1e-2, eps=1e-6)
    c = fz.corrections(jnp.int32(3), hyper)
    blocks = fz.fit_blocks(64, 96, fz.Blocks(bk=32, bn=32, bm=16, programs=4))
    assert blocks.programs == 3  # the largest divisor of 6 tiles up to 4
    want = fz.dw_adam_reference(x, dy, p, mu, nu, c, mask, hyper=hyper)
    got = fz.dw_adam(x, dy, p, mu, nu, c, mask, hyper=hyper, blocks=blocks, interpret=True)
    for name, a, b in zip(("p", "mu", "nu"), got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6, err_msg=name)
    assert np.all(np.abs(np.asarray(got[1] - mu)) > 0)  # no tile left out: every first moment moved
    again = fz.dw_adam(x, dy, p, mu, nu, c, mask, hyper=hyper, blocks=blocks._replace(programs=4), interpret=True)
    for a, b in zip(again, got):  # 4 programs asked for: 3 used (4 does not divide 6 tiles)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_off_the_gpu_the_reference_runs():
    """interpret=None on the CPU lowers the plain-jnp reference (platform_dependent): same result."""
    x, dy, p, mu, nu, _ = _inputs(16, 32, 32, seed=1)
    hyper = fz.AdamHyper(lr=1e-3)
    c = fz.corrections(jnp.int32(1), hyper)
    ref = fz.dw_adam_reference(x, dy, p, mu, nu, c, hyper=hyper)
    got = fz.dw_adam(x, dy, p, mu, nu, c, hyper=hyper, blocks=fz.Blocks(bk=32, bn=32, bm=16))
    for a, b in zip(got, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_fit_blocks():
    assert fz.fit_blocks(1024, 3072)[:2] == (32, 64)
    assert fz.fit_blocks(576, 960, fz.Blocks(bk=128, bn=128))[:2] == (64, 64)  # SmolLM2's widths
    assert fz.fit_blocks(24, 64) is None  # no tile >= 16 divides 24
    assert fz.fit_blocks(1024, 3072, fz.Blocks(programs=132)).programs == 128  # 1536 tiles
    assert fz.fit_blocks(576, 960).programs == 135  # SmolLM2's q/k/v: 270 tiles, 256 does not divide
    assert fz.fit_blocks(1024, 3072, fz.Blocks(programs=0)).programs == 0  # one program per tile
    with pytest.raises(ValueError, match="do not divide"):
        x, dy, p, mu, nu, _ = _inputs(8, 32, 48)
        fz.dw_adam(x, dy, p, mu, nu, jnp.ones(2), hyper=fz.AdamHyper(lr=1.0), blocks=fz.Blocks(bk=32, bn=32))


@pytest.mark.parametrize("masked,blocks", [(False, fz.Blocks()), (True, fz.Blocks(transposed=True, prefetch=True)),
                                           (True, fz.Blocks(programs=256))])
def test_kernel_lowers_for_cuda(masked, blocks):
    """Lowered for CUDA on this CPU machine (jax.export): the program is the Triton kernel, with the
    weights and both moments updated in place (aliased to the outputs)."""
    K, N = 1024, 3072
    a = jax.ShapeDtypeStruct
    args = [a((320, K), jnp.float32), a((320, N), jnp.float32), a((K, N), jnp.float32), a((K, N), jnp.float32),
            a((K, N), jnp.float32), a((2,), jnp.float32)] + ([a((K, N), jnp.bool_)] if masked else [])
    f = jax.jit(lambda *v: fz.dw_adam(*v, hyper=fz.AdamHyper(lr=1e-5), blocks=blocks))
    text = export.export(f, platforms=("cuda",), disabled_checks=[TRITON])(*args).mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "stablehlo.dot_general" not in text  # only the kernel: XLA's reference branch is not lowered
    assert text.count("stablehlo.output_operand_alias<") == 3  # p, mu, nu in place
