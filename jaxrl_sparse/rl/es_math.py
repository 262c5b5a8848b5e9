"""Evolution-strategies math: seeds, reward normalisation, WP / low-rank WP / NP-replay updates.

Notation: N members, z_n the z-scored reward of member n, alpha the step size, sigma the noise scale.
Each method gives an ascent direction g (`wp_delta`, `lowrank_delta`, `np_replay_delta`):
    WP (full or low-rank):   g = 1 / N * sum_n z_n eps_n
    NP (replay):             g = 1 / (N sigma) * sum_n z_n sum_t eps_{n,t} x_{n,t}^T
(kernels here are [in, out], so the NP term is x^T eps), and `optimizer_step` applies it: the seed's
theta <- theta + alpha g (sgd), or Adam with learning rate alpha. Noise is always regenerated from keys.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_sparse import tree as tree_lib
from jaxrl_sparse.models.config import ModelConfig
from jaxrl_sparse.models.decoder import ActNoise, forward, init_cache, noise_eps
from jaxrl_sparse.transforms import perturb


# ----------------------------------------------------------------------------- seeds and rewards
def iteration_seeds(key, iteration: int, pop_size: int, antithetic: bool = False
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """(seeds uint32 [N], signs float32 [N]) of one iteration, from `fold_in(key, iteration)`.

    antithetic: members 2i and 2i+1 share a seed with signs +1 / -1 (N must be even).
    """
    k = jax.random.fold_in(key, iteration)
    n_seeds = pop_size // 2 if antithetic else pop_size
    seeds = np.asarray(jax.random.randint(k, (n_seeds,), 0, np.iinfo(np.int32).max, jnp.int32)).astype(np.uint32)
    if not antithetic:
        return seeds, np.ones(pop_size, np.float32)
    return np.repeat(seeds, 2), np.tile(np.array([1.0, -1.0], np.float32), n_seeds)


def member_keys(noise_key, seeds):
    """Typed keys [N] = fold_in(noise_key, seed_n)."""
    return jax.vmap(lambda s: perturb.member_key(noise_key, s))(jnp.asarray(seeds, jnp.uint32))


def zscore(rewards, eps: float = 1e-8):
    """z = (r - mean r) / (std r + eps) over the population axis; all-equal rewards give z = 0."""
    r = jnp.asarray(rewards, jnp.float32)
    return (r - r.mean()) / (r.std() + eps)


def row_advantages(rewards, eps: float = 1e-8):
    """[N, M] rewards (member n, prompt m) -> (r - mean_n r[:, m]) / (std of those over all n, m + eps).

    Centred per prompt across the population (a prompt every member answers alike contributes 0),
    scaled once over the whole array so prompts keep their relative weight."""
    r = jnp.asarray(rewards, jnp.float32)
    c = r - r.mean(axis=0, keepdims=True)
    return c / (jnp.sqrt((c * c).mean()) + eps)


# ----------------------------------------------------------------------------- WP update directions
def wp_delta(params, keys, coefs, paths: Sequence[str]) -> Dict[str, jax.Array]:
    """{path: 1/N sum_n coefs_n eps_n(keys_n)} in fp32 (coefs = z * sign): the WP step before alpha.

    keys [N] typed; the sum regenerates one member's noise at a time (scan), so memory stays at
    one extra copy of the selected leaves.
    """
    N = coefs.shape[0]
    flat = tree_lib.flatten(params)

    def body(acc, kc):
        k, c = kc
        eps = perturb.weight_noise(params, k, paths)
        return {p: acc[p] + c * eps[p] for p in paths}, None

    acc0 = {p: jnp.zeros(flat[p].shape, jnp.float32) for p in paths}
    acc, _ = jax.lax.scan(body, acc0, (keys, jnp.asarray(coefs, jnp.float32)))
    return {p: a / N for p, a in acc.items()}


def lowrank_delta(params, keys, coefs, paths: Sequence[str], rank: int) -> Dict[str, jax.Array]:
    """{path: 1/N sum_n coefs_n A_n B_n^T / sqrt(r)} on the low-rank kernels (fp32)."""
    N = coefs.shape[0]
    fac = perturb.population_lowrank_factors(params, keys, paths, rank)
    c = jnp.asarray(coefs, jnp.float32)
    out = {}
    for p in paths:
        a, b = fac[p]                                   # [N, ..., in, r], [N, ..., out, r]
        d = jnp.einsum("n...ir,n...or->...io", a * c.reshape((N,) + (1,) * (a.ndim - 1)), b)
        out[p] = d / (math.sqrt(rank) * N)
    return out


# ----------------------------------------------------------------------------- the ES optimizer
OPTIMIZERS = ("sgd", "adam")


def optimizer_init(optimizer: str, like: Dict[str, Any]) -> Dict[str, Any]:
    """State of the ES optimizer for update directions shaped like `like` ({path: array}):
    sgd keeps none ({}); adam keeps fp32 first / second moments per path and a step count."""
    if optimizer == "sgd":
        return {}
    zeros = lambda: {p: jnp.zeros(x.shape, jnp.float32) for p, x in like.items()}
    return {"count": jnp.zeros((), jnp.int32), "mu": zeros(), "nu": zeros()}


def optimizer_step(params, g: Dict[str, jax.Array], state: Dict[str, Any], *, optimizer: str, alpha: float,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """(params, state) after one ascent step along the ES estimate g ({path: fp32}).

    sgd (the seed's):  theta += alpha * g
    adam (Salimans et al. 2017 use Adam on the ES estimate): m = b1 m + (1-b1) g, v = b2 v + (1-b2) g^2,
        theta += alpha * m_hat / (sqrt(v_hat) + eps) with bias-corrected m_hat, v_hat: a per-coordinate
        normalised step whose momentum averages the estimates of successive iterations.
    """
    if optimizer == "sgd":
        return apply_delta(params, {p: alpha * d for p, d in g.items()}), state
    if optimizer != "adam":
        raise ValueError(f"unknown ES optimizer {optimizer!r}; choose one of {OPTIMIZERS}")
    count = state["count"] + 1
    t = count.astype(jnp.float32)
    mu = {p: b1 * state["mu"][p] + (1 - b1) * d for p, d in g.items()}
    nu = {p: b2 * state["nu"][p] + (1 - b2) * d * d for p, d in g.items()}
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    step = {p: alpha * (mu[p] / c1) / (jnp.sqrt(nu[p] / c2) + eps) for p in g}
    return apply_delta(params, step), {"count": count, "mu": mu, "nu": nu}


# ----------------------------------------------------------------------------- NP replay
@jax.custom_vjp
def _inject(y, ct):
    """Identity whose backward adds the cotangent `ct` to y's: the gradient of <ct, y> w.r.t. y's
    producers, without summing <ct, y> inside the scanned blocks."""
    return y


def _inject_fwd(y, ct):
    return y, ct


def _inject_bwd(ct, g):
    return g + ct.astype(g.dtype), jnp.zeros_like(ct)


_inject.defvjp(_inject_fwd, _inject_bwd)


def _replay_interceptor(noise: ActNoise, positions, weights, layer_on):
    """Dense hook for the replay: every Dense input is stop-gradient'ed (so a kernel's gradient is
    only its direct x^T ct term) and o_proj / down_proj outputs get ct = weights * eps injected, eps
    the row's noise as generation drew it (`decoder.noise_eps`: start and sign included).

    weights [R, T] = coef_row * contrib mask; layer_on: {site: [L] bool} (sites being updated).
    """
    tracker = perturb._LayerTracker()
    site_of = {"layers/attn/o_proj/kernel": "attn", "layers/mlp/down_proj/kernel": "mlp"}

    def icpt(next_fun, args, kwargs, context):
        handled, out = tracker.wrap(next_fun, args, kwargs, context)
        if handled:
            return out
        path = perturb._dense_path(context)
        if path is None:
            return next_fun(*args, **kwargs)
        y = next_fun(jax.lax.stop_gradient(args[0]), *args[1:], **kwargs)
        site = site_of.get(path)
        if site is None or site not in layer_on:
            return y
        layer = tracker.layer
        eps = noise_eps(noise, site, layer, positions, y.shape[-1])
        w = weights * layer_on[site][layer].astype(jnp.float32)
        return _inject(y, (w[..., None] * eps).astype(y.dtype))

    return nn.intercept_methods(icpt)


def np_contrib_mask(prompt_mask, resp_mask, prompt: bool = True):
    """[R, P+N] positions whose forward pass ran with noise and shaped a sampled token.

    Real prompt tokens (prefill; only with `prompt`, i.e. the prompt ran with noise) and response
    tokens that were fed back while the row was alive: response token i was fed iff token i+1
    exists (the last sampled token is never fed).
    """
    resp = jnp.asarray(resp_mask, jnp.bool_)
    fed = jnp.concatenate([resp[:, 1:], jnp.zeros_like(resp[:, :1])], axis=1)
    pm = jnp.asarray(prompt_mask, jnp.bool_)
    return jnp.concatenate([pm if prompt else jnp.zeros_like(pm), fed], axis=1)


def np_replay_delta(params, cfg: ModelConfig, tokens, mask, contrib, row_keys, row_coef,
                    scales, include: str, last_k: int, *, tok_chunk: int = 256, micro_rows: int = 0,
                    compute_dtype=None, start_hidden=None, noise_start=None,
                    noise_sign=None) -> Dict[str, jax.Array]:
    """{path: Delta} = sum_b row_coef_b sum_t [contrib] x_{b,t}^T eps_{b,t} per updated parameter.

    tokens, mask, contrib [R, S] (prompt + response; positions = cumsum(mask) - 1 as in generate);
    row_keys [R, 2] uint32 (the ActNoise keys used in generation); row_coef [R] (z_n / (N sigma)
    for every row of member n); scales: (attn [L], mlp [L], head []) as in generation, so replayed
    activations see the same noise. Computed as the gradient of a surrogate, S tokens at a time
    (`tok_chunk`, with a KV cache between chunks) and `micro_rows` rows at a time (0 = all), all
    accumulated in fp32. Call inside `jax.jit` (cfg, include, last_k, tok_chunk, micro_rows static).

    start_hidden [R, S, D] (needs last_k > 0): the residual stream entering block j = L - last_k at
    every position, as `generate(..., capture_layer=j)` returns it. Blocks < j run without noise, so
    their output is what generation computed: the replay then runs only blocks j..L-1 (same
    interceptor, noise and chunking; the KV cache holds last_k blocks) and the result equals the
    full replay. Updates of layers < j are zero, as in the full replay.

    noise_start [R] int (generation with noise_in_prompt=False): row r's noise starts at position
    noise_start[r] (its prompt length), as in generation; contrib must then exclude the prompt.
    noise_sign [R] float (antithetic NP pairs): row r's noise was sign_r eps; the replay uses the same
    signed noise (`decoder.noise_eps`), so row_coef carries z, not the sign.
    """
    L = cfg.num_layers
    j0 = 0
    if start_hidden is not None:
        if not 0 < last_k <= L:
            raise ValueError(f"start_hidden needs 0 < last_k <= {L} (the replay starts at block L - last_k)")
        j0 = L - last_k
    sites = perturb.parse_np_include(include)
    lm = perturb.np_layer_mask(cfg, last_k)
    layer_on = {s: lm for s in ("attn", "mlp") if s in sites}
    regex = perturb.np_param_regex(cfg, include)
    flat = tree_lib.flatten(params)
    if j0:  # the forward reads only blocks [j0, L): slice once, accumulate [L - j0, ...], pad at the end
        flat = {p: (x[j0:] if p.startswith("layers/") else x) for p, x in flat.items()}
    head_path = None
    if "head" in sites:  # the head's input is the final hidden state: its update is direct
        head_path = "embed/embedding" if cfg.tie_embeddings else "lm_head/kernel"
    sel_paths = sorted(tree_lib.select(params, regex, what="NP parameters")) if regex else []
    sel_paths = [p for p in sel_paths if p != head_path]
    rest = {p: x for p, x in flat.items() if p not in sel_paths}
    sel = {p: flat[p] for p in sel_paths}
    R, S = tokens.shape
    mb = micro_rows if micro_rows and micro_rows < R else R
    if R % mb:
        raise ValueError(f"rows {R} not divisible by micro batch {mb}")
    positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
    weights = contrib.astype(jnp.float32) * row_coef[:, None].astype(jnp.float32)
    attn_s, mlp_s, head_s = scales

    def cast(tree):
        if compute_dtype is None:
            return tree
        return {p: x.astype(compute_dtype) for p, x in tree.items()}

    def surrogate(sel_, tok, msk, pos, w, noise, cache, h0):
        full = tree_lib.unflatten({**cast(rest), **cast(sel_)})
        with _replay_interceptor(noise, pos, w, layer_on):
            out = forward(full, cfg, tok, msk, positions=pos, cache=cache, noise=noise,
                          compute_logits=False, start_layer=j0, start_hidden=h0)
        # the value is 0; the gradient is the injected x^T ct of every site
        return jnp.sum(out.hidden.astype(jnp.float32)) * 0.0, (out.cache, out.hidden)

    grad_fn = jax.grad(surrogate, has_aux=True)

    def micro(acc, xs):
        tok, msk, pos, w, keys, start, n0, sg = xs
        noise = ActNoise(keys, attn_s, mlp_s, head_s, start=n0, sign=sg)
        cache = init_cache(cfg, tok.shape[0], S, layers=L - j0)
        for s0 in range(0, S, tok_chunk):
            sl = slice(s0, min(S, s0 + tok_chunk))
            g, (cache, hidden) = grad_fn(sel, tok[:, sl], msk[:, sl], pos[:, sl], w[:, sl], noise, cache,
                                         None if start is None else start[:, sl])
            cache = jax.lax.stop_gradient(cache)
            acc = {p: acc[p] + (g[p].astype(jnp.float32) if p in g else 0.0) for p in acc}
            if head_path is not None:
                V = (flat[head_path].shape[0] if cfg.tie_embeddings else flat[head_path].shape[1])
                eps = noise_eps(noise, "head", 0, pos[:, sl], V)
                ct = w[:, sl, None] * eps * (head_s > 0)
                h = hidden.astype(jnp.float32)
                if cfg.tie_embeddings:
                    d = jnp.einsum("rtv,rtd->vd", ct, h)
                else:
                    d = jnp.einsum("rtd,rtv->dv", h, ct)
                acc[head_path] = acc[head_path] + d
        return acc, None

    acc_paths = list(sel_paths) + ([head_path] if head_path else [])
    acc0 = {p: jnp.zeros(flat[p].shape, jnp.float32) for p in acc_paths}
    split = lambda x: x.reshape((R // mb, mb) + x.shape[1:])
    xs = tuple(map(split, (tokens, mask, positions, weights, row_keys)))
    optional = (start_hidden, noise_start, noise_sign)
    acc, _ = jax.lax.scan(micro, acc0, xs + tuple(None if x is None else split(x) for x in optional))
    if j0:  # blocks < j0 carry no noise: their update is zero
        acc = {p: (jnp.concatenate([jnp.zeros((j0,) + d.shape[1:], d.dtype), d]) if p.startswith("layers/") else d)
               for p, d in acc.items()}
    return acc


def apply_delta(params, delta: Dict[str, jax.Array]):
    """params + delta on the delta's paths (fp32 sum, stored in each leaf's dtype)."""
    flat = dict(tree_lib.flatten(params))
    for p, d in delta.items():
        flat[p] = (flat[p].astype(jnp.float32) + d).astype(flat[p].dtype)
    return tree_lib.unflatten(flat)
