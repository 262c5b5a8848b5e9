"""GRPO trainer: log-prob plumbing, one update on hand-built batches, end to end, eval_math."""
import dataclasses
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_sparse.errors import UserError
from jaxrl_sparse.models.config import ModelConfig
from jaxrl_sparse.models.decoder import forward, init_params
from jaxrl_sparse.rl import grpo
from jaxrl_sparse.rl import grpo_math as gm
from jaxrl_sparse.transforms import lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig("llama", 64, 32, 64, 2, 4, 2, 8)


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))


def _batch(Q=4, N=6, B=4, seed=0):
    rs = np.random.RandomState(seed)
    tokens = jnp.asarray(rs.randint(0, 64, (B, Q + N)), jnp.int32)
    mask = np.ones((B, Q + N), np.int32)
    mask[0, :2] = 0                        # left padding
    resp = np.ones((B, N), np.float32)
    resp[1, 4:] = 0                        # a completion that stopped early
    mask[1, Q + 4:] = 0
    return tokens, jnp.asarray(mask), jnp.asarray(resp)


def test_token_logprobs_chunked_equals_full(params):
    tokens, mask, resp = _batch(N=8)
    out = jax.jit(forward, static_argnums=1)(params, CFG, tokens, mask)
    want = jnp.take_along_axis(jax.nn.log_softmax(out.logits[:, 3:-1]), tokens[:, 4:, None], -1)[..., 0]
    got = grpo.token_logprobs(params, CFG, out.hidden[:, 3:-1], tokens[:, 4:], chunk=4)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_policy_with_zero_b_is_reference(params):
    tokens, mask, resp = _batch()
    g = grpo.GRPOConfig(kl_coef=0.1)
    ad = lora.init_lora(params, "q_proj,v_proj", 4, jax.random.key(1))
    old, ref = grpo.make_score_fn(CFG, g)(ad, params, tokens, mask, resp, None)
    np.testing.assert_allclose(np.asarray(old), np.asarray(ref), atol=1e-6)
    assert float(old.max()) < 0


def test_update_hand_computed_loss_and_direction(params):
    """Groups of K=2 with rewards [1, 0] and [0, 1]. First step: ratio = 1 exactly and the loss is
    -sum_b A_b n_b / sum_b n_b (token mean). After three steps the rewarded completions are more
    likely and the others less likely."""
    tokens, mask, resp = _batch(B=4)
    g = grpo.GRPOConfig(num_samples_per_prompt=2, prompts_per_step=2, optim_epochs=1,
                        learning_rate=3e-2, kl_coef=0.0, lora_targets="q_proj,v_proj,up_proj")
    score, upd = grpo._step_fns(CFG, g)
    ad = lora.init_lora(params, g.lora_targets, g.lora_rank, jax.random.key(1))
    adv = gm.group_advantages(jnp.asarray([1.0, 0.0, 0.0, 1.0]), 2)
    np.testing.assert_allclose(np.asarray(adv), [0.7071, -0.7071, -0.7071, 0.7071], atol=1e-3)
    old, ref = score(ad, params, tokens, mask, resp, None)
    opt = grpo.make_optimizer(g)
    state = {"lora": ad, "opt_state": opt.init(ad)}
    batch = {"tokens": tokens, "mask": mask, "resp_mask": resp, "old_lp": old, "ref_lp": ref, "adv": adv}
    n = np.asarray(resp).sum(1)
    want = -float((np.asarray(adv) * n).sum() / n.sum())
    for i in range(3):
        state, stats = upd(state, params, batch, jax.random.key(i), None)
        if i == 0:
            assert abs(float(stats["ratio_mean"]) - 1.0) < 1e-6
            assert abs(float(stats["loss"]) - want) < 1e-5
            assert stats["grad_norm"] > 0
    new, _ = score(state["lora"], params, tokens, mask, resp, None)
    seq = lambda lp: np.asarray((lp * resp).sum(1))
    d = seq(new) - seq(old)
    assert d[0] > 0 and d[3] > 0 and d[1] < 0 and d[2] < 0, d
    assert float(stats["ratio_mean"]) != 1.0


def test_config_validation():
    with pytest.raises(UserError, match="mini_batch_size"):
        grpo.GRPOConfig(prompts_per_step=3, num_samples_per_prompt=2, mini_batch_size=4).validate()
    with pytest.raises(UserError, match="aggregation"):
        grpo.GRPOConfig(aggregation="sum").validate()
    with pytest.raises(UserError, match="K >= 2"):
        grpo.GRPOConfig(num_samples_per_prompt=1).validate()


def _read_flagfile(path):
    out = {}
    for line in open(path):
        line = line.strip()
        if line.startswith("--"):
            k, v = line[2:].split("=", 1)
            out[k] = v
    return out


def _config_from_flagfile(path, **over):
    fields = {f.name: f for f in dataclasses.fields(grpo.GRPOConfig)}
    kw = {}
    for k, v in _read_flagfile(path).items():
        assert k in fields, f"{path}: --{k} is not a GRPOConfig field"
        t = fields[k].type
        kw[k] = (v.lower() in ("1", "true")) if t in (bool, "bool") else (
            int(v) if t in (int, "int") else float(v) if t in (float, "float") else v)
    kw.update(over)
    return grpo.GRPOConfig(**kw).validate()


@pytest.mark.parametrize("name", ["grpo_tiny", "grpo_smollm2_arith", "grpo_gemma2_math"])
def test_presets_parse(name):
    cfg = _config_from_flagfile(os.path.join(ROOT, "configs", f"{name}.flags"))
    assert cfg.batch_size % (cfg.mini_batch_size or cfg.batch_size) == 0


@pytest.fixture(scope="module")
def tiny_dir(request, tmp_path_factory):
    """A loadable model folder (tiny random Llama + the SmolLM2 tokenizer)."""
    try:
        return request.getfixturevalue("tiny_lm_dir")
    except pytest.FixtureLookupError:
        pass
    from jaxrl_sparse.models import export_hf, load_tokenizer
    tok = load_tokenizer("smollm2-135m-instruct")
    cfg = ModelConfig("llama", len(tok), 32, 64, 2, 4, 2, 8, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = str(tmp_path_factory.mktemp("tiny_lm"))
    export_hf(path, cfg, jax.device_get(init_params(cfg, jax.random.key(0))), tok)
    return path


def test_grpo_tiny_end_to_end_resume_and_eval(tiny_dir, tmp_path):
    from jaxrl_sparse import eval_math as em
    work = str(tmp_path / "run")
    cfg = _config_from_flagfile(os.path.join(ROOT, "configs", "grpo_tiny.flags"), model=tiny_dir,
                                workdir=work, max_new_tokens=8, eval_max_new_tokens=8,
                                lora_dropout=0.1)
    first = grpo.train(cfg, progress=False, stop_after=1)          # "killed" after one step
    assert first["steps_done"] == 1
    s = grpo.train(cfg, progress=False)                              # resumes at step 1
    assert s["total_steps"] == 2 and s["steps_done"] == 2
    steps = [r["step"] for r in s["metrics"]]
    assert steps == [0, 1, 2]
    assert s["metrics"][0]["eval/total"] == 4 and s["metrics"][-1]["eval/total"] == 4
    row = s["metrics"][1]
    for k in ("reward/mean", "train/accuracy", "objective/loss", "objective/kl", "time/rollout"):
        assert row[k] is not None
    assert os.path.islink(os.path.join(work, "lora", "lora_epoch1_step2"))
    assert os.path.isfile(os.path.join(work, "grpo_curves.png"))
    assert os.path.isfile(os.path.join(work, "eval", "step2.jsonl"))
    # the checkpoint holds only adapters + optimizer state
    from jaxrl_sparse import checkpoint
    meta_tree = checkpoint.tree_metadata(os.path.join(work, "checkpoints"), 2)
    assert set(meta_tree) == {"lora", "opt_state"}
    ad, meta = grpo.load_adapters(os.path.join(work, "lora", "lora_epoch1_step2"))
    assert meta["name"] == "lora_epoch1_step2" and meta["lora"]["rank"] == 4
    for a, b in zip(jax.tree_util.tree_leaves(ad), jax.tree_util.tree_leaves(s["adapters"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(UserError, match="does not exist"):
        grpo.load_adapters(str(tmp_path / "nope"))

    # the launcher: base and base+LoRA in one command
    import subprocess
    import sys
    out = str(tmp_path / "eval.jsonl")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "launch.eval_math", f"--lora_ckpt={work}", "--compare_base",
                        "--n=4", "--max_new_tokens=8", "--batch_size=4", f"--out={out}", "--progress=false"],
                       cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Total: 4 Correct:" in r.stdout
    for tag in ("base", "lora_epoch1_step2"):
        rows = [json.loads(x) for x in open(str(tmp_path / f"eval_{tag}.jsonl"))]
        assert len(rows) == 4 and set(rows[0]) == {"question", "gold", "output", "extracted", "correct"}
    assert em.summary_line({"total": 3, "correct": 1, "accuracy": 100 / 3}) == \
        "Total: 3 Correct: 1 Accuracy: 33.33%"


def test_generated_eval_and_train_sets_are_disjoint():
    from jaxrl_sparse.eval_math import load_problems
    ev = load_problems("generated", n=50, split="eval")
    tr = load_problems("generated", n_train=100, split="train")
    assert len(ev) == 50 and len(tr) == 100
    assert not {p["question"] for p in ev} & {p["question"] for p in tr}
    assert load_problems("generated", n=10, split="eval") == ev[:10]
