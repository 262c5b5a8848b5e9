"""PPO math with TRL 0.8.6 `PPOTrainer` semantics, as small pure `jnp` functions.

Every function mirrors one piece of `trl/core.py` / `trl/trainer/ppo_trainer.py` /
`trl/trainer/utils.py` at v0.8.6 (the seed's pinned version); the docstrings give the equation
and the TRL name. Shapes: `B` batch (rows), `T` response tokens, `V` vocabulary. A `mask [B,T]`
is 1.0 on response tokens that count and 0.0 on padding.

How TRL's `PPOTrainer.step` strings them together (the loop in `rl/ppo.py` follows this order):

1. scores `[B]` -> `process_scores` (optional running-moment scaling/normalisation, clipping);
2. `rewards, non_score_reward, kls = compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)`
   with the *current* KL coefficient;
3. `advantages, returns, values = gae(rewards, values, mask, gamma, lam)` once per batch;
4. for each PPO epoch, for each mini-batch: `ppo_loss(...)` on fresh forward passes, one optimiser
   step per mini-batch (the loss is zeroed when the mean ratio exceeds `ratio_threshold`);
   after each *epoch*, `early_stop(last mini-batch's policykl, target_kl, early_stopping)`;
5. `kl_coef = kl_ctl_update(kl_coef, mean_kl_objective(kls, mask), n_steps=B, target, horizon)`.

Note the two KL targets of TRL: `target` (default 6) drives the adaptive KL *coefficient* on the
summed-per-sequence KL; `target_kl` (default 1) is the early-stopping bound on `policykl`.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array

KL_KINDS = ("kl", "abs", "mse", "full")


# --------------------------------------------------------------------------- masked statistics
def masked_mean(x: Array, mask: Array, axis=None) -> Array:
    """`sum(x * m) / sum(m)` over `axis` (all axes when None). TRL `core.masked_mean`."""
    return (x * mask).sum(axis=axis) / mask.sum(axis=axis)


def masked_var(x: Array, mask: Array, unbiased: bool = True) -> Array:
    """Masked variance over all elements, TRL `core.masked_var`.

    var = masked_mean((x - masked_mean(x))^2); with `unbiased`, times Bessel's n/(n-1), n = sum(m).
    TRL raises when n == 0; here n == 1 gives inf and n == 0 gives nan (jit cannot raise), so keep
    mini-batches larger than one token.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1)
    return var


def masked_whiten(x: Array, mask: Array, shift_mean: bool = True) -> Array:
    """(x - mean) * rsqrt(var + 1e-8) with masked mean and unbiased masked var (TRL).

    With `shift_mean=False` the mean is added back: only the scale changes. Padding positions are
    transformed too (TRL does not re-zero them); callers mask downstream.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out


def clip_by_value(x: Array, lo: Array, hi: Array) -> Array:
    """max(min(x, hi), lo) elementwise (TRL `clip_by_value`, bounds may be arrays)."""
    return jnp.maximum(jnp.minimum(x, hi), lo)


def logprobs_from_logits(logits: Array, labels: Array) -> Array:
    """log_softmax(logits)[..., labels]: logits `[B,T,V]`, labels `[B,T]` int -> `[B,T]`."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def entropy_from_logits(logits: Array) -> Array:
    """H = logsumexp(z) - sum_v softmax(z)_v z_v: `[..., V]` -> `[...]` (TRL)."""
    logits = logits.astype(jnp.float32)
    p = jax.nn.softmax(logits, axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(p * logits, axis=-1)


# --------------------------------------------------------------------------- KL penalty / rewards
def kl_penalty(logprob: Array, ref_logprob: Array, kind: str = "kl", *,
               logits: Optional[Array] = None, ref_logits: Optional[Array] = None) -> Array:
    """Per-token KL estimate between policy and reference, TRL `_kl_penalty`.

    kind='kl':   lp - ref_lp                 ('k1', unbiased, can be negative)
    kind='abs':  |lp - ref_lp|
    kind='mse':  0.5 (lp - ref_lp)^2
    kind='full': sum_v p_v (log p_v - log ref_v)   exact KL(pi || ref) from full logits `[B,T,V]`
                 (TRL: `F.kl_div(ref_logprob, logprob, log_target=True).sum(-1)`).
    logprob, ref_logprob: `[B,T]` log-probs of the sampled tokens (unused for 'full').
    Returns `[B,T]`.
    """
    if kind == "kl":
        return logprob - ref_logprob
    if kind == "abs":
        return jnp.abs(logprob - ref_logprob)
    if kind == "mse":
        return 0.5 * jnp.square(logprob - ref_logprob)
    if kind == "full":
        if logits is None or ref_logits is None:
            raise ValueError("kl_penalty(kind='full') needs logits and ref_logits [B,T,V]")
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        ref = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
        return jnp.sum(jnp.exp(lp) * (lp - ref), axis=-1)
    raise ValueError(f"unknown kl penalty {kind!r}; choose one of {KL_KINDS}")


def last_token_onehot(mask: Array) -> Array:
    """One-hot `[B,T]` at the last position where mask > 0 (all zeros for an empty row)."""
    t = mask.shape[-1]
    pos = jnp.arange(t)
    last = jnp.max(jnp.where(mask > 0, pos, -1), axis=-1)  # [B], -1 when empty
    return (pos[None, :] == last[:, None]).astype(jnp.float32)


def compute_rewards(scores: Array, logprobs: Array, ref_logprobs: Array, mask: Array,
                    kl_coef, kind: str = "kl", *, logits: Optional[Array] = None,
                    ref_logits: Optional[Array] = None) -> Tuple[Array, Array, Array]:
    """Per-token rewards from sequence scores and the KL penalty (TRL `compute_rewards`).

      kl_t   = kl_penalty(lp_t, ref_lp_t)                   [B,T]
      nsr_t  = -kl_coef * kl_t                               [B,T]  ("non_score_reward")
      r_t    = nsr_t + score * [t == last response token]    [B,T]
    scores `[B]`; returns (rewards, non_score_reward, kl), each `[B,T]`. Like TRL, the KL term is
    not masked here (gae masks rewards); a row without response tokens gets no score (TRL errors).
    """
    kl = kl_penalty(logprobs, ref_logprobs, kind, logits=logits, ref_logits=ref_logits)
    non_score = -kl_coef * kl
    rewards = non_score + scores[:, None].astype(non_score.dtype) * last_token_onehot(mask)
    return rewards, non_score, kl


def mean_kl_objective(kl: Array, mask: Array) -> Array:
    """TRL's `objective/kl`: mean over rows of sum_t kl_t m_t (the KL controller's input)."""
    return jnp.mean(jnp.sum(kl * mask, axis=-1))


# --------------------------------------------------------------------------- KL controllers
def kl_ctl_update(value, current_kl, n_steps, target, horizon):
    """Adaptive KL coefficient update (Ziegler et al. 2019; TRL `AdaptiveKLController.update`).

      err   = clip(current_kl / target - 1, -0.2, 0.2)
      value <- value * (1 + err * n_steps / horizon)
    `n_steps` is the number of samples in the PPO batch (TRL: batch_size * num_processes).
    A fixed controller (`adap_kl_ctrl=False`, TRL `FixedKLController`) simply never calls this;
    see `kl_ctl_step`.
    """
    err = jnp.clip(current_kl / target - 1.0, -0.2, 0.2)
    return value * (1.0 + err * n_steps / horizon)


def kl_ctl_step(value, current_kl, n_steps, *, adaptive: bool, target: float = 6.0,
                horizon: float = 10000.0):
    """Adaptive (`kl_ctl_update`) or fixed (value unchanged) controller step."""
    if not adaptive:
        return value
    return kl_ctl_update(value, current_kl, n_steps, target, horizon)


# --------------------------------------------------------------------------- GAE
def gae(rewards: Array, values: Array, mask: Array, gamma: float = 1.0, lam: float = 0.95, *,
        whiten_rewards: bool = False, whiten_advantages: bool = True
        ) -> Tuple[Array, Array, Array]:
    """Generalised advantage estimation exactly as TRL `compute_advantages`.

      V <- V * m ;  r <- r * m ;  (whiten_rewards: r <- masked_whiten(r, m, shift_mean=False))
      delta_t = r_t + gamma * V_{t+1} - V_t            (V_T = 0)
      A_t     = delta_t + gamma * lam * A_{t+1}        (A_T = 0; reverse scan over t)
      returns = A + V                                  (before whitening)
      A      <- masked_whiten(A, m)                    (whiten_advantages, TRL always does)
    rewards, values, mask: `[B,T]`. Returns (advantages, returns, masked_values), all `[B,T]`;
    TRL stores the *masked* values as the old values that the clipped value loss uses.
    """
    values = values * mask
    rewards = rewards * mask
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values  # [B,T]

    def step(carry, delta_t):  # carry: A_{t+1} [B]
        a_t = delta_t + gamma * lam * carry
        return a_t, a_t

    _, adv_tb = jax.lax.scan(step, jnp.zeros_like(deltas[:, 0]), deltas.T, reverse=True)
    advantages = adv_tb.T
    returns = advantages + values
    if whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return jax.lax.stop_gradient(advantages), returns, values


# --------------------------------------------------------------------------- loss
def ppo_loss(old_logprobs: Array, values_old: Array, logprobs_new: Array, vpreds_new: Array,
             advantages: Array, returns: Array, mask: Array, *, cliprange: float = 0.2,
             cliprange_value: float = 0.2, vf_coef: float = 0.1,
             ratio_threshold: Optional[float] = 10.0, logits: Optional[Array] = None
             ) -> Tuple[Array, Dict[str, Array]]:
    """Clipped PPO policy + clipped value loss on one mini-batch (TRL `PPOTrainer.loss`).

      ratio    = exp(lp_new - lp_old)
      pg_loss  = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))
      vclip    = clip(v_new, v_old - eps_v, v_old + eps_v)
      vf_loss  = 0.5 * masked_mean(max((v_new - R)^2, (vclip - R)^2))
      loss     = pg_loss + vf_coef * vf_loss
      if masked_mean(ratio) > ratio_threshold: pg_loss, vf_loss, loss <- 0   (batch skipped)
      approxkl = 0.5 * masked_mean((lp_new - lp_old)^2);  policykl = masked_mean(lp_old - lp_new)
    All array inputs `[B,T]` (advantages/returns/values_old from `gae`, stop-gradient'ed);
    `logits [B,T,V]` (optional) only feeds the entropy statistic. `ratio_threshold=None` never
    skips. Returns (loss scalar, stats) with TRL's stat names; `ppo/skipped` is 1.0 when skipped.
    """
    old_logprobs, values_old, advantages, returns = jax.lax.stop_gradient(
        (old_logprobs, values_old, advantages, returns))
    mask = mask.astype(jnp.float32)
    vpredclipped = clip_by_value(vpreds_new, values_old - cliprange_value,
                                 values_old + cliprange_value)
    vf_losses1 = (vpreds_new - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(jnp.maximum(vf_losses1, vf_losses2), mask)
    vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).astype(jnp.float32), mask)

    log_ratio = logprobs_new - old_logprobs
    ratio = jnp.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(jnp.maximum(pg_losses, pg_losses2), mask)
    pg_clipfrac = masked_mean((pg_losses2 > pg_losses).astype(jnp.float32), mask)

    loss = pg_loss + vf_coef * vf_loss
    avg_ratio = masked_mean(ratio, mask)
    if ratio_threshold is None:
        skipped = jnp.zeros((), jnp.bool_)
    else:
        skipped = avg_ratio > ratio_threshold
    keep = jnp.where(skipped, 0.0, 1.0)
    pg_loss, vf_loss, loss = pg_loss * keep, vf_loss * keep, loss * keep

    lr_sg = jax.lax.stop_gradient(log_ratio)
    ratio_sg = jax.lax.stop_gradient(ratio)
    big = jnp.finfo(jnp.float32).max
    stats = {
        "loss/policy": pg_loss, "loss/value": vf_loss, "loss/total": loss,
        "policy/approxkl": 0.5 * masked_mean(lr_sg ** 2, mask),
        "policy/policykl": masked_mean(-lr_sg, mask),
        "policy/clipfrac": pg_clipfrac,
        "policy/advantages_mean": masked_mean(advantages, mask),
        "policy/ratio_mean": jax.lax.stop_gradient(avg_ratio),
        "policy/ratio_max": jnp.max(jnp.where(mask > 0, ratio_sg, -big)),
        "policy/ratio_min": jnp.min(jnp.where(mask > 0, ratio_sg, big)),
        "returns/mean": masked_mean(returns, mask), "returns/var": masked_var(returns, mask),
        "val/vpred": masked_mean(jax.lax.stop_gradient(vpreds_new), mask),
        "val/error": masked_mean(jax.lax.stop_gradient(vf_losses1), mask),
        "val/clipfrac": vf_clipfrac,
        "val/mean": masked_mean(values_old, mask), "val/var": masked_var(values_old, mask),
        "ppo/skipped": skipped.astype(jnp.float32),
    }
    if logits is not None:
        stats["policy/entropy"] = masked_mean(
            entropy_from_logits(jax.lax.stop_gradient(logits)), mask)
    return loss, stats


def early_stop(policykl, target_kl: float, early_stopping: bool) -> bool:
    """TRL `_early_stop`: stop the remaining PPO epochs when policykl > 1.5 * target_kl.

    TRL checks it after each PPO *epoch* with the last mini-batch's `policy/policykl`
    (= masked_mean(lp_old - lp_new)), not `approxkl`. Returns a Python bool (host-side decision).
    """
    if not early_stopping:
        return False
    return bool(float(policykl) > 1.5 * float(target_kl))


# --------------------------------------------------------------------------- score processing
class RunningMoments(NamedTuple):
    """Running mean/std of scores (TRL `RunningMoments`, Chan et al. parallel update).

    Initial state: mean 0, std 1, var 1, count 1e-24 (as TRL). Use `running_moments_init()`.
    """
    mean: Array
    std: Array
    var: Array
    count: Array


def running_moments_init() -> RunningMoments:
    """TRL's initial running-moment state (float32 scalars)."""
    f = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return RunningMoments(f(0.0), f(1.0), f(1.0), f(1e-24))


def running_moments_update(state: RunningMoments, xs: Array
                           ) -> Tuple[RunningMoments, Tuple[Array, Array]]:
    """Folds a batch `xs [N]` into the running moments (TRL `RunningMoments.update`).

      d = mean(xs) - mean;  n' = count + N
      var' = (var * count + d^2 * count * N / n' + var_pop(xs) * N) / n'
      mean' = mean + d * N / n';  std' = sqrt(var' * n' / (n' - 1))
    Returns (new_state, (batch_mean, batch_std_unbiased)). With N = 1 on the first update TRL's
    std is inf (n' - 1 rounds to 0); the same happens here.
    """
    xs = jnp.asarray(xs, jnp.float32).reshape(-1)
    n = xs.shape[0]
    xs_mean = jnp.mean(xs)
    xs_var = jnp.mean((xs - xs_mean) ** 2)
    delta = xs_mean - state.mean
    tot = state.count + n
    old_sum = state.var * state.count + delta ** 2 * state.count * n / tot
    tot_sum = old_sum + xs_var * n
    new_mean = state.mean + delta * n / tot
    new_var = tot_sum / tot
    new_std = jnp.sqrt(new_var * tot / (tot - 1))
    batch_std = jnp.sqrt(xs_var * n / (n - 1)) if n > 1 else jnp.asarray(jnp.nan, jnp.float32)
    return RunningMoments(new_mean, new_std, new_var, tot), (xs_mean, batch_std)


def process_scores(scores: Array, state: RunningMoments, *, use_score_scaling: bool = False,
                   use_score_norm: bool = False, score_clip: Optional[float] = None
                   ) -> Tuple[Array, RunningMoments]:
    """Score scaling / normalisation / clipping at the top of TRL `PPOTrainer.step`.

      scaling:       s <- s / (std_run + eps)            (running moments updated first)
      + norm:        s <- (s - mean_run) / (std_run + eps)
      clip:          s <- clip(s, -score_clip, score_clip)
    eps = float32 machine epsilon. scores `[B]`; returns (scores `[B]`, new running state).
    """
    scores = jnp.asarray(scores, jnp.float32)
    if use_score_scaling:
        state, _ = running_moments_update(state, scores)
        factor = state.std + jnp.finfo(jnp.float32).eps
        if use_score_norm:
            scores = (scores - state.mean) / factor
        else:
            scores = scores / factor
    if score_clip is not None:
        scores = jnp.clip(scores, -score_clip, score_clip)
    return scores, state
