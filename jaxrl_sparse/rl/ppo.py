"""PPO with a value head and adaptive KL (TRL 0.8.6 semantics), sparse-update tracking, Orbax.

One iteration (`train`):
  rollout   queries [B,Q] -> jitted sampler -> responses [B,N] (per-row length in [min,max])
  reward    decode "query + response" -> sentiment scores [B] * reward_scale
  forward   one jitted pass: policy log-probs + values, reference log-probs      [B,N]
  advantage KL-penalised per-token rewards, GAE, whitening (inside the update function)
  update    ppo_epochs x (B / mini_batch) Adam steps, one compiled function, state donated
Every iteration's randomness comes from `fold_in(key, step)` and the prompts from
`fold_in(data_key, step)`, so a resumed run continues exactly as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrl_sparse import checkpoint, parallel
from jaxrl_sparse.errors import UserError
from jaxrl_sparse.metrics import MetricsLog, default_workdir, is_writer, plot_curves
from jaxrl_sparse.models.config import ModelConfig
from jaxrl_sparse.kernels import dw_adam as fused
from jaxrl_sparse.models.decoder import (LayerSplit, forward, join_projections, lm_logits, map_layers,
                                         split_layers, split_projections, stack_layers, training_attention_kernels)
from jaxrl_sparse.models.value_head import init_value_head, value_head_apply
from jaxrl_sparse.rl import ppo_math as pm
from jaxrl_sparse.transforms import capture
from jaxrl_sparse.xla_options import concurrent_kernels


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Every knob of a PPO run (the launcher's flags map 1:1 onto these fields)."""
    # model and reward
    model: str = "smollm2-135m-instruct"   # registry name, HF id, HF folder or .gguf file
    reward_model: str = "vader"            # 'vader', or a DistilBERT sequence-classifier folder / HF id
    reward_scale: float = 1.0              # score = reward_scale * (logit(pos) - logit(neg)) or VADER
    reward_pos_label: int = 1
    reward_neg_label: int = 0
    reward_text: str = "query_response"    # what the reward model reads: query_response | review_response | response
    param_dtype: str = "float32"           # storage dtype of the policy: float32 | bfloat16
    compute_dtype: str = "float32"         # activations: float32 | bfloat16
    master_weights: str = "none"           # 'fp32': fp32 master copy updated by Adam, cast for use
    # data
    data: str = "generated"                # generated | imdb | jsonl
    prompts_file: str = ""                 # JSONL with {"text": ...} (or {"prompt": ...}) when data=jsonl
    n_prompts: int = 2000                  # size of the generated / loaded prompt pool
    prompt_words: int = 8                  # first N words of a review go into the query
    prompt_prefix: str = "Sentiment: positive review."
    query_len: int = 16                    # queries are left-padded / truncated to this many tokens
    # sampling
    top_k: int = 50
    top_p: float = 0.95
    temperature: float = 1.0
    output_min_length: int = 24
    output_max_length: int = 64
    steps_per_sync: int = 1                # decode steps per loop test of the rollout (generate's; same samples)
    # PPO (TRL 0.8.6 names and defaults where the seed did not change them)
    batch_size: int = 16
    mini_batch_size: int = 4
    ppo_epochs: int = 4
    learning_rate: float = 2e-6
    adam_eps: float = 1e-8
    max_grad_norm: float = 0.0             # 0 = no clipping (TRL default None)
    log_grad_norm: bool = False            # log ppo/grad_norm (a reduction over every gradient per step; TRL has none)
    fused_adam: str = "auto"               # auto | on | off: weight gradient + Adam as one kernel per matrix (auto: on GPUs)
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    kl_penalty: str = "kl"                 # kl | abs | mse | full
    init_kl_coef: float = 0.2
    adap_kl_ctrl: bool = True
    target: float = 6.0
    horizon: float = 10000.0
    target_kl: float = 1.0
    early_stopping: bool = False
    ratio_threshold: float = 10.0
    whiten_rewards: bool = False
    use_score_scaling: bool = False
    use_score_norm: bool = False
    score_clip: float = 0.0                # 0 = no clipping
    # run
    num_updates: int = 600
    save_ckpt_every: int = 20
    keep_opt_state: int = 1                # newest checkpoints keeping the optimizer state (resuming); 0 = all
    rank_log_every: int = 20
    tau: float = 1e-6
    track_regex: str = ""                  # analysis subset (default attention + MLP + lm_head)
    update_mask: str = ""                  # train only the masked subnetwork (analyzer's mask file)
    seed: int = 0
    workdir: str = ""
    export_final: bool = True
    use_wandb: bool = False
    wandb_project: str = "jaxrl_sparse"
    log_every: int = 1
    mesh: str = ""                         # device mesh 'data:N,fsdp:M' ('' = all devices on data); params/Adam state split over fsdp

    def validate(self) -> "PPOConfig":
        if self.batch_size % self.mini_batch_size:
            raise UserError(f"--batch_size={self.batch_size} is not a multiple of "
                            f"--mini_batch_size={self.mini_batch_size}")
        if not 0 < self.output_min_length <= self.output_max_length:
            raise UserError("need 0 < --output_min_length <= --output_max_length")
        if self.steps_per_sync < 1:
            raise UserError(f"--steps_per_sync={self.steps_per_sync}: give a whole number >= 1")
        if self.kl_penalty not in pm.KL_KINDS:
            raise UserError(f"--kl_penalty={self.kl_penalty!r}; choose one of {', '.join(pm.KL_KINDS)}")
        if self.master_weights not in ("none", "fp32"):
            raise UserError(f"--master_weights={self.master_weights!r}; choose none or fp32")
        if self.reward_text not in ("query_response", "review_response", "response"):
            raise UserError(f"--reward_text={self.reward_text!r}; choose query_response, review_response or response")
        if self.fused_adam not in ("auto", "on", "off"):
            raise UserError(f"--fused_adam={self.fused_adam!r}; choose auto, on or off")
        if self.fused_adam == "on" and self.needs_weight_grads():
            raise UserError("--fused_adam=on never forms the weight gradients that --max_grad_norm and "
                            "--log_grad_norm need; use --fused_adam=auto or off with them")
        if self.fused_adam == "on" and not self.trains_f32():
            raise UserError("--fused_adam=on updates f32 weights; use --param_dtype=float32 or "
                            "--master_weights=fp32, or --fused_adam=auto")
        if self.data not in ("generated", "imdb", "jsonl"):
            raise UserError(f"--data={self.data!r}; choose generated, imdb or jsonl")
        if self.data == "jsonl" and not self.prompts_file:
            raise UserError("--data=jsonl needs --prompts_file=PATH")
        for name in ("num_updates", "save_ckpt_every", "rank_log_every", "ppo_epochs", "query_len"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}")
        checkpoint.check_keep_resume(self.keep_opt_state, "--keep_opt_state")
        return self

    def needs_weight_grads(self) -> bool:
        """Clipping and the gradient-norm statistic read every weight gradient (computed once, shared)."""
        return self.log_grad_norm or self.max_grad_norm > 0

    def trains_f32(self) -> bool:
        """Adam updates f32 weights: f32 storage, or bf16 storage with an f32 master copy."""
        return self.param_dtype == "float32" or self.master_weights == "fp32"


# ----------------------------------------------------------------------------- data
def load_prompt_texts(cfg: PPOConfig) -> List[str]:
    """The pool of review texts queries are built from (seed: IMDB train split)."""
    if cfg.prompts_file or cfg.data == "jsonl":
        from jaxrl_sparse.data.sources import load_jsonl
        rows = load_jsonl(cfg.prompts_file)
        texts = [r.get("text", r.get("prompt")) for r in rows]
        if any(t is None for t in texts):
            raise UserError(f"{cfg.prompts_file}: every line needs a \"text\" (or \"prompt\") field")
        return texts[:cfg.n_prompts]
    if cfg.data == "imdb":
        from jaxrl_sparse.data.sources import load_imdb
        from jaxrl_sparse.data.reviews import clean_review
        return [clean_review(r["text"]) for r in load_imdb("train", limit=cfg.n_prompts)]
    from jaxrl_sparse.data.reviews import generate_review_openings
    return generate_review_openings(cfg.n_prompts, seed=cfg.seed)


def build_queries(texts: Sequence[str], tokenizer, cfg: PPOConfig):
    """Query strings and left-padded token ids [P, query_len] (truncated from the left)."""
    from jaxrl_sparse.data.reviews import ppo_prompt
    queries = [ppo_prompt(t, cfg.prompt_words, cfg.prompt_prefix) for t in texts]
    from jaxrl_sparse.data.batching import pad_left
    toks, mask = pad_left([tokenizer(q)["input_ids"] for q in queries], tokenizer.pad_token_id,
                          cfg.query_len)
    return queries, toks, mask


def reward_text(pcfg: PPOConfig, query: str) -> str:
    """The part of the query the reward model sees before the response (seed: the whole query)."""
    if pcfg.reward_text == "response":
        return ""
    if pcfg.reward_text == "review_response" and pcfg.prompt_prefix and query.startswith(pcfg.prompt_prefix):
        return query[len(pcfg.prompt_prefix):].lstrip()
    return query


# ----------------------------------------------------------------------------- model pieces
def response_outputs(model_params, vhead, mcfg: ModelConfig, tokens, mask, Q: int):
    """Log-probs of response tokens and values at the states that produced them.

    tokens, mask [B, Q+N]; the response starts at Q. Position t predicts token t+1, so the
    response's log-probs come from positions Q-1 .. Q+N-2 (TRL's `logits[:, :-1]` alignment).
    Returns logprobs [B,N], values [B,N] (or None without a head), logits [B,N,V].
    """
    out = forward(model_params, mcfg, tokens, mask, compute_logits=False)
    h = out.hidden[:, Q - 1:-1]                               # [B, N, D]
    logits = lm_logits(model_params, mcfg, h)                 # [B, N, V] f32
    logprobs = pm.logprobs_from_logits(logits, tokens[:, Q:])
    values = None if vhead is None else value_head_apply(vhead, h, dropout_prob=0.0)
    return logprobs, values, logits


def _cast_tree(tree, dtype):
    return jax.tree_util.tree_map(lambda x: x.astype(dtype), tree)


def policy_params(trainable, pcfg: PPOConfig):
    """The decoder parameters the policy runs with (cast from the fp32 master if there is one)."""
    p = trainable["model"]
    if pcfg.master_weights == "fp32" and pcfg.param_dtype == "bfloat16":
        p = _cast_tree(p, jnp.bfloat16)
    return p


def make_optimizer(pcfg: PPOConfig) -> optax.GradientTransformation:
    parts = []
    if pcfg.max_grad_norm and pcfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(pcfg.max_grad_norm))
    parts.append(optax.adam(pcfg.learning_rate, eps=pcfg.adam_eps))
    return optax.chain(*parts)


# ----------------------------------------------------------------------------- jitted steps
@functools.lru_cache(maxsize=8)
def make_score_fn(mcfg: ModelConfig, Q: int, mesh=None):
    """jit: (trainable, ref_params, tokens, mask, pcfg) -> old logprobs, values, ref logprobs, kl_full.

    trainable's model may be stacked or in the update's carry layout (`update_carry`): `forward`
    runs per-layer weights layer by layer. mesh: outputs [B, N] split over the mesh's batch axes
    (inputs keep the shardings they have).
    """

    def fn(trainable, ref_params, tokens, mask, pcfg_static):
        pcfg = pcfg_static
        pol = policy_params(trainable, pcfg)
        lp, v, logits = response_outputs(pol, trainable["value_head"], mcfg, tokens, mask, Q)
        rlp, _, rlogits = response_outputs(ref_params, None, mcfg, tokens, mask, Q)
        kl = None
        if pcfg.kl_penalty == "full":
            kl = pm.kl_penalty(lp, rlp, "full", logits=logits, ref_logits=rlogits)
        return lp, v, rlp, kl

    shard = {} if mesh is None else {"out_shardings": parallel.batch_sharding(mesh)}
    return jax.jit(fn, static_argnums=(4,), compiler_options=concurrent_kernels(mesh), **shard)


def compile_key(pcfg: PPOConfig) -> PPOConfig:
    """The config with run-only fields blanked: equal keys share compiled step functions."""
    return dataclasses.replace(pcfg, workdir="", num_updates=1, save_ckpt_every=1, rank_log_every=1,
                               use_wandb=False, update_mask="", seed=0, model="", reward_model="",
                               prompts_file="", n_prompts=0)


def make_loss_fn(mcfg: ModelConfig, pcfg: PPOConfig, Q: int):
    """(trainable, mini-batch[, captures]) -> (PPO loss, stats): what each mini-batch step differentiates.

    captures (per layer, `capture.zero_captures`; the model's layers split per layer): those Dense
    layers expose X and dY as the captures' gradients (run under `capture.intercepting()`)."""

    def loss_fn(trainable, mbatch, captures=None):
        pol = policy_params(trainable, pcfg)
        if captures is not None:
            pol = {**pol, "layers": tuple(capture.with_captures(layer, c)
                                          for layer, c in zip(split_layers(pol["layers"]), captures, strict=True))}
        lp, v, logits = response_outputs(pol, trainable["value_head"], mcfg, mbatch["tokens"],
                                         mbatch["mask"], Q)
        return pm.ppo_loss(mbatch["logprobs"], mbatch["values"], lp, v, mbatch["advantages"],
                           mbatch["returns"], mbatch["resp_mask"], cliprange=pcfg.cliprange,
                           cliprange_value=pcfg.cliprange_value, vf_coef=pcfg.vf_coef,
                           ratio_threshold=pcfg.ratio_threshold, logits=logits)

    return loss_fn


def apply_grads(optimizer: optax.GradientTransformation, state, grads, grad_mask=None):
    """One optimizer step on {'trainable', 'opt_state'}; grad_mask (like the model) zeroes gradients."""
    if grad_mask is not None:
        grads = {**grads, "model": jax.tree_util.tree_map(
            lambda g, m: g * m.astype(g.dtype), grads["model"], grad_mask)}
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
    trainable = optax.apply_updates(state["trainable"], updates)
    # keep storage dtypes (bf16 params stay bf16: the rounding users study)
    trainable = jax.tree_util.tree_map(lambda n, o: n.astype(o.dtype), trainable, state["trainable"])
    return {"trainable": trainable, "opt_state": opt_state}


def minibatch_step(loss_fn, optimizer: optax.GradientTransformation, state, mbatch, grad_mask=None,
                   grad_norm: bool = False):
    """One PPO mini-batch step: loss and gradient, then the optimizer. Returns (new state, stats).

    grad_norm: also return the gradients' global norm as `ppo/grad_norm` (with clipping on, XLA
    shares it with the clip's; alone it is one extra read of every gradient per step)."""
    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["trainable"], mbatch)
    if grad_norm:
        stats["ppo/grad_norm"] = optax.global_norm(grads)
    return apply_grads(optimizer, state, grads, grad_mask), stats


def adam_hyper(pcfg: PPOConfig) -> fused.AdamHyper:
    """`make_optimizer`'s Adam as the fused kernel's constants (optax.adam's b1, b2 defaults)."""
    return fused.AdamHyper(lr=float(pcfg.learning_rate), eps=float(pcfg.adam_eps))


def _adam_state(opt_state) -> optax.ScaleByAdamState:
    """The Adam moments in `make_optimizer`'s state without clipping: chain(adam) = ((adam, lr),)."""
    st = opt_state[0][0]
    if not isinstance(st, optax.ScaleByAdamState):
        raise TypeError(f"fused Adam expects make_optimizer's plain Adam state, got {type(st).__name__}")
    return st


def _layer_at(tree, l: int, path):
    """The param dict at `path` in layer l of a model-shaped tree whose layers are a LayerSplit."""
    node = tree["layers"].big[l]
    for name in path:
        node = node[name]
    return node


def _set_kernels(tree, new_kernels):
    """A model-shaped tree (layers a LayerSplit) with new_kernels[l][path] put at path/kernel of layer l."""
    ls: LayerSplit = tree["layers"]
    big = tuple(capture.with_captures(b, {path: {"kernel": k} for path, k in ks.items()})
                for b, ks in zip(ls.big, new_kernels, strict=True))
    return {**tree, "layers": ls._replace(big=big)}


def fused_targets(model, blocks: fused.Blocks = fused.Blocks()):
    """Per layer {path: Blocks}: the f32 Dense kernels of a layer-split model the fused step updates."""
    out = []
    for big in model["layers"].big:
        fit = {}
        for path, k in capture.dense_kernels(big).items():
            b = fused.fit_blocks(*k.shape, blocks) if k.dtype == jnp.float32 else None
            if b is not None:
                fit[path] = b
        out.append(fit)
    return out


def fused_minibatch_step(loss_fn, optimizer: optax.GradientTransformation, hyper: fused.AdamHyper, state,
                         mbatch, grad_mask=None, blocks: fused.Blocks = fused.Blocks(), compute_dtype=jnp.float32):
    """`minibatch_step` with each per-layer weight matrix's gradient and Adam step fused (`kernels.dw_adam`).

    state's model layers are a LayerSplit (the update's layer loop) and make_optimizer's Adam has no
    clipping. The loss runs with captures on those matrices (their weight gradients are never formed);
    optax updates every other leaf, then one kernel per matrix computes Xᵀ dY and its Adam step.
    """
    model = state["trainable"]["model"]
    targets = fused_targets(model, blocks)
    lead = mbatch["tokens"].shape
    caps = tuple(capture.zero_captures({p: _layer_at(model, l, p)["kernel"] for p in t}, lead, compute_dtype)
                 for l, t in enumerate(targets))
    with capture.intercepting():
        (_, stats), (grads, cap_grads) = jax.value_and_grad(loss_fn, argnums=(0, 2), has_aux=True)(
            state["trainable"], mbatch, caps)
    # the fused matrices' gradients are zero here and their optax results unused (XLA drops them)
    new = apply_grads(optimizer, state, grads, grad_mask)
    old_adam, new_adam = _adam_state(state["opt_state"]), _adam_state(new["opt_state"])
    corr = fused.corrections(new_adam.count, hyper)
    kernels, mus, nus = ([{} for _ in targets] for _ in range(3))
    for l, t in enumerate(targets):
        for path, b in t.items():
            c = cap_grads[l][path]
            x, dy = c[capture.X_CAP], c[capture.DY_CAP]
            mask = None if grad_mask is None else _layer_at(grad_mask, l, path)["kernel"]
            kernels[l][path], mus[l][path], nus[l][path] = fused.dw_adam(
                x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]), _layer_at(model, l, path)["kernel"],
                _layer_at(old_adam.mu["model"], l, path)["kernel"], _layer_at(old_adam.nu["model"], l, path)["kernel"],
                corr, mask, hyper=hyper, blocks=b)
    trainable = {**new["trainable"], "model": _set_kernels(new["trainable"]["model"], kernels)}
    adam = new_adam._replace(mu={**new_adam.mu, "model": _set_kernels(new_adam.mu["model"], mus)},
                             nu={**new_adam.nu, "model": _set_kernels(new_adam.nu["model"], nus)})
    opt_state = ((adam, *new["opt_state"][0][1:]), *new["opt_state"][1:])
    return {"trainable": trainable, "opt_state": opt_state}, stats


# The layer loop keeps leaves with fewer elements per layer than this stacked (see make_update_fn).
SMALL_LEAF_STACKED_BELOW = 1 << 16


def update_layer_loop(layer_loop: Optional[bool] = None) -> bool:
    """`make_update_fn`'s layer_loop: None = on for accelerators, off on CPU (compile time)."""
    return jax.default_backend() != "cpu" if layer_loop is None else bool(layer_loop)


def use_fused_adam(pcfg: PPOConfig, layer_loop: bool, one_device: bool) -> bool:
    """Whether the update runs `fused_minibatch_step` (pcfg.fused_adam; see make_update_fn)."""
    if pcfg.fused_adam == "on" and not (layer_loop and one_device):  # the config's own conflicts: validate()
        raise UserError("--fused_adam=on needs the update's layer loop (accelerators) and one device; "
                        "use --fused_adam=auto")
    fusable = layer_loop and one_device and pcfg.trains_f32() and not pcfg.needs_weight_grads()
    return fusable and (pcfg.fused_adam == "on" or (pcfg.fused_adam == "auto" and jax.default_backend() == "gpu"))


def to_update_carry(tree, join_qkv: bool, join_gate_up: bool, small_below: int):
    """A model-shaped tree (params, Adam moments, a gradient mask) in the layer loop's carry layout:
    projections joined (`join_projections`), layers split (`split_layers`, small leaves stacked)."""
    return map_layers(tree, lambda layers: split_layers(join_projections(layers, join_qkv, join_gate_up),
                                                        small_below))


def from_update_carry(tree, mcfg: ModelConfig):
    """Inverse of `to_update_carry`: layers stacked again, projections split back."""
    return map_layers(tree, lambda layers: split_projections(stack_layers(layers), mcfg))


class UpdateCarry(NamedTuple):
    """Jitted conversions of a resident update's state (`make_update_fn(resident=True)`).

    to_carry: a stacked state (or gradient mask) -> the carry layout (a copy: drop the input);
    to_stacked: a carry-layout tree -> stacked (a copy; for checkpoints, rank logging, export).
    The rollout and the score pass read the carry's weights as they lie (`generate` and `forward`
    take per-layer weights), so no copy is made for them."""
    to_carry: Any
    to_stacked: Any


def use_resident_update(layer_loop: Optional[bool], mesh=None) -> bool:
    """Whether `train` keeps the state in the update's carry layout: layer loop, one device."""
    return update_layer_loop(layer_loop) and (mesh is None or mesh.size == 1)


@functools.lru_cache(maxsize=8)
def update_carry(mcfg: ModelConfig, small_below: int = SMALL_LEAF_STACKED_BELOW, join_qkv: bool = True,
                 join_gate_up: bool = True) -> UpdateCarry:
    """`UpdateCarry` for a resident update made with the same small_below / join_qkv / join_gate_up."""
    return UpdateCarry(
        to_carry=jax.jit(lambda tree: to_update_carry(tree, join_qkv, join_gate_up, small_below)),
        to_stacked=jax.jit(lambda tree: from_update_carry(tree, mcfg)))


def default_fused_blocks(mesh=None) -> fused.Blocks:
    """The fused kernel's tiles in the update: programs that walk the tiles (`fused.Blocks`' default)
    when the update's kernels run concurrently (`concurrent_kernels`), one program per tile when
    XLA_FLAGS makes them run one after another, where walking is slower (the seed's update 0.220 vs
    0.206 s on an H100; BENCHMARKS.md, session 15)."""
    return fused.Blocks() if concurrent_kernels(mesh) else fused.Blocks(programs=0)


@functools.lru_cache(maxsize=8)
def make_update_fn(mcfg: ModelConfig, pcfg: PPOConfig, Q: int, mesh=None,
                   layout: Optional[parallel.Layout] = None, masked: bool = False,
                   layer_loop: Optional[bool] = None, small_below: int = SMALL_LEAF_STACKED_BELOW,
                   join_qkv: bool = True, join_gate_up: bool = True, fused_blocks: Optional[fused.Blocks] = None,
                   resident: bool = False):
    """jit: (state, batch, key, grad_mask) -> (state, stats). All PPO epochs and mini-batches in one function.

    state = {'trainable': {'model', 'value_head'}, 'opt_state'}; batch holds tokens/mask [B,Q+N],
    resp_mask, old logprobs, values, advantages, returns [B,N]. Early stopping (TRL: policykl of
    the epoch's last mini-batch > 1.5 target_kl) skips the remaining epochs (a select keeps the old state).
    mesh + layout (the state's shardings, `parallel.param_layout`): jit in/out shardings, the batch
    split over the mesh's batch axes; masked: grad_mask is a tree laid out like the model.
    layer_loop: the mini-batch steps carry per-layer weights and Adam moments (`split_layers` on
    entry, stacked again on exit) and run the layers unrolled (None = on for accelerators, off on
    CPU for compile time). Same result; on the H100 16 fp32
    steps of gpt2-medium took 215 ms against 327 ms with the stacked carry (the layer scan nested
    in the mini-batch scan copies the carry). Leaves under `small_below` elements per layer
    (biases, norm scales) stay stacked: one Adam kernel and one norm term each, not one per layer
    (`decoder.LayerSplit`; 0 splits every leaf). join_qkv: the carry also holds each layer's q/k/v
    projections joined (`decoder.join_projections`, weights and Adam moments): one gemm where three ran;
    join_gate_up: likewise a gated MLP's gate/up projections (one gemm where two ran). One device
    only: joining along a sharded axis would move data.
    resident (with the layer loop): state and grad_mask come and go in the carry layout
    (`update_carry(...).to_carry`), so the conversion into it and back, ~15 ms per update for
    gpt2-medium's weights and Adam moments on an H100, is not paid every update; the caller keeps
    the state in that layout between updates (`train`).
    pcfg.fused_adam: each per-layer f32 weight matrix's gradient and Adam step run as one kernel
    (`fused_minibatch_step`, tiles `fused_blocks`, None = `default_fused_blocks(mesh)`); 'auto' = on
    a GPU where it applies: layer loop, one device, f32 weights (or an f32 master), no clipping and
    no gradient-norm statistic (both need the weight gradients). 'on' off the GPU runs the same
    program with XLA's gemm and Adam in place of the kernel (tests).
    """
    layer_loop = update_layer_loop(layer_loop)
    one_device = mesh is None or mesh.size == 1  # joining along a sharded output axis would need gathers
    join_qkv, join_gate_up = join_qkv and one_device, join_gate_up and one_device
    if resident and not (layer_loop and one_device):
        raise ValueError("make_update_fn: resident needs the layer loop on one device")
    B, mb = pcfg.batch_size, pcfg.mini_batch_size
    n_mb = B // mb
    optimizer = make_optimizer(pcfg)
    loss_fn = make_loss_fn(mcfg, pcfg, Q)
    grad_norm = pcfg.needs_weight_grads()  # free with clipping: the clip computes it
    fused_adam = use_fused_adam(pcfg, layer_loop, one_device)
    fused_blocks = fused_blocks or default_fused_blocks(mesh)
    hyper = adam_hyper(pcfg)
    compute_dtype = jnp.dtype(mcfg.dtype)

    def update(state, batch, key, grad_mask):
        with training_attention_kernels(layer_loop and one_device):  # read while tracing
            return _update(state, batch, key, grad_mask)

    def _update(state, batch, key, grad_mask):
        def mb_step(carry, xs):
            idx, epoch_end = xs
            state, stop = carry
            mbatch = parallel.constrain_batch(jax.tree_util.tree_map(lambda x: x[idx], batch), mesh)
            if fused_adam:
                new_state, stats = fused_minibatch_step(loss_fn, optimizer, hyper, state, mbatch, grad_mask,
                                                        fused_blocks, compute_dtype)
            else:
                new_state, stats = minibatch_step(loss_fn, optimizer, state, mbatch, grad_mask, grad_norm)
            stats["ppo/applied"] = 1.0 - stop.astype(jnp.float32)
            if pcfg.early_stopping:  # TRL checks at the end of each epoch, on its last mini-batch
                # a select, not lax.cond: a GPU conditional reads its predicate on the host (a
                # stream sync per mini-batch). Compiled in only when stop can be set at all.
                new_state = jax.tree_util.tree_map(lambda o, n: jnp.where(stop, o, n), state, new_state)
                stop = stop | (epoch_end & (stats["policy/policykl"] > 1.5 * pcfg.target_kl))
            return (new_state, stop), stats

        if layer_loop and not resident:
            state = to_update_carry(state, join_qkv, join_gate_up, small_below)
            grad_mask = to_update_carry(grad_mask, join_qkv, join_gate_up, small_below)
        perms = jnp.concatenate([jax.random.permutation(jax.random.fold_in(key, e), B).reshape(n_mb, mb)
                                 for e in range(pcfg.ppo_epochs)])
        epoch_end = (jnp.arange(pcfg.ppo_epochs * n_mb) % n_mb) == n_mb - 1
        (state, _), stats = jax.lax.scan(mb_step, (state, jnp.zeros((), jnp.bool_)), (perms, epoch_end))
        if layer_loop and not resident:
            state = from_update_carry(state, mcfg)
        w = stats.pop("ppo/applied")
        mean = {k: jnp.sum(v * w) / jnp.maximum(jnp.sum(w), 1.0) for k, v in stats.items()}
        mean["ppo/minibatches_applied"] = jnp.sum(w)
        return state, mean

    opts = concurrent_kernels(mesh)  # every single-device update, as default_fused_blocks assumes
    if mesh is None or resident:  # resident: one device, the carry layout's own structure
        return jax.jit(update, donate_argnums=(0,), compiler_options=opts)
    rep_ = parallel.replicated(mesh)
    st = layout.tree
    mask_sh = st["trainable"]["model"] if masked else None
    return jax.jit(update, donate_argnums=(0,), in_shardings=(st, parallel.batch_sharding(mesh), rep_, mask_sh),
                   out_shardings=(st, rep_), compiler_options=opts)


def compute_advantages(pcfg: PPOConfig, scores, logprobs, ref_logprobs, values, resp_mask, kl_coef,
                       kl_full=None):
    """Rewards with the KL penalty, then GAE and whitening (TRL `compute_rewards` + `compute_advantages`)."""
    if kl_full is not None:
        kl = kl_full
        non_score = -kl_coef * kl
        rewards = non_score + scores[:, None] * pm.last_token_onehot(resp_mask)
    else:
        rewards, non_score, kl = pm.compute_rewards(scores, logprobs, ref_logprobs, resp_mask, kl_coef,
                                                    pcfg.kl_penalty)
    adv, returns, vals = pm.gae(rewards, values, resp_mask, pcfg.gamma, pcfg.lam,
                                whiten_rewards=pcfg.whiten_rewards)
    stats = {"objective/kl": pm.mean_kl_objective(kl, resp_mask),
             "objective/kl_coef": kl_coef,
             "objective/non_score_reward": jnp.mean(jnp.sum(non_score * resp_mask, -1))}
    return adv, returns, vals, stats


compute_advantages = jax.jit(compute_advantages, static_argnums=(0,))


# ----------------------------------------------------------------------------- the loop
def _response_lengths(key, B: int, lo: int, hi: int):
    """Per-row target response length ~ U{lo..hi} (TRL's LengthSampler)."""
    return jax.random.randint(key, (B,), lo, hi + 1)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _step_draws(k_run, k_data, step, n_queries: int, B: int, lo: int, hi: int):
    """A training step's random draws as one program: (sampling key, update key, prompt indices
    [B], response lengths [B]). The same values as the eager ops, whose ~1 ms each of host time
    left the device idle before every rollout."""
    k_gen, k_len, k_upd = jax.random.split(jax.random.fold_in(k_run, step), 3)
    idx = jax.random.choice(jax.random.fold_in(k_data, step), n_queries, (B,), replace=False)
    return k_gen, k_upd, idx, _response_lengths(k_len, B, lo, hi)


def train(pcfg: PPOConfig, *, progress: bool = True, stop_after: Optional[int] = None,
          layer_loop: Optional[bool] = None) -> Dict[str, Any]:
    """Runs (or resumes) a PPO run in `pcfg.workdir`; returns a summary dict.

    stop_after: stop once this many updates are done in total (tests use it to simulate a kill).
    layer_loop: the update's (`make_update_fn`; None = on for accelerators, off on CPU). With it on
    one device the state stays in the update's carry layout between updates (`update_carry`);
    checkpoints, rank statistics and the export see the usual stacked layout.
    """
    from tqdm.auto import tqdm
    from jaxrl_sparse.generate import generate
    from jaxrl_sparse.models import load_model
    from jaxrl_sparse.rewards.sentiment import make_sentiment_reward

    pcfg = pcfg.validate()
    workdir = pcfg.workdir or default_workdir("ppo", pcfg.model)
    ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
    lm = load_model(pcfg.model, param_dtype=pcfg.param_dtype, dtype=pcfg.compute_dtype)
    mcfg, tok = lm.config, lm.tokenizer
    reward_kwargs = {}
    if pcfg.reward_model.lower() != "vader":
        reward_kwargs = dict(pos_label=pcfg.reward_pos_label, neg_label=pcfg.reward_neg_label)
    reward_fn = make_sentiment_reward(pcfg.reward_model, **reward_kwargs)
    texts = load_prompt_texts(pcfg)
    if len(texts) < pcfg.batch_size:
        raise UserError(f"only {len(texts)} prompts for --batch_size={pcfg.batch_size}")
    queries, q_tok, q_mask = build_queries(texts, tok, pcfg)
    Q, N, B = pcfg.query_len, pcfg.output_max_length, pcfg.batch_size
    mesh = parallel.make_mesh(pcfg.mesh)
    parallel.check_batch(B, mesh, "--batch_size")
    eos = mcfg.eos_token_id if mcfg.eos_token_id is not None else tok.eos_token_id

    root = jax.random.key(pcfg.seed)
    k_init, k_data, k_run = jax.random.split(root, 3)
    ref_params = parallel.put_params(lm.params, mesh)   # fsdp-sharded (replicated when fsdp = 1)
    master = pcfg.master_weights == "fp32" and pcfg.param_dtype == "bfloat16"
    # a separate buffer (jit outputs never alias inputs): the update donates it, the reference stays
    model_train = jax.jit(lambda p: _cast_tree(p, jnp.float32) if master else p,
                          out_shardings=parallel.param_shardings(ref_params, mesh))(ref_params)
    trainable = {"model": model_train,
                 "value_head": parallel.put_params(init_value_head(mcfg.hidden_size, k_init), mesh)}
    optimizer = make_optimizer(pcfg)
    opt_sh = parallel.param_shardings(jax.eval_shape(optimizer.init, trainable), mesh)
    state = {"trainable": trainable, "opt_state": jax.jit(optimizer.init, out_shardings=opt_sh)(trainable)}
    layout = parallel.param_layout(state, mesh)
    host = {"kl_coef": float(pcfg.init_kl_coef), "moments": [0.0, 1.0, 1.0, 1e-24]}

    grad_mask = None
    if pcfg.update_mask:
        from jaxrl_sparse.analysis.mask import load_update_mask
        grad_mask = parallel.put_params(load_update_mask(pcfg.update_mask, model_train), mesh)

    log = MetricsLog(workdir, use_wandb=pcfg.use_wandb, wandb_project=pcfg.wandb_project,
                     run_config=dataclasses.asdict(pcfg))
    start = 0
    last = checkpoint.latest_step(ckpt_dir)  # every process (a barrier in multi-process runs)
    meta = {"trainer": "ppo", "model": pcfg.model, "model_config": dataclasses.asdict(mcfg),
            "ppo_config": dataclasses.asdict(pcfg)}

    resident = use_resident_update(layer_loop, mesh)
    carry = update_carry(mcfg) if resident else None

    def in_carry() -> bool:  # per-layer weights: converted below, once the update is made
        return isinstance(state["trainable"]["model"]["layers"], (tuple, list))

    def stacked():  # the state as checkpoints hold it
        return carry.to_stacked(state) if in_carry() else state

    def trainable_now():  # {'model', 'value_head'}, stacked: what rank statistics and the export read
        return carry.to_stacked(state["trainable"]) if in_carry() else state["trainable"]

    def resume_item(st):
        # 'params' (what the analyzer and exports read) is the trained model itself unless an fp32
        # master copy exists; only that copy, the value head and Adam's moments go to the resume item
        out = {"value_head": st["trainable"]["value_head"], "opt_state": st["opt_state"]}
        return {**out, "master": st["trainable"]["model"]} if master else out

    def save(step):
        st = stacked()
        checkpoint.save(ckpt_dir, step, {"params": policy_params(st["trainable"], pcfg)}, resume=resume_item(st),
                        keep_resume=pcfg.keep_opt_state, metadata={**meta, "host": host, "step": step},
                        overwrite=True)

    def save_due(done):  # a checkpoint after update `done` (step 0 is written before the first)
        return done % pcfg.save_ckpt_every == 0 or done == pcfg.num_updates

    saves = [s for s in range(1 if last is None else last + 1, pcfg.num_updates + 1) if save_due(s)]
    checkpoint.check_disk(ckpt_dir, len(saves) + (last is None),
                          jax.eval_shape(lambda t: policy_params(t, pcfg), state["trainable"]),
                          resume_item(state), pcfg.keep_opt_state,
                          checkpoint.tree_nbytes(lm.params) if pcfg.export_final else 0)
    if last is not None:
        restored = checkpoint.restore_resume(ckpt_dir, last, resume_item(state))
        model = restored["master"] if master else checkpoint.restore_params(ckpt_dir, last, state["trainable"]["model"])
        state = {"trainable": {"model": model, "value_head": restored["value_head"]},
                 "opt_state": restored["opt_state"]}
        host = checkpoint.read_metadata(ckpt_dir, last)["host"]
        start = last
        log.truncate_after(last)
    else:
        save(0)
        log.truncate_after(-1)

    score_fn = make_score_fn(mcfg, Q, mesh)
    pkey = compile_key(pcfg)
    update_fn = make_update_fn(mcfg, pkey, Q, mesh, layout, grad_mask is not None, layer_loop=layer_loop,
                               resident=resident)
    if resident:  # from here on the state (and the mask) stay in the update's carry layout
        del trainable, model_train  # the stacked arrays go with the last reference (the line below)
        state = carry.to_carry(state)
        grad_mask = None if grad_mask is None else carry.to_carry(grad_mask)
    mine = parallel.process_rows(B)   # rows this process decodes and scores (host work)
    params_0 = ref_params
    end = pcfg.num_updates if stop_after is None else min(stop_after, pcfg.num_updates)
    bar = tqdm(range(start, end), initial=start, total=pcfg.num_updates, disable=not (progress and is_writer()),
               desc="ppo")
    rewards_hist: List[float] = []
    for step in bar:
        t0 = time.perf_counter()
        k_gen, k_upd, idx, lengths = _step_draws(k_run, k_data, step, len(queries), B, pcfg.output_min_length, N)
        idx, lengths = np.asarray(idx), np.asarray(lengths)
        view = state["trainable"]  # as it lies: the rollout and the score pass read either layout
        pol = policy_params(view, pcfg)
        query, query_mask = q_tok[idx], q_mask[idx]                       # host [B, Q]
        gen = generate(pol, mcfg, query, query_mask, k_gen, mesh=mesh,
                       max_new_tokens=N, temperature=pcfg.temperature, top_k=pcfg.top_k,
                       top_p=pcfg.top_p, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                       steps_per_sync=pcfg.steps_per_sync)
        g_tok, g_mask = parallel.to_host((gen.tokens, gen.mask))
        rmask_np = (g_mask.astype(bool) & (np.arange(N)[None] < lengths[:, None])).astype(np.int32)
        resp_np = np.where(rmask_np > 0, g_tok, tok.pad_token_id).astype(np.int32)
        t1 = time.perf_counter()

        tokens, mask, resp_f = parallel.put_batch(
            (np.concatenate([query, resp_np], axis=1), np.concatenate([query_mask, rmask_np], axis=1),
             rmask_np.astype(np.float32)), mesh)
        # the score pass needs no reward: dispatched now, the device runs it while the host decodes
        # the responses and computes their rewards below
        lp, values, rlp, kl_full = score_fn(view, ref_params, tokens, mask, pkey)
        del view, pol  # the update donates the state

        rows_p = range(B)[mine]   # decoded and scored by this process, gathered below
        responses = [tok.decode(resp_np[i][rmask_np[i] > 0], skip_special_tokens=True) for i in rows_p]
        raw = parallel.allgather_rows(np.asarray(
            reward_fn([reward_text(pcfg, queries[idx[i]]) + r for i, r in zip(rows_p, responses)]), np.float32))
        scores = jnp.asarray(raw * pcfg.reward_scale)
        moments = pm.RunningMoments(*[jnp.float32(x) for x in host["moments"]])
        scores, moments = pm.process_scores(scores, moments, use_score_scaling=pcfg.use_score_scaling,
                                            use_score_norm=pcfg.use_score_norm,
                                            score_clip=pcfg.score_clip or None)
        t2 = time.perf_counter()

        scores = parallel.put_batch(np.asarray(scores), mesh)
        adv, returns, vals, adv_stats = compute_advantages(pkey, scores, lp, rlp, values, resp_f,
                                                           jnp.float32(host["kl_coef"]), kl_full)
        batch = parallel.put_batch({"tokens": tokens, "mask": mask, "resp_mask": resp_f, "logprobs": lp,
                                    "values": vals, "advantages": adv, "returns": returns}, mesh)
        state, stats = update_fn(state, batch, k_upd, grad_mask)
        stats = jax.device_get(stats)
        adv_stats = jax.device_get(adv_stats)
        t3 = time.perf_counter()

        host["kl_coef"] = float(pm.kl_ctl_step(host["kl_coef"], float(adv_stats["objective/kl"]), B,
                                               adaptive=pcfg.adap_kl_ctrl, target=pcfg.target,
                                               horizon=pcfg.horizon))
        host["moments"] = [float(x) for x in moments]
        done = step + 1
        metrics = {"env/reward_mean": float(np.mean(raw)), "env/reward_std": float(np.std(raw)),
                   "env/score_mean": float(np.mean(parallel.to_host(scores))),
                   "env/response_len": float(np.mean(rmask_np.sum(1))),
                   **{k: float(v) for k, v in adv_stats.items()},
                   **{k: float(v) for k, v in stats.items()},
                   # time/reward: decoding and rewards, with the score pass running on the device meanwhile
                   "time/rollout": t1 - t0, "time/reward": t2 - t1, "time/update": t3 - t2,
                   "time/step": t3 - t0}
        if done % pcfg.rank_log_every == 0 or done == pcfg.num_updates:
            from jaxrl_sparse.analysis.ranks import layer_rank_stats
            p_t = policy_params(trainable_now(), pcfg)
            if mesh.size > 1:  # batched SVDs of sharded arrays: gathered to one device (host copy) first
                p_t, params_0 = parallel.to_host(p_t), parallel.to_host(params_0)
            metrics.update(layer_rank_stats(p_t, params_0, tau=pcfg.tau, include_regex=pcfg.track_regex or None))
        log.write(done, metrics)
        rewards_hist.append(metrics["env/reward_mean"])
        bar.set_postfix(reward=f"{metrics['env/reward_mean']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
        if save_due(done):
            save(done)

    rows = log.read()
    plots = []
    if is_writer() and rows:
        plots.append(plot_curves(rows, ["env/reward_mean", "objective/kl", "objective/kl_coef",
                                        "rank/global/density"],
                                 os.path.join(workdir, "ppo_curves.png"), title=f"PPO {pcfg.model}",
                                 smooth=min(10, max(1, len(rows) // 10))))
    export_dir = None
    if pcfg.export_final and end == pcfg.num_updates:
        host_params = parallel.to_host(policy_params(trainable_now(), pcfg))  # every process: a gather
        if is_writer():
            from jaxrl_sparse.models import export_hf
            name = os.path.basename(pcfg.model.rstrip("/")).replace(".gguf", "")
            export_dir = os.path.join(workdir, f"ppo-{name}-sentiment-final")
            export_hf(export_dir, mcfg, host_params, tok)
    log.close()
    return {"workdir": workdir, "ckpt_dir": ckpt_dir, "steps_done": end, "metrics": rows,
            "export_dir": export_dir, "plots": [p for p in plots if p]}
