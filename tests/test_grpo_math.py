"""GRPO advantages and loss on hand-computed inputs."""
import math
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxrl_sparse.rl import grpo_math as gm  # noqa: E402


def test_group_advantages_sample_std():
    r = np.array([1, 0, 0, 1, 1, 1, 1, 1], np.float32)  # P=2 prompts, K=4
    a = np.asarray(gm.group_advantages(r, 4))
    sd = math.sqrt(4 * 0.25 / 3)  # torch.std (ddof=1) of [1,0,0,1]
    np.testing.assert_allclose(a[:4], np.array([0.5, -0.5, -0.5, 0.5]) / (sd + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(a[4:], 0.0)  # all-equal group: no signal
    a2 = gm.group_advantages(r.reshape(2, 4), 4)
    np.testing.assert_allclose(a2, a.reshape(2, 4), rtol=1e-6)
    np.testing.assert_allclose(gm.group_advantages(r, 4, mean_only=True)[:4],
                               [0.5, -0.5, -0.5, 0.5])
    np.testing.assert_allclose(gm.group_advantages(np.array([3.0, 5.0]), 1, mean_only=True), 0.0)
    with pytest.raises(ValueError):
        gm.group_advantages(r, 3)
    with pytest.raises(ValueError):
        gm.group_advantages(np.array([1.0, 2.0]), 1)


def test_k3_kl_values():
    lp = np.array([-1.0, -2.0, -0.3], np.float32)
    ref = np.array([-2.0, -1.0, -0.3], np.float32)
    exp = [math.exp(rf - p) - (rf - p) - 1 for p, rf in zip(lp, ref)]
    np.testing.assert_allclose(gm.k3_kl(lp, ref), exp, rtol=1e-6)
    assert exp[0] == pytest.approx(math.exp(-1))  # e^-1 + 1 - 1
    assert float(gm.k3_kl(lp, ref).min()) >= 0.0
    np.testing.assert_allclose(gm.k1_kl(lp, ref), lp - ref)


NEW = np.array([[-1.0, -0.5, -2.0], [-0.2, -1.0, -1.0]], np.float32)
OLD = np.array([[-1.1, -0.2, -2.0], [-0.5, -1.0, -9.0]], np.float32)
REF = np.array([[-1.3, -0.5, -1.0], [-0.4, -2.0, -1.0]], np.float32)
ADV = np.array([1.5, -0.7], np.float32)
MASK = np.array([[1, 1, 1], [1, 1, 0]], np.float32)


def _loop(clip_eps, kl_coef, how):
    per_seq, tot, n = [], 0.0, 0
    for b in range(2):
        s, c = 0.0, 0
        for t in range(3):
            if not MASK[b, t]:
                continue
            r = math.exp(NEW[b, t] - OLD[b, t])
            if clip_eps is None:
                pg = -ADV[b] * r
            else:
                pg = -min(ADV[b] * r, ADV[b] * min(max(r, 1 - clip_eps), 1 + clip_eps))
            d = REF[b, t] - NEW[b, t]
            term = pg + kl_coef * (math.exp(d) - d - 1)
            s, c = s + term, c + 1
        per_seq.append(s / c)
        tot, n = tot + s, n + c
    return tot / n if how == "token_mean" else sum(per_seq) / 2


@pytest.mark.parametrize("clip_eps", [None, 0.1])
@pytest.mark.parametrize("how", ["token_mean", "seq_mean"])
def test_grpo_loss_matches_loop(clip_eps, how):
    loss, st = gm.grpo_loss(NEW, OLD, REF, ADV, MASK, clip_eps=clip_eps, kl_coef=0.05,
                            aggregation=how)
    assert float(loss) == pytest.approx(_loop(clip_eps, 0.05, how), rel=1e-5)
    assert float(st["pg_loss"]) == pytest.approx(_loop(clip_eps, 0.0, how), rel=1e-5)
    if clip_eps is None:
        assert float(st["clipfrac"]) == 0.0
    else:
        # ratios e^0.1, e^-0.3, 1 (A > 0) and e^0.3, 1 (A < 0): only e^0.1 = 1.105 > 1.1 with
        # A > 0 is clipped; the low ratio with A > 0 and the high one with A < 0 keep the
        # pessimistic unclipped term. 1 of 5 tokens.
        assert float(st["clipfrac"]) == pytest.approx(0.2)


def test_token_and_seq_mean_differ_with_uneven_lengths():
    a, _ = gm.grpo_loss(NEW, OLD, REF, ADV, MASK, aggregation="token_mean")
    b, _ = gm.grpo_loss(NEW, OLD, REF, ADV, MASK, aggregation="seq_mean")
    assert abs(float(a) - float(b)) > 1e-3
    with pytest.raises(ValueError):
        gm.grpo_loss(NEW, OLD, REF, ADV, MASK, aggregation="sum")


def test_grpo_gradient_on_policy_is_advantage_weighted():
    # at new == old the ratio is 1 and d loss / d lp = -A / n_tokens (token_mean, no KL)
    g = jax.grad(lambda lp: gm.grpo_loss(lp, OLD, None, ADV, MASK)[0])(jnp.asarray(OLD))
    np.testing.assert_allclose(g, -ADV[:, None] * MASK / MASK.sum(), rtol=1e-6)
    # the k3 term pulls toward the reference: d/dlp [exp(ref-lp) - (ref-lp) - 1] = 1 - exp(ref-lp)
    g2 = jax.grad(lambda lp: gm.grpo_loss(lp, OLD, REF, 0 * ADV, MASK, kl_coef=1.0)[0])(
        jnp.asarray(NEW))
    np.testing.assert_allclose(g2, (1 - np.exp(REF - NEW)) * MASK / MASK.sum(), rtol=1e-5,
                               atol=1e-7)
    with pytest.raises(ValueError):
        gm.grpo_loss(NEW, OLD, None, ADV, MASK, kl_coef=0.1)
