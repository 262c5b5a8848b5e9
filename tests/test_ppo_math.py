"""PPO math against hand-written loops of TRL 0.8.6's formulas."""
import math
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxrl_sparse.rl import ppo_math as pm  # noqa: E402

X = np.array([[1.0, 2.0, 4.0], [-1.0, 3.0, 100.0]], np.float32)
M = np.array([[1, 1, 1], [1, 1, 0]], np.float32)  # last token of row 1 is padding


def test_masked_stats_match_numpy_with_bessel():
    vals = X[M > 0]  # [1, 2, 4, -1, 3]
    assert float(pm.masked_mean(X, M)) == pytest.approx(vals.mean())
    assert float(pm.masked_var(X, M)) == pytest.approx(np.var(vals, ddof=1), rel=1e-6)
    assert float(pm.masked_var(X, M, unbiased=False)) == pytest.approx(np.var(vals), rel=1e-6)
    np.testing.assert_allclose(pm.masked_mean(X, M, axis=1), [7 / 3, 1.0], rtol=1e-6)
    w = (X - vals.mean()) / np.sqrt(np.var(vals, ddof=1) + 1e-8)
    np.testing.assert_allclose(pm.masked_whiten(X, M), w, rtol=1e-5)
    np.testing.assert_allclose(pm.masked_whiten(X, M, shift_mean=False), w + vals.mean(),
                               rtol=1e-5)
    # the whitened valid entries have mean 0 and unbiased variance 1
    wv = np.asarray(pm.masked_whiten(X, M))[M > 0]
    assert abs(wv.mean()) < 1e-5 and np.var(wv, ddof=1) == pytest.approx(1.0, rel=1e-5)


def _log_softmax(row):
    mx = max(row)
    lse = mx + math.log(sum(math.exp(v - mx) for v in row))
    return [v - lse for v in row]


def test_kl_penalty_kinds():
    lp = np.array([[-1.0, -2.0]], np.float32)
    ref = np.array([[-1.5, -1.0]], np.float32)
    np.testing.assert_allclose(pm.kl_penalty(lp, ref, "kl"), [[0.5, -1.0]])
    np.testing.assert_allclose(pm.kl_penalty(lp, ref, "abs"), [[0.5, 1.0]])
    np.testing.assert_allclose(pm.kl_penalty(lp, ref, "mse"), [[0.125, 0.5]])
    logits = np.array([[[1.0, 0.0, -1.0], [0.3, 0.3, 2.0]]], np.float32)
    ref_logits = np.array([[[0.0, 0.0, 0.0], [2.0, -1.0, 0.5]]], np.float32)
    expected = []
    for t in range(2):
        p = _log_softmax(list(logits[0, t]))
        q = _log_softmax(list(ref_logits[0, t]))
        expected.append(sum(math.exp(a) * (a - b) for a, b in zip(p, q)))
    got = pm.kl_penalty(lp, ref, "full", logits=logits, ref_logits=ref_logits)
    np.testing.assert_allclose(got, [expected], rtol=1e-5)
    assert float(pm.kl_penalty(lp, ref, "full", logits=logits, ref_logits=logits).max()) < 1e-6
    with pytest.raises(ValueError):
        pm.kl_penalty(lp, ref, "full")
    with pytest.raises(ValueError):
        pm.kl_penalty(lp, ref, "k9")


def test_compute_rewards_adds_score_at_last_response_token():
    scores = np.array([2.0, -1.0], np.float32)
    lp = np.array([[-1.0, -2.0, -0.5], [-1.0, -1.0, -3.0]], np.float32)
    ref = np.array([[-1.5, -1.0, -0.5], [-2.0, -1.0, -1.0]], np.float32)
    coef = 0.2
    rewards, nsr, kl = pm.compute_rewards(scores, lp, ref, M, coef)
    exp_r = np.zeros((2, 3))
    for b in range(2):
        last = max(t for t in range(3) if M[b, t] > 0)
        for t in range(3):
            exp_r[b, t] = -coef * (lp[b, t] - ref[b, t]) + (scores[b] if t == last else 0.0)
    np.testing.assert_allclose(rewards, exp_r, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(nsr, -coef * (lp - ref), rtol=1e-6)
    np.testing.assert_allclose(kl, lp - ref)
    # TRL's objective/kl: mean over rows of the per-row masked sum
    assert float(pm.mean_kl_objective(kl, M)) == pytest.approx(((0.5 - 1 + 0) + (1 + 0)) / 2)


def test_adaptive_kl_controller_three_updates():
    value, target, horizon, n = 0.2, 6.0, 10000.0, 256
    expected = value
    for current in [12.0, 3.0, 6.6]:  # errors clip to +0.2, -0.2, and 0.1 unclipped
        err = min(max(current / target - 1, -0.2), 0.2)
        expected *= 1 + err * n / horizon
        value = pm.kl_ctl_update(value, current, n, target, horizon)
        assert float(value) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.2 * (1 + 0.2 * 0.0256) * (1 - 0.2 * 0.0256)
                                     * (1 + 0.1 * 0.0256))
    assert pm.kl_ctl_step(0.2, 100.0, n, adaptive=False) == 0.2  # FixedKLController


def _gae_loop(rewards, values, mask, gamma, lam):
    """TRL compute_advantages' reverse loop, in plain Python."""
    b, t_len = rewards.shape
    v = values * mask
    r = rewards * mask
    adv = np.zeros((b, t_len))
    for i in range(b):
        last = 0.0
        for t in reversed(range(t_len)):
            nv = v[i, t + 1] if t < t_len - 1 else 0.0
            delta = r[i, t] + gamma * nv - v[i, t]
            last = delta + gamma * lam * last
            adv[i, t] = last
    return adv, adv + v


def test_gae_hand_computed_2x3():
    rewards = np.array([[0.0, 0.0, 1.0], [0.1, -0.2, 7.0]], np.float32)
    values = np.array([[0.5, 0.5, 0.5], [0.2, 0.4, 9.0]], np.float32)
    adv, ret, vm = pm.gae(rewards, values, M, gamma=1.0, lam=0.95, whiten_advantages=False)
    # row 0 by hand: deltas (0, 0, 0.5) -> A = (0.95^2 * 0.5, 0.95 * 0.5, 0.5)
    np.testing.assert_allclose(adv[0], [0.45125, 0.475, 0.5], rtol=1e-6)
    exp_adv, exp_ret = _gae_loop(rewards, values, M, 1.0, 0.95)
    np.testing.assert_allclose(adv, exp_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, exp_ret, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vm, values * M)
    # default: advantages whitened with the mask (returns are from the unwhitened ones)
    adv_w, ret_w, _ = pm.gae(rewards, values, M, gamma=1.0, lam=0.95)
    vals = exp_adv[M > 0]
    np.testing.assert_allclose(adv_w, (exp_adv - vals.mean()) / np.sqrt(vals.var(ddof=1) + 1e-8),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ret_w, exp_ret, rtol=1e-5, atol=1e-6)
    # gamma < 1 and whitened rewards (TRL: masked_whiten(r * m, m, shift_mean=False))
    rm = rewards * M
    vr = rm[M > 0]
    rw = (rm - vr.mean()) / np.sqrt(vr.var(ddof=1) + 1e-8) + vr.mean()
    # padding keeps its whitened reward, as in TRL, so the loop runs with mask = 1 on rw
    exp_adv2, _ = _gae_loop(rw, values * M, np.ones_like(M), 0.9, 0.8)
    adv2, _, _ = pm.gae(rewards, values, M, gamma=0.9, lam=0.8, whiten_rewards=True,
                        whiten_advantages=False)
    np.testing.assert_allclose(adv2, exp_adv2, rtol=1e-5, atol=1e-5)
    # jit-able
    adv_j, _, _ = jax.jit(pm.gae, static_argnames=("whiten_rewards", "whiten_advantages"))(
        rewards, values, M, 1.0, 0.95)
    np.testing.assert_allclose(adv_j, adv_w, rtol=1e-5, atol=1e-6)


def _ppo_loop(old, vold, new, vnew, adv, ret, mask, eps, eps_v, vf_coef):
    pg, vf, n, pg_clip, vf_clip = 0.0, 0.0, 0.0, 0.0, 0.0
    for i in range(old.shape[0]):
        for t in range(old.shape[1]):
            if not mask[i, t]:
                continue
            r = math.exp(new[i, t] - old[i, t])
            l1 = -adv[i, t] * r
            l2 = -adv[i, t] * min(max(r, 1 - eps), 1 + eps)
            pg += max(l1, l2)
            pg_clip += l2 > l1
            vc = min(max(vnew[i, t], vold[i, t] - eps_v), vold[i, t] + eps_v)
            v1, v2 = (vnew[i, t] - ret[i, t]) ** 2, (vc - ret[i, t]) ** 2
            vf += max(v1, v2)
            vf_clip += v2 > v1
            n += 1
    pg, vf = pg / n, 0.5 * vf / n
    return pg + vf_coef * vf, pg, vf, pg_clip / n, vf_clip / n


@pytest.mark.parametrize("active", [False, True])
def test_ppo_loss_matches_loop(active):
    old = np.array([[-1.0, -2.0, -1.5], [-0.5, -1.0, -3.0]], np.float32)
    adv = np.array([[1.0, -1.0, 0.5], [-0.5, 2.0, 1.0]], np.float32)
    vold = np.array([[0.1, 0.2, 0.3], [0.0, -0.1, 0.5]], np.float32)
    ret = np.array([[0.5, 0.0, 1.0], [0.2, 0.3, -1.0]], np.float32)
    if active:  # ratios far outside 1 +- 0.2, value predictions outside +- 0.2
        new = old + np.array([[0.5, -0.6, 0.4], [0.3, 0.7, 0.0]], np.float32)
        vnew = vold + np.array([[0.6, -0.5, 0.1], [0.9, 0.4, 0.0]], np.float32)
    else:
        new = old + np.array([[0.05, -0.1, 0.02], [0.0, 0.1, 0.0]], np.float32)
        vnew = vold + np.array([[0.05, -0.1, 0.1], [0.0, 0.15, 0.0]], np.float32)
    loss, st = pm.ppo_loss(old, vold, new, vnew, adv, ret, M, cliprange=0.2,
                           cliprange_value=0.2, vf_coef=0.1)
    e_loss, e_pg, e_vf, e_pgc, e_vfc = _ppo_loop(old, vold, new, vnew, adv, ret, M, 0.2, 0.2, 0.1)
    assert float(loss) == pytest.approx(e_loss, rel=1e-5)
    assert float(st["loss/policy"]) == pytest.approx(e_pg, rel=1e-5)
    assert float(st["loss/value"]) == pytest.approx(e_vf, rel=1e-5)
    assert float(st["policy/clipfrac"]) == pytest.approx(e_pgc)
    assert float(st["val/clipfrac"]) == pytest.approx(e_vfc)
    d = (new - old)[M > 0]
    assert float(st["policy/approxkl"]) == pytest.approx(0.5 * np.mean(d ** 2), rel=1e-5)
    assert float(st["policy/policykl"]) == pytest.approx(np.mean(-d), rel=1e-5, abs=1e-7)
    assert float(st["policy/ratio_mean"]) == pytest.approx(np.mean(np.exp(d)), rel=1e-5)
    assert float(st["ppo/skipped"]) == 0.0
    if active:
        assert e_pgc > 0 and e_vfc > 0
    else:
        assert e_pgc == 0 and e_vfc == 0
        # unclipped: d loss / d lp_new = -A * ratio / n_valid, and 0 on padding
        g = jax.grad(lambda lp: pm.ppo_loss(old, vold, lp, vnew, adv, ret, M)[0])(
            jnp.asarray(new))
        np.testing.assert_allclose(g, -adv * np.exp(new - old) * M / M.sum(), rtol=1e-5,
                                   atol=1e-7)


def test_ppo_loss_ratio_threshold_skips_batch():
    old = np.zeros((2, 3), np.float32)
    new = np.full((2, 3), 3.0, np.float32)  # ratio e^3 ~ 20 > 10
    ones = np.ones((2, 3), np.float32)
    loss, st = pm.ppo_loss(old, 0 * ones, new, ones, ones, ones, M, ratio_threshold=10.0)
    assert float(loss) == 0.0 and float(st["loss/policy"]) == 0.0
    assert float(st["loss/value"]) == 0.0 and float(st["ppo/skipped"]) == 1.0
    loss2, _ = pm.ppo_loss(old, 0 * ones, new, ones, ones, ones, M, ratio_threshold=None)
    assert float(loss2) != 0.0
    g = jax.grad(lambda lp: pm.ppo_loss(old, 0 * ones, lp, ones, ones, ones, M)[0])(
        jnp.asarray(new))
    assert float(jnp.abs(g).max()) == 0.0


def test_entropy_stat_and_logprobs_from_logits():
    logits = np.array([[[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]]], np.float32)
    labels = np.array([[2, 0]])
    lp = pm.logprobs_from_logits(logits, labels)
    np.testing.assert_allclose(lp, [[_log_softmax([0, 1, 2])[2], math.log(1 / 3)]], rtol=1e-6)
    ent = pm.entropy_from_logits(logits)
    p = [math.exp(v) for v in _log_softmax([0, 1, 2])]
    np.testing.assert_allclose(ent, [[-sum(q * math.log(q) for q in p), math.log(3)]], rtol=1e-5)
    z = np.zeros((1, 2), np.float32)
    _, st = pm.ppo_loss(z, z, z, z, z, z, np.ones((1, 2), np.float32), logits=logits)
    assert float(st["policy/entropy"]) == pytest.approx(float(ent.mean()), rel=1e-6)


def test_early_stop_uses_1p5_times_target_kl():
    assert pm.early_stop(1.6, 1.0, True) is True
    assert pm.early_stop(1.4, 1.0, True) is False
    assert pm.early_stop(100.0, 1.0, False) is False


def _trl_running_update(state, xs):
    mean, std, var, count = state
    n = len(xs)
    xm = sum(xs) / n
    xv = sum((x - xm) ** 2 for x in xs) / n
    delta = xm - mean
    tot = count + n
    old_sum = var * count + delta ** 2 * count * n / tot
    new_var = (old_sum + xv * n) / tot
    return (mean + delta * n / tot, math.sqrt(new_var * tot / (tot - 1)), new_var, tot)


def test_running_moments_and_score_processing():
    b1, b2 = [1.0, 2.0, 6.0], [0.0, -4.0]
    st = pm.running_moments_init()
    ref = (0.0, 1.0, 1.0, 1e-24)
    for b in (b1, b2):
        st, (bm, bs) = pm.running_moments_update(st, np.array(b, np.float32))
        ref = _trl_running_update(ref, b)
        assert float(bm) == pytest.approx(np.mean(b))
        assert float(bs) == pytest.approx(np.std(b, ddof=1), rel=1e-5)
    for got, want in zip(st, ref):
        assert float(got) == pytest.approx(want, rel=1e-5)
    allv = b1 + b2
    assert float(st.mean) == pytest.approx(np.mean(allv), rel=1e-5)
    assert float(st.std) == pytest.approx(np.std(allv, ddof=1), rel=1e-5)

    s = np.array([1.0, 2.0, 6.0], np.float32)
    eps = float(np.finfo(np.float32).eps)
    sd = float(np.std(s, ddof=1))
    out, st1 = pm.process_scores(s, pm.running_moments_init(), use_score_scaling=True)
    np.testing.assert_allclose(out, s / (sd + eps), rtol=1e-5)
    out, _ = pm.process_scores(s, pm.running_moments_init(), use_score_scaling=True,
                               use_score_norm=True)
    np.testing.assert_allclose(out, (s - 3.0) / (sd + eps), rtol=1e-5, atol=1e-6)
    out, st2 = pm.process_scores(s, pm.running_moments_init(), score_clip=1.5)
    np.testing.assert_allclose(out, [1.0, 1.5, 1.5])
    assert float(st2.count) == pytest.approx(1e-24)  # no scaling: state untouched
    assert float(st1.count) == pytest.approx(3.0)
