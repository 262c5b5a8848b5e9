"""GRPO math: group-relative advantages and the ratio loss with a k3 KL to the reference.

Follows the seed (grpo_lora_small): K samples per prompt, binary-ish math reward,
advantage = (r - mean_group(r)) / (std_group(r) + 1e-5), loss = -A * exp(lp_new - lp_old)
plus a KL term. The seed's std is `torch.std` (unbiased, ddof=1); we keep that. The seed's KL
("~ sum log p_new / log p_old") is replaced by the standard non-negative k3 estimator of
KL(pi || ref) (Schulman 2020, used by DeepSeekMath's GRPO). Optional PPO-style clipping.

Shapes: `P` prompts, `K` samples per prompt, `B = P*K` rows (prompt-major: row p*K + k),
`T` completion tokens; `mask [B,T]` is 1.0 on completion tokens that count.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array

AGGREGATIONS = ("token_mean", "seq_mean")


def group_advantages(rewards: Array, k: int, *, mean_only: bool = False,
                     eps: float = 1e-5) -> Array:
    """Group-normalised advantages.

      A_{p,i} = (r_{p,i} - mean_i r_{p,i}) / (std_i r_{p,i} + eps)     (mean_only: no division)
    std is the *sample* std (ddof=1, `torch.std` default, as the seed). A group whose rewards are
    all equal gets A = 0. rewards: `[P*K]` (prompt-major) or `[P,K]`; returns the same shape.
    """
    r = jnp.asarray(rewards, jnp.float32)
    shape = r.shape
    if r.ndim == 1:
        if r.shape[0] % k:
            raise ValueError(f"{r.shape[0]} rewards do not split into groups of k={k}")
        r = r.reshape(-1, k)
    elif r.shape[-1] != k:
        raise ValueError(f"rewards shape {r.shape} does not end in k={k}")
    centered = r - r.mean(axis=-1, keepdims=True)
    if mean_only:
        return centered.reshape(shape)
    if k < 2:
        raise ValueError("std-normalised group advantages need k >= 2 (use mean_only=True)")
    std = jnp.std(r, axis=-1, ddof=1, keepdims=True)
    return (centered / (std + eps)).reshape(shape)


def k3_kl(logp: Array, ref_logp: Array) -> Array:
    """Per-token k3 estimate of KL(pi || ref) from sampled-token log-probs.

      d = ref_lp - lp;   k3 = exp(d) - d - 1   (>= 0, unbiased for samples from pi)
    """
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def k1_kl(logp: Array, ref_logp: Array) -> Array:
    """Per-token k1 estimate lp - ref_lp (unbiased, can be negative)."""
    return logp - ref_logp


def aggregate(x: Array, mask: Array, how: str = "token_mean") -> Array:
    """Reduces per-token `x [B,T]` to a scalar.

      token_mean: sum(x m) / sum(m)                       (every token weighs the same)
      seq_mean:   mean_b [ sum_t(x m) / max(sum_t m, 1) ]   (every sequence weighs the same)
    """
    if how == "token_mean":
        return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    if how == "seq_mean":
        per_seq = (x * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
        return per_seq.mean()
    raise ValueError(f"unknown aggregation {how!r}; choose one of {AGGREGATIONS}")


def grpo_loss(logprobs_new: Array, logprobs_old: Array, ref_logprobs: Optional[Array],
              advantages: Array, mask: Array, *, clip_eps: Optional[float] = None,
              kl_coef: float = 0.0, aggregation: str = "token_mean"
              ) -> Tuple[Array, Dict[str, Array]]:
    """GRPO objective on one batch of completions.

      ratio_t = exp(lp_new_t - lp_old_t)
      pg_t    = -A * ratio_t                                       (clip_eps None, the seed)
              = -min(A * ratio_t, A * clip(ratio_t, 1-eps, 1+eps))  (clip_eps set, PPO-style)
      kl_t    = k3(lp_new_t, ref_lp_t)
      loss    = aggregate(pg_t + kl_coef * kl_t, mask)
    logprobs_*: `[B,T]`; advantages `[B]` (one per completion); ref_logprobs may be None when
    kl_coef == 0. Returns (loss, stats: pg_loss, kl, ratio_mean, clipfrac, adv_mean).
    """
    mask = mask.astype(jnp.float32)
    lp_old = jax.lax.stop_gradient(logprobs_old)
    adv = jax.lax.stop_gradient(advantages).astype(jnp.float32)[:, None]  # [B,1]
    ratio = jnp.exp(logprobs_new - lp_old)
    if clip_eps is None:
        pg = -adv * ratio
        clipped = jnp.zeros_like(ratio)
    else:
        unclipped_obj = adv * ratio
        clipped_obj = adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
        pg = -jnp.minimum(unclipped_obj, clipped_obj)
        clipped = (clipped_obj < unclipped_obj).astype(jnp.float32)
    per_token = pg
    if ref_logprobs is not None:
        kl = k3_kl(logprobs_new, jax.lax.stop_gradient(ref_logprobs))
    else:
        if kl_coef:
            raise ValueError("grpo_loss: kl_coef > 0 needs ref_logprobs")
        kl = jnp.zeros_like(pg)
    if kl_coef:
        per_token = per_token + kl_coef * kl
    loss = aggregate(per_token, mask, aggregation)
    sg = jax.lax.stop_gradient
    stats = {
        "pg_loss": sg(aggregate(pg, mask, aggregation)),
        "kl": sg(aggregate(kl, mask, aggregation)),
        "ratio_mean": sg(aggregate(ratio, mask, "token_mean")),
        "clipfrac": aggregate(clipped, mask, "token_mean"),
        "adv_mean": jnp.mean(adv),
    }
    return loss, stats
