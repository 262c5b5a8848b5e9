"""Pure logits processing for the sampler: EOS masking, temperature, top-k, top-p, draw.

Order and semantics follow transformers' `generate` (logits processors, then warpers):
  1. min_new_tokens: logits[eos] = -inf while fewer than `min_new_tokens` tokens were emitted;
  2. temperature:    z = logits / T;
  3. top-k:          keep the k largest z (exactly k; transformers also keeps ties with the k-th);
  4. top-p:          on the kept z sorted descending with p = softmax(z), keep token j iff
                     sum_{i<j} p_i < top_p  (the smallest prefix with cumulative mass >= top_p;
                     the most likely token is always kept);
  5. draw:           token ~ softmax(kept z)  (Gumbel-max via `jax.random.categorical`);
                     greedy: argmax of the step-1 logits.

Efficiency: filtering works in *candidate space*. With top_k > 0 only `lax.top_k` candidates
[B, k] are kept (no vocabulary sort); with top_p < 1 and top_k == 0 the vocabulary is sorted
once; otherwise the full [B, V] logits are the candidates (`ids is None`).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


class Candidates(NamedTuple):
    """Filtered logits over a candidate set: token ids[b, c] has logit logits[b, c] (-inf = removed).

    logits: [B, C] float32 (temperature applied). ids: [B, C] int32 vocabulary ids, or None when
    the candidates are the whole vocabulary in order (C == V).
    """
    logits: jax.Array
    ids: Optional[jax.Array]


def token_set(token_ids, vocab_size: int):
    """bool [V], True at token_ids (int array [E]; entries < 0 are padding and ignored)."""
    ids = jnp.asarray(token_ids, jnp.int32).reshape(-1)
    return jnp.any(jnp.arange(vocab_size, dtype=jnp.int32)[None, :] == ids[:, None], axis=0)


def mask_tokens(logits, token_ids, active):
    """logits [B, V] with logits[b, t] = -inf for t in token_ids where active[b] (bool [B] or [])."""
    hit = token_set(token_ids, logits.shape[-1])
    return jnp.where(jnp.asarray(active)[..., None] & hit, NEG_INF, logits)


def apply_temperature(logits, temperature: float):
    """z = logits / T (T > 0; T == 1 is the identity)."""
    if temperature == 1.0:
        return logits
    return logits / jnp.asarray(temperature, logits.dtype)


def top_p_sorted(sorted_logits, top_p: float):
    """Top-p on logits sorted descending along the last axis: -inf where sum_{i<j} p_i >= top_p.

    p = softmax(sorted_logits). The first column is always kept.
    """
    if top_p >= 1.0:
        return sorted_logits
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # exclusive prefix mass
    keep = before < top_p
    keep = keep.at[..., 0].set(True)
    return jnp.where(keep, sorted_logits, NEG_INF)


def top_k_values(x, k: int, chunk: int = 0):
    """(values, ids) of the k largest entries of x [B, V], sorted descending, lower id first on ties.

    chunk > 0: exact selection through slice maxima. x is cut into `chunk`-wide slices; the k
    slices with the largest maxima hold every one of the k largest entries (a slice holding one
    has a maximum >= the k-th value, and on a tie at the k-th value the slice of the lower id
    comes first, as `lax.top_k` orders ties), so one `lax.top_k` over those k x chunk candidates,
    gathered in vocabulary order, gives exactly `lax.top_k(x, k)`. Work per row: one max
    reduction over V, a top-k over V / chunk maxima and one over k x chunk values, instead of a
    vocabulary-wide sort. (Before: a top-k inside each 1024-wide slice, ~0.42 ms per qwen decode
    step on an H100; XLA's k<=16 GPU top-k kernel as a first stage was slower still.)
    """
    B, V = x.shape
    if chunk <= 0 or k * chunk >= V:   # the k slices would cover the whole vocabulary
        vals, ids = jax.lax.top_k(x, k)
        return vals, ids.astype(jnp.int32)
    C = -(-V // chunk)
    xc = jnp.pad(x, ((0, 0), (0, C * chunk - V)), constant_values=NEG_INF).reshape(B, C, chunk)
    _, sel = jax.lax.top_k(jnp.max(xc, axis=-1), k)                   # [B, k] slices holding the top k
    sel = jnp.sort(sel.astype(jnp.int32), axis=-1)                     # vocabulary order (ties: lower id first)
    cand = jnp.take_along_axis(xc, sel[:, :, None], axis=1).reshape(B, k * chunk)
    vals, j = jax.lax.top_k(cand, k)
    j = j.astype(jnp.int32)
    return vals, jnp.take_along_axis(sel, j // chunk, axis=-1) * chunk + j % chunk


TOP_K_CHUNK = None  # top-k slice width (see `top_k_values`); None = `top_k_chunk(V, k)`, 0 = one `lax.top_k` over V


def top_k_chunk(vocab_size: int, k: int) -> int:
    """The slice width for `top_k_values`: the power of two nearest sqrt(V / k), at least 8.

    A step's work is ~V / chunk slice maxima plus k * chunk candidates, least at sqrt(V / k). On an
    H100, top-k 50 / top-p 0.95 sampling steps (us) by width 8 / 16 / 32 / 64 / 128: B16 V50257
    82 / 63 / 56 / 64 / 83; B128 V50257 150 / 84 / 75 / 85 / 155; B64 V49152 87 / 66 / 59 / 67 / 87;
    B64 V151936 243 / 192 / 122 / 109 / 123 (BENCHMARKS.md, session 18): this picks 32, 32, 32, 64.
    """
    return max(8, 1 << round(math.log2(math.sqrt(vocab_size / max(k, 1)))))


def candidates(logits, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Candidates:
    """Steps 2-4 above on logits [B, V] (after EOS masking) -> Candidates."""
    z = apply_temperature(logits.astype(jnp.float32), temperature)
    V = z.shape[-1]
    if top_k and top_k < V:
        chunk = top_k_chunk(V, top_k) if TOP_K_CHUNK is None else TOP_K_CHUNK
        vals, ids = top_k_values(z, top_k, chunk)  # sorted descending, lower index first on ties
        return Candidates(top_p_sorted(vals, top_p), ids)
    if top_p < 1.0:
        iota = jnp.broadcast_to(jnp.arange(V, dtype=jnp.int32), z.shape)
        neg, ids = jax.lax.sort((-z, iota), dimension=-1, num_keys=1, is_stable=True)
        return Candidates(top_p_sorted(-neg, top_p), ids)
    return Candidates(z, None)


def dense_logits(c: Candidates, vocab_size: int):
    """Candidates back to full-vocabulary logits [B, V] (-inf outside the candidate set)."""
    if c.ids is None:
        return c.logits
    full = jnp.full(c.logits.shape[:-1] + (vocab_size,), NEG_INF, c.logits.dtype)
    return jax.vmap(lambda f, i, v: f.at[i].set(v))(full, c.ids, c.logits)


def processed_logits(logits, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Full-vocabulary logits [B, V] of the sampling distribution (log-probs up to a constant)."""
    return dense_logits(candidates(logits, temperature=temperature, top_k=top_k, top_p=top_p),
                        logits.shape[-1])


def draw(keys, c: Candidates):
    """One token per row: keys [B] (typed keys) -> (tokens [B] int32, logprob under c [B] float32).

    Each row uses only its own key, so results do not depend on batch size or sharding.
    """
    idx = jax.vmap(lambda k, z: jax.random.categorical(k, z))(keys, c.logits)
    logp = jnp.take_along_axis(jax.nn.log_softmax(c.logits, axis=-1), idx[:, None], axis=-1)[:, 0]
    tok = idx if c.ids is None else jnp.take_along_axis(c.ids, idx[:, None], axis=-1)[:, 0]
    return tok.astype(jnp.int32), logp


def token_logprob(logits, tokens):
    """log softmax(logits)[b, tokens[b]]: logits [B, V] float32, tokens [B] -> [B]."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - lse


def sample_tokens(logits, keys, *, greedy: bool, temperature: float, top_k: int, top_p: float,
                  ban=None):
    """The whole step: logits [B, V] f32 raw model logits, keys [B] row keys for this step.

    ban: optional bool [V] or [B, V] of tokens forbidden at this step (EOS before min_new_tokens).
    Returns (tokens [B], logprobs [B] = raw log_softmax(logits)[token] (T = 1, no filtering),
    sample_logprobs [B] = log-prob under the processed distribution; 0 for greedy).
    """
    masked = logits if ban is None else jnp.where(ban, NEG_INF, logits)
    if greedy:
        tok = jnp.argmax(masked, axis=-1).astype(jnp.int32)
        slp = jnp.zeros(tok.shape, jnp.float32)
    else:
        tok, slp = draw(keys, candidates(masked, temperature=temperature, top_k=top_k, top_p=top_p))
    return tok, token_logprob(logits, tok), slp
