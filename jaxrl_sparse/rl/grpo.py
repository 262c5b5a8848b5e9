"""GRPO with LoRA adapters on math word problems (the grpo_lora_small seed, in JAX).

One step (`train`):
  rollout  P prompts, each repeated K times -> one batched generate call [P*K, N] with the
           adapters merged into the base inside the jitted sampler (`lora.merge_fn`)
  reward   math_reward = w_correct * correct + w_format * format + w_repeat * repetition_penalty
  advantage A = (r - mean_group r) / (std_group r + 1e-5)     (or mean-only)
  score    one jitted pass: old log-probs (policy, no dropout) and reference log-probs (base,
           adapters off) of the sampled tokens                                   [B, N]
  update   optim_epochs x (B / mini_batch) AdamW steps on the adapters only; loss =
           aggregate(-A * ratio (optionally clipped) + kl_coef * k3(new, ref))
Old log-probs come from a teacher-forced pass with the training forward (not from the sampler), so
the first ratio is exactly 1 even when the sampler's merged bf16 weights round the delta.
Every step's randomness is `fold_in(key, step)`, the epoch's prompt order `fold_in(data_key,
epoch)`, so a resumed run continues exactly like an uninterrupted one.

Checkpoints (`<workdir>/checkpoints/<step>`, Orbax, via `jaxrl_sparse.checkpoint`) hold only
`{'lora': adapters, 'opt_state': ...}` plus JSON metadata (LoRA settings, model, config); the
seed's name `lora_epoch{N}_step{S}` is in the metadata and is a symlink in `<workdir>/lora/`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrl_sparse import checkpoint, parallel
from jaxrl_sparse.data.batching import pad_left
from jaxrl_sparse.errors import UserError
from jaxrl_sparse.metrics import MetricsLog, default_workdir, is_writer, plot_curves
from jaxrl_sparse.models.decoder import forward, lm_logits
from jaxrl_sparse.rl import grpo_math as gm
from jaxrl_sparse.transforms import lora


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Every knob of a GRPO + LoRA run (the launcher's flags map 1:1 onto these fields)."""
    # model
    model: str = "smollm2-135m-instruct"   # registry name, HF id, HF folder or .gguf file
    param_dtype: str = "float32"           # storage dtype of the frozen base: float32 | bfloat16
    compute_dtype: str = "float32"         # activations: float32 | bfloat16
    remat: bool = False                    # rematerialise blocks in the backward (large models)
    # data
    data: str = "generated"                # generated | gsm8k | path to a {question, answer} JSONL
    eval_data: str = ""                    # eval source ('' = like --data; a JSONL path)
    num_training_data: int = 200           # training problems (seed: NUM_TRAINING_DATA)
    num_eval: int = 100                    # held-out problems for periodic eval (0 = none)
    data_seed: int = 0                     # seed of the generated problems
    prompt_template: str = "auto"          # auto (chat template if any) | chat | plain
    max_prompt_len: int = 256              # prompts keep their last N tokens
    # LoRA
    lora_targets: str = "q_proj,v_proj"    # module names (q/k/v/o/gate/up/down_proj) or a path regex
    lora_rank: int = 8                     # r
    lora_alpha: float = 16.0               # scale = alpha / r
    lora_dropout: float = 0.0              # dropout on the adapter input (training forward only)
    # sampling
    num_samples_per_prompt: int = 4        # K completions per prompt (seed: NUM_SAMPLES_PER_PROMPT)
    prompts_per_step: int = 4              # P prompts per step; batch B = P * K
    max_new_tokens: int = 128              # completion length cap
    temperature: float = 1.0
    top_k: int = 0                         # 0 = off
    top_p: float = 1.0
    # GRPO
    num_epochs: int = 1                    # passes over the training problems (seed: NUM_EPOCHS)
    optim_epochs: int = 1                  # optimisation epochs over each sampled batch
    mini_batch_size: int = 0               # completions per gradient step (0 = the whole batch)
    learning_rate: float = 1e-4
    weight_decay: float = 0.0              # AdamW decay on the adapters
    max_grad_norm: float = 1.0             # 0 = no clipping
    clip_eps: float = 0.0                  # PPO-style ratio clip (0 = off, the seed's loss)
    kl_coef: float = 0.0                   # weight of k3 KL to the base model (adapters off)
    adv_mean_only: bool = False            # advantages r - mean (no std division)
    aggregation: str = "token_mean"        # token_mean | seq_mean
    # rewards
    w_correct: float = 1.0                 # weight of answer correctness
    w_format: float = 0.1                  # weight of the single 'Answer: <n>' line bonus
    w_repeat: float = 0.5                  # weight of the repetition penalty (<= 0)
    # run
    eval_every: int = 20                   # steps between evals (0 = only first and last)
    eval_batch_size: int = 32
    eval_max_new_tokens: int = 0           # 0 = max_new_tokens
    save_every: int = 20                   # steps between checkpoints (and the last step)
    update_mask: str = ""                  # train only a subnetwork: mask on the merged delta
    seed: int = 0
    workdir: str = ""                      # everything the run writes ('' = runs/grpo-<model>-<time>)
    export_final: bool = False             # write the merged model as a HF folder at the end
    use_wandb: bool = False
    wandb_project: str = "jaxrl_sparse"
    mesh: str = ""                         # device mesh 'data:N,fsdp:M' ('' = all devices on data); the frozen base splits over fsdp

    def validate(self) -> "GRPOConfig":
        for name in ("num_samples_per_prompt", "prompts_per_step", "max_new_tokens", "num_epochs",
                     "optim_epochs", "num_training_data", "lora_rank", "save_every",
                     "eval_batch_size", "max_prompt_len"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}")
        B = self.batch_size
        if self.mini_batch_size and B % self.mini_batch_size:
            raise UserError(f"batch {B} (= prompts_per_step * num_samples_per_prompt) is not a "
                            f"multiple of --mini_batch_size={self.mini_batch_size}")
        if self.num_samples_per_prompt < 2 and not self.adv_mean_only:
            raise UserError("--num_samples_per_prompt=1 gives no group statistics; use K >= 2")
        if self.aggregation not in gm.AGGREGATIONS:
            raise UserError(f"--aggregation={self.aggregation!r}; choose {', '.join(gm.AGGREGATIONS)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"--lora_dropout={self.lora_dropout} must be in [0, 1)")
        if self.update_mask and self.lora_dropout:
            raise UserError("--update_mask trains through the merged (masked) delta, which cannot "
                            "apply input dropout; set --lora_dropout=0")
        if self.num_training_data < self.prompts_per_step:
            raise UserError(f"--num_training_data={self.num_training_data} is smaller than "
                            f"--prompts_per_step={self.prompts_per_step}")
        return self

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.num_samples_per_prompt


# ----------------------------------------------------------------------------- log-probs
def token_logprobs(params, cfg, hidden, targets, chunk: int = 32):
    """log p(targets) from final hidden states: hidden [B, N, D], targets [B, N] -> [B, N] f32.

    The head runs on `chunk` positions at a time under `jax.checkpoint`, so [B, N, V] logits are
    never held at once (Gemma's V = 256k makes that the largest tensor of the step).
    """
    B, N, D = hidden.shape
    c = chunk if N % chunk == 0 else N

    @jax.checkpoint
    def one(h, t):
        logits = lm_logits(params, cfg, h)                                    # [B, c, V]
        tgt = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return tgt - jax.nn.logsumexp(logits, axis=-1)

    hs = hidden.reshape(B, N // c, c, D).swapaxes(0, 1)
    ts = targets.reshape(B, N // c, c).swapaxes(0, 1)
    return jax.lax.map(lambda xs: one(*xs), (hs, ts)).swapaxes(0, 1).reshape(B, N)


def completion_logprobs(base, adapters, cfg, g: GRPOConfig, tokens, mask, n_resp: int, *,
                        key=None, train: bool = False, update_mask=None):
    """Log-probs [B, N] of the completion tokens `tokens[:, -N:]` under base (+ adapters).

    tokens, mask: [B, Q+N] prompt then completion. Position t predicts token t+1, so the
    completion's log-probs come from hidden states Q-1 .. Q+N-2. adapters None = the reference.
    """
    Q = tokens.shape[1] - n_resp
    kw = dict(compute_logits=False, remat=g.remat and train)
    if adapters is None:
        out = forward(base, cfg, tokens, mask, **kw)
        head_params = base
    elif update_mask is not None:
        merged = lora.merge(base, adapters, g.lora_alpha, g.lora_rank, mask=update_mask)
        out, head_params = forward(merged, cfg, tokens, mask, **kw), merged
    else:
        drop = g.lora_dropout if train else 0.0
        out = lora.lora_forward(base, adapters, cfg, tokens, mask, alpha=g.lora_alpha,
                                rank=g.lora_rank, dropout=drop, key=key, **kw)
        head_params = base
    h = out.hidden[:, Q - 1:-1]
    return token_logprobs(head_params, cfg, h, tokens[:, Q:])


def make_score_fn(cfg, g: GRPOConfig, mesh=None):
    """jit: (adapters, base, tokens, mask, resp_mask, update_mask) -> (old_lp, ref_lp) [B, N]
    (split over the mesh's batch axes when a mesh is given)."""
    def fn(adapters, base, tokens, mask, resp_mask, umask):
        n = resp_mask.shape[1]
        old = completion_logprobs(base, adapters, cfg, g, tokens, mask, n, update_mask=umask)
        ref = (completion_logprobs(base, None, cfg, g, tokens, mask, n) if g.kl_coef
               else jnp.zeros_like(old))
        return old, ref
    if mesh is None:
        return jax.jit(fn)
    return jax.jit(fn, out_shardings=parallel.batch_sharding(mesh))


def make_optimizer(g: GRPOConfig) -> optax.GradientTransformation:
    parts = []
    if g.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(g.max_grad_norm))
    parts.append(optax.adamw(g.learning_rate, weight_decay=g.weight_decay))
    return optax.chain(*parts)


def make_update_fn(cfg, g: GRPOConfig, optimizer, mesh=None, state_layout=None, base_layout=None,
                   mask_layout=None):
    """jit: (state, base, batch, key, update_mask) -> (state, stats); state = {'lora', 'opt_state'}.

    batch: tokens/mask [B, Q+N], resp_mask/old_lp/ref_lp [B, N], adv [B]. All optimisation epochs
    and mini-batches run in one `lax.scan`; each epoch uses a fresh permutation of the rows.
    mesh + layouts (`parallel.Layout` of the state, the base and the update mask or None): jit
    in/out shardings, the batch split over the mesh's batch axes.
    """
    def loss_fn(adapters, base, mb, key, umask):
        lp = completion_logprobs(base, adapters, cfg, g, mb["tokens"], mb["mask"],
                                 mb["resp_mask"].shape[1], key=key, train=True, update_mask=umask)
        return gm.grpo_loss(lp, mb["old_lp"], mb["ref_lp"] if g.kl_coef else None, mb["adv"],
                            mb["resp_mask"], clip_eps=g.clip_eps or None, kl_coef=g.kl_coef,
                            aggregation=g.aggregation)

    def update(state, base, batch, key, umask):
        B = batch["adv"].shape[0]
        mbs = g.mini_batch_size or B
        n_mb = B // mbs
        perms = jnp.concatenate([jax.random.permutation(jax.random.fold_in(key, e), B)
                                 for e in range(g.optim_epochs)]).reshape(-1, mbs)

        def step(state, xs):
            i, idx = xs
            mb = parallel.constrain_batch(jax.tree_util.tree_map(lambda x: x[idx], batch), mesh)
            k = jax.random.fold_in(jax.random.fold_in(key, 1_000_003), i)
            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state["lora"], base, mb, k, umask)
            updates, opt_state = optimizer.update(grads, state["opt_state"], state["lora"])
            new = {"lora": optax.apply_updates(state["lora"], updates), "opt_state": opt_state}
            return new, {"loss": loss, "grad_norm": optax.global_norm(grads), **stats}

        state, stats = jax.lax.scan(step, state, (jnp.arange(g.optim_epochs * n_mb), perms))
        return state, jax.tree_util.tree_map(jnp.mean, stats)

    if mesh is None:
        return jax.jit(update, donate_argnums=(0,))
    rep_ = parallel.replicated(mesh)
    return jax.jit(update, donate_argnums=(0,),
                   in_shardings=(state_layout.tree, base_layout.tree, parallel.batch_sharding(mesh), rep_,
                                 None if mask_layout is None else mask_layout.tree),
                   out_shardings=(state_layout.tree, rep_))


def _jit_key(g: GRPOConfig) -> GRPOConfig:
    """`g` without the fields the jitted steps do not read (so runs share compiled steps)."""
    return dataclasses.replace(g, workdir="", model="", data="", eval_data="", update_mask="",
                               use_wandb=False, export_final=False)


@functools.lru_cache(maxsize=8)
def _step_fns(cfg, g: GRPOConfig, mesh=None, state_layout=None, base_layout=None, mask_layout=None):
    """(score_fn, update_fn) for a model config and run config, built once per process."""
    return make_score_fn(cfg, g, mesh), make_update_fn(cfg, g, make_optimizer(g), mesh, state_layout,
                                                      base_layout, mask_layout)


# ----------------------------------------------------------------------------- checkpoints
def ckpt_name(epoch: int, step: int) -> str:
    return f"lora_epoch{epoch}_step{step}"


def resolve_lora_ckpt(path: str) -> Tuple[str, Optional[int]]:
    """(Orbax checkpoint dir, step or None = latest) from a run's workdir, its `checkpoints/` dir,
    a step folder (`checkpoints/12`) or a `lora/lora_epoch{N}_step{S}` alias."""
    if not os.path.exists(path):
        raise UserError(f"--lora_ckpt={path!r} does not exist; pass a GRPO workdir, its "
                        "checkpoints/ folder or a lora/lora_epochN_stepS alias")
    real = os.path.realpath(path)
    base = os.path.basename(real.rstrip("/"))
    if base.isdigit() and checkpoint.all_steps(os.path.dirname(real)):
        return os.path.dirname(real), int(base)
    sub = os.path.join(real, "checkpoints")
    if os.path.isdir(sub) and checkpoint.all_steps(sub):
        return sub, None
    if checkpoint.all_steps(real):
        return real, None
    raise UserError(f"--lora_ckpt={path!r} holds no GRPO checkpoint (no step folders)")


def load_adapters(path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(adapters as numpy tree, metadata) of a GRPO LoRA checkpoint (only 'lora' is read)."""
    ckpt_dir, step = resolve_lora_ckpt(path)
    meta = checkpoint.read_metadata(ckpt_dir, step)
    if meta.get("trainer") != "grpo" or "lora" not in meta:
        raise UserError(f"{path!r} is not a GRPO LoRA checkpoint (metadata trainer="
                        f"{meta.get('trainer')!r})")
    tree = checkpoint.restore(ckpt_dir, step, keys=("lora",))
    return tree["lora"], meta


def _target_mask(update_mask_path: str, base, adapters):
    """The update mask restricted to the adapted kernels (the rest of the model is frozen anyway)."""
    if not update_mask_path:
        return None
    from jaxrl_sparse.analysis.mask import load_update_mask
    full = load_update_mask(update_mask_path, base)
    from jaxrl_sparse import tree as tree_lib
    flat = tree_lib.flatten(full)
    keep = {p: jnp.asarray(flat[p]) for p in lora.adapted_kernels(adapters)}
    return tree_lib.unflatten(keep)


# ----------------------------------------------------------------------------- the loop


def load_data(g: GRPOConfig):
    """(train problems, eval problems). A JSONL --data without --eval_data holds out its first
    `num_eval` lines for evaluation."""
    from jaxrl_sparse.eval_math import load_problems
    if g.data == "gsm8k" or g.data.startswith("generated"):
        train = load_problems(g.data, n_train=g.num_training_data, seed=g.data_seed, split="train")
        ev = (load_problems(g.eval_data or g.data, n=g.num_eval, seed=g.data_seed, split="eval")
              if g.num_eval else [])
        return train, ev
    rows = load_problems(g.data, n=None, seed=g.data_seed, split="eval")
    if g.eval_data:
        ev = load_problems(g.eval_data, n=g.num_eval, seed=g.data_seed) if g.num_eval else []
        return rows[:g.num_training_data], ev
    ev, train = rows[:g.num_eval], rows[g.num_eval:g.num_eval + g.num_training_data]
    if len(train) < g.prompts_per_step:
        raise UserError(f"{g.data}: {len(rows)} problems leave {len(train)} for training after "
                        f"{g.num_eval} eval problems; lower --num_eval or give --eval_data")
    return train, ev


def train(g: GRPOConfig, *, progress: bool = True, stop_after: Optional[int] = None,
          loaded=None) -> Dict[str, Any]:
    """Runs (or resumes) GRPO + LoRA in `g.workdir`; returns a summary dict.

    stop_after: stop once this many steps are done in total (tests simulate a kill with it).
    loaded: an already loaded `LoadedModel` (tests, benchmarks); default `load_model(g.model)`.
    """
    from tqdm.auto import tqdm
    from jaxrl_sparse import eval_math as em
    from jaxrl_sparse.generate import bucket_length, generate
    from jaxrl_sparse.rewards.math import (correctness_reward, format_reward, math_rewards,
                                           repetition_penalty)

    g = g.validate()
    workdir = os.path.abspath(g.workdir or default_workdir("grpo", g.model))
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if loaded is None:
        from jaxrl_sparse.models import load_model
        loaded = load_model(g.model, param_dtype=g.param_dtype, dtype=g.compute_dtype)
    mcfg, tok, base = loaded.config, loaded.tokenizer, loaded.params
    mesh = parallel.make_mesh(g.mesh)
    parallel.check_batch(g.batch_size, mesh, "a GRPO batch (prompts_per_step x num_samples_per_prompt)")
    base = parallel.put_params(base, mesh)   # frozen base, split over fsdp
    pad, eos = em.pad_id(tok, mcfg), em.stop_ids(tok, mcfg)
    train_probs, eval_probs = load_data(g)
    P, K = g.prompts_per_step, g.num_samples_per_prompt
    steps_per_epoch = len(train_probs) // P
    total = g.num_epochs * steps_per_epoch
    prompt_ids = [tok(em.prompt_text(tok, p["question"], g.prompt_template),
                      add_special_tokens=False)["input_ids"][-g.max_prompt_len:] for p in train_probs]
    golds = [p["answer"] for p in train_probs]

    k_init, k_data, k_run = jax.random.split(jax.random.key(g.seed), 3)
    adapters = parallel.put_params(lora.init_lora(base, g.lora_targets, g.lora_rank, k_init), mesh)
    umask = _target_mask(g.update_mask, base, adapters)
    umask = None if umask is None else parallel.put_params(umask, mesh)
    optimizer = make_optimizer(g)
    opt_sh = parallel.param_shardings(jax.eval_shape(optimizer.init, adapters), mesh)
    state = {"lora": adapters, "opt_state": jax.jit(optimizer.init, out_shardings=opt_sh)(adapters)}
    meta = {"trainer": "grpo", "model": g.model, "model_config": dataclasses.asdict(mcfg),
            "lora": {"targets": g.lora_targets, "regex": lora.targets_regex(g.lora_targets),
                     "rank": g.lora_rank, "alpha": g.lora_alpha, "dropout": g.lora_dropout,
                     "n_params": lora.num_params(adapters)},
            "update_mask": os.path.abspath(g.update_mask) if g.update_mask else "",
            "grpo_config": dataclasses.asdict(g), "steps_per_epoch": steps_per_epoch}
    log = MetricsLog(workdir, use_wandb=g.use_wandb, wandb_project=g.wandb_project,
                     run_config=dataclasses.asdict(g))

    def epoch_of(step):
        return max(1, math.ceil(step / steps_per_epoch))

    def save(step):
        name = ckpt_name(epoch_of(step), step)
        checkpoint.save(ckpt_dir, step, {"lora": state["lora"], "opt_state": state["opt_state"]},
                        metadata={**meta, "name": name, "step": step, "epoch": epoch_of(step)},
                        overwrite=True)
        if is_writer():
            alias_dir = os.path.join(workdir, "lora")
            os.makedirs(alias_dir, exist_ok=True)
            alias = os.path.join(alias_dir, name)
            if os.path.lexists(alias):
                os.remove(alias)
            os.symlink(os.path.join("..", "checkpoints", str(step)), alias)

    def run_eval(step):
        if not eval_probs:
            return {}
        res = em.evaluate(base, mcfg, tok, eval_probs, adapters=state["lora"], alpha=g.lora_alpha,
                          rank=g.lora_rank, mask=umask, batch_size=g.eval_batch_size,
                          max_new_tokens=g.eval_max_new_tokens or g.max_new_tokens,
                          max_prompt_len=g.max_prompt_len, template=g.prompt_template,
                          mesh=mesh if g.eval_batch_size % parallel.batch_size_multiple(mesh) == 0 else None)
        if is_writer():
            em.write_rows(os.path.join(workdir, "eval", f"step{step}.jsonl"), res["rows"])
        return {"eval/accuracy": res["accuracy"], "eval/correct": res["correct"],
                "eval/total": res["total"]}

    start = checkpoint.latest_step(ckpt_dir) or 0
    if start:
        restored = checkpoint.restore(ckpt_dir, start, {"lora": state["lora"],
                                                        "opt_state": state["opt_state"]})
        state = {"lora": restored["lora"], "opt_state": restored["opt_state"]}
        log.truncate_after(start)
    else:
        log.truncate_after(-1)
        log.write(0, run_eval(0))

    score_fn, update_fn = _step_fns(mcfg, _jit_key(g), mesh, parallel.param_layout(state, mesh),
                                    parallel.param_layout(base, mesh),
                                    None if umask is None else parallel.param_layout(umask, mesh))
    mine = parallel.process_rows(P * K)   # completions this process decodes and scores
    merge = lora.merge_fn(float(g.lora_alpha), int(g.lora_rank))
    end = total if stop_after is None else min(stop_after, total)
    bar = tqdm(range(start, end), initial=start, total=total, desc="grpo",
               disable=not (progress and is_writer()))
    for step in bar:
        t0 = time.perf_counter()
        epoch, pos = divmod(step, steps_per_epoch)
        order = np.asarray(jax.random.permutation(jax.random.fold_in(k_data, epoch), len(prompt_ids)))
        idx = order[pos * P:(pos + 1) * P]
        rows = [prompt_ids[i] for i in idx]
        Q = bucket_length(max(len(r) for r in rows))
        p_tok, p_mask = pad_left(rows, pad, Q)
        p_tok, p_mask = np.repeat(p_tok, K, axis=0), np.repeat(p_mask, K, axis=0)  # prompt-major
        k_gen, k_upd = jax.random.split(jax.random.fold_in(k_run, step))
        gen_params = {"base": base, "lora": state["lora"], **({"mask": umask} if umask else {})}
        gen = generate(gen_params, mcfg, p_tok, p_mask, k_gen, max_new_tokens=g.max_new_tokens,
                       temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, eos_token_id=eos,
                       pad_token_id=pad, params_fn=merge, mesh=mesh)
        n_steps = int(gen.n_steps)
        N = min(g.max_new_tokens, 32 * math.ceil(n_steps / 32))   # trim to a few shape buckets
        c_tok, c_mask = (x[:, :N] for x in parallel.to_host((gen.tokens, gen.mask)))
        t1 = time.perf_counter()

        outs = em.decode(tok, c_tok[mine], c_mask[mine])      # this process's rows, gathered below
        gold_b = [golds[i] for i in idx for _ in range(K)][mine]
        per_row = np.stack([
            math_rewards(outs, gold_b, w_correct=g.w_correct, w_format=g.w_format, w_repeat=g.w_repeat),
            [correctness_reward(o, a) for o, a in zip(outs, gold_b)],
            [format_reward(o) for o in outs], [repetition_penalty(o) for o in outs]], 1).astype(np.float64)
        rewards, correct, fmt, rpt = parallel.allgather_rows(per_row).T
        adv = np.asarray(gm.group_advantages(jnp.asarray(rewards), K, mean_only=g.adv_mean_only))
        t2 = time.perf_counter()

        tokens, mask, resp, adv = parallel.put_batch(
            (np.concatenate([p_tok, c_tok], axis=1), np.concatenate([p_mask, c_mask.astype(np.int32)], axis=1),
             c_mask.astype(np.float32), adv), mesh)
        old_lp, ref_lp = score_fn(state["lora"], base, tokens, mask, resp, umask)
        batch = {"tokens": tokens, "mask": mask, "resp_mask": resp, "old_lp": old_lp,
                 "ref_lp": ref_lp, "adv": adv}
        state, stats = update_fn(state, base, batch, k_upd, umask)
        stats = jax.device_get(stats)
        t3 = time.perf_counter()

        done = step + 1
        grp = rewards.reshape(P, K)
        metrics = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
                   "train/accuracy": 100.0 * float(correct.mean()),
                   "train/format_rate": float(np.mean(fmt)),
                   "train/repeat_penalty": float(np.mean(rpt)),
                   "train/completion_len": float(c_mask.sum(1).mean()),
                   "train/zero_std_groups": float(np.mean(grp.std(1) == 0)),
                   "epoch": epoch + 1, **{f"objective/{k}": float(v) for k, v in stats.items()},
                   "time/rollout": t1 - t0, "time/reward": t2 - t1, "time/update": t3 - t2,
                   "time/step": t3 - t0, "time/tokens_per_s": float(c_mask.sum()) / max(t1 - t0, 1e-9)}
        if done == total or (g.eval_every and done % g.eval_every == 0):
            metrics.update(run_eval(done))
        log.write(done, metrics)
        bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", acc=f"{metrics['train/accuracy']:.0f}")
        if done % g.save_every == 0 or done == total:
            save(done)

    rows_log = log.read()
    plots = []
    if is_writer() and rows_log:
        smooth = min(10, max(1, len(rows_log) // 10))
        plots.append(plot_curves(rows_log, ["reward/mean", "train/accuracy", "objective/kl",
                                            "train/completion_len"],
                                 os.path.join(workdir, "grpo_curves.png"),
                                 title=f"GRPO+LoRA {g.model}", smooth=smooth))
        plots.append(plot_curves(rows_log, ["eval/accuracy"], os.path.join(workdir, "eval_accuracy.png"),
                                 title=f"held-out accuracy ({len(eval_probs)} problems)"))
    export_dir = None
    if g.export_final and end == total:
        merged = parallel.to_host(lora.merge(base, state["lora"], g.lora_alpha, g.lora_rank, mask=umask))
        if is_writer():
            from jaxrl_sparse.models import export_hf
            name = os.path.basename(g.model.rstrip("/")).replace(".gguf", "")
            export_dir = os.path.join(workdir, f"grpo-{name}-lora-merged")
            export_hf(export_dir, mcfg, merged, tok)
    log.close()
    evals = [r for r in rows_log if r.get("eval/accuracy") is not None]
    return {"workdir": workdir, "ckpt_dir": ckpt_dir, "steps_done": end, "total_steps": total,
            "metrics": rows_log, "eval": evals, "export_dir": export_dir,
            "plots": [p for p in plots if p], "adapters": state["lora"]}
