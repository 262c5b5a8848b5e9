"""Logits processing (temperature, top-k, top-p, EOS masking, draw) against explicit numpy code."""
import functools

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from jaxrl_sparse import sampling


def np_log_softmax(x):
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    with np.errstate(divide="ignore"):
        return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def np_top_k(x, k):
    """transformers TopKLogitsWarper: remove scores below the k-th largest."""
    if k <= 0 or k >= x.shape[-1]:
        return x
    kth = np.sort(x, axis=-1)[..., -k][..., None]
    return np.where(x < kth, -np.inf, x)


def np_top_p(x, p):
    """transformers TopPLogitsWarper: ascending sort, remove cumprobs <= 1 - p, keep the top token."""
    if p >= 1.0:
        return x
    out = x.copy()
    for b in range(x.shape[0]):
        order = np.argsort(x[b], kind="stable")
        probs = np.exp(np_log_softmax(x[b][order].astype(np.float64)))
        cum = np.cumsum(probs)
        remove = cum <= 1.0 - p
        remove[-1] = False
        out[b, order[remove]] = -np.inf
    return out


def np_process(x, temperature, top_k, top_p):
    return np_top_p(np_top_k(x / temperature, top_k), top_p)


@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(0)
    # distinct values (no ties) with a spread that makes top-p cut inside the vocabulary
    return (rng.standard_normal((4, 50)) * 2.0).astype(np.float32)


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.5, 0, 0.3), (1.0, 10, 0.6),
    (2.0, 49, 0.95), (1.0, 1, 1.0), (1.0, 0, 1e-6)])
def test_processed_logits_match_numpy(logits, temperature, top_k, top_p):
    fn = jax.jit(functools.partial(sampling.processed_logits, temperature=temperature, top_k=top_k,
                                   top_p=top_p))
    got = np.asarray(fn(jnp.asarray(logits)))
    want = np_process(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-6)
    kept = finite.sum(axis=1)
    assert (kept >= 1).all()
    if top_k:
        assert (kept <= top_k).all()


def test_top_p_keeps_smallest_prefix():
    # probs 0.5, 0.3, 0.15, 0.05: top_p=0.8 keeps {0.5, 0.3}; 0.81 adds 0.15; 0.4 keeps only 0.5
    x = np.log(np.array([[0.15, 0.5, 0.05, 0.3]], np.float32))
    for p, keep in [(0.8, {1, 3}), (0.81, {0, 1, 3}), (0.4, {1}), (1.0, {0, 1, 2, 3})]:
        got = np.asarray(sampling.top_p_sorted(jnp.sort(jnp.asarray(x))[:, ::-1], p))[0]
        got = got[np.argsort(np.argsort(-x[0]))]  # back to vocabulary order
        assert set(np.flatnonzero(np.isfinite(got))) == keep, p


def test_mask_tokens_only_active_rows():
    x = jnp.zeros((3, 6))
    out = np.asarray(sampling.mask_tokens(x, jnp.array([2, 4, -1]), jnp.array([True, False, True])))
    assert np.isneginf(out[[0, 2]][:, [2, 4]]).all()
    assert np.isfinite(out[1]).all() and np.isfinite(np.delete(out[0], [2, 4])).all()


def test_min_new_tokens_masks_eos_then_releases():
    x = jnp.asarray(np.array([[0.0, 5.0, 1.0]], np.float32))  # token 1 (EOS) is the argmax
    keys = jax.random.split(jax.random.key(0), 1)
    kw = dict(greedy=True, temperature=1.0, top_k=0, top_p=1.0)
    eos = sampling.token_set(jnp.array([1, -1]), 3)
    fn = jax.jit(lambda x, k, t: sampling.sample_tokens(x, k, ban=eos & (t < 2), **kw))
    tok0, lp0, _ = fn(x, keys, jnp.int32(1))
    tok1, _, _ = fn(x, keys, jnp.int32(2))
    assert int(tok0[0]) == 2 and int(tok1[0]) == 1
    # the raw log-prob ignores the masking: log_softmax of the unmasked logits
    np.testing.assert_allclose(float(lp0[0]), np_log_softmax(np.asarray(x))[0, 2], rtol=1e-6)


def test_draw_frequencies_match_distribution(logits):
    """Empirical token frequencies over many keys follow softmax of the processed logits."""
    n = 8000
    x = jnp.tile(jnp.asarray(logits[:1]), (n, 1))
    keys = jax.random.split(jax.random.key(1), n)
    fn = jax.jit(lambda k, x: sampling.draw(k, sampling.candidates(x, temperature=0.8, top_k=6, top_p=0.9)))
    toks, logp = fn(keys, x)
    toks, logp = np.asarray(toks), np.asarray(logp)
    want = np.exp(np_log_softmax(np_process(logits[:1], 0.8, 6, 0.9)))[0]
    freq = np.bincount(toks, minlength=want.size) / n
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(want))
    np.testing.assert_allclose(freq, want, atol=0.025)
    # sample log-prob is the log of the processed probability of the drawn token
    np.testing.assert_allclose(np.exp(logp), want[toks], rtol=1e-5)


def test_sample_tokens_top_k1_is_greedy_and_raw_logprob(logits):
    x = jnp.asarray(logits)
    keys = jax.random.split(jax.random.key(3), x.shape[0])
    common = dict(temperature=0.9, top_p=1.0)
    g, glp, gslp = jax.jit(functools.partial(sampling.sample_tokens, greedy=True, top_k=0, **common))(x, keys)
    k1, klp, kslp = jax.jit(functools.partial(sampling.sample_tokens, greedy=False, top_k=1, **common))(x, keys)
    np.testing.assert_array_equal(np.asarray(g), np.argmax(logits, axis=-1))
    np.testing.assert_array_equal(np.asarray(k1), np.asarray(g))
    want = np_log_softmax(logits)[np.arange(4), np.asarray(g)]
    np.testing.assert_allclose(np.asarray(glp), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(klp), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(kslp), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gslp), 0.0)


@pytest.mark.parametrize("case", ["random", "one_chunk_holds_all", "ties", "few_values", "tie_across_maxima"])
def test_chunked_top_k_is_exact(case):
    """Top-k through slice maxima equals lax.top_k exactly, also when one slice holds the whole top
    k, on ties (lower id first), and when most slices share their maximum; V not a multiple of chunk."""
    rng = np.random.default_rng(0)
    B, V, k, chunk = 3, 5003, 20, 32
    x = rng.normal(size=(B, V)).astype(np.float32)
    if case == "one_chunk_holds_all":  # row 1's top-k all in one slice
        x[1, 512:512 + 40] = 10.0 + np.arange(40, dtype=np.float32)
    if case == "ties":
        x = np.round(x * 2) / 2  # many equal values: lower id first on ties
    if case == "few_values":
        x = np.round(x).clip(-1, 2)  # the k-th value is tied across many slices
    if case == "tie_across_maxima":  # the k-th value (1) sits in a late slice with a larger max and in early ones
        x = np.full((B, V), -5.0, np.float32)
        x[:, 4000:4002] = [3.0, 1.0]
        x[:, 10:2000:50] = 1.0
    vals, ids = sampling.top_k_values(jnp.asarray(x), k, chunk)
    ref_v, ref_i = jax.lax.top_k(jnp.asarray(x), k)
    np.testing.assert_array_equal(np.asarray(vals), np.asarray(ref_v))
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ref_i))


def test_top_k_chunk_balances_maxima_and_candidates():
    """The default slice width is the power of two nearest sqrt(V / k) (the fastest widths measured
    on an H100 for top-k 50: 32 for V ~50k, 64 for V ~152k), and the sampler's candidates with it
    are lax.top_k's exactly."""
    assert [sampling.top_k_chunk(v, 50) for v in (50257, 49152, 151936)] == [32, 32, 64]
    assert sampling.top_k_chunk(64, 50) == 8 and sampling.top_k_chunk(50257, 1) == 256
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 50257)).astype(np.float32))
    c = sampling.candidates(x, top_k=50)
    ref_v, ref_i = jax.lax.top_k(x, 50)
    np.testing.assert_array_equal(np.asarray(c.logits), np.asarray(ref_v))
    np.testing.assert_array_equal(np.asarray(c.ids), np.asarray(ref_i))
