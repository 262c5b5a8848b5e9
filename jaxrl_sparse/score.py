"""Log-probabilities of token sequences under a decoder, and batch scoring of JSONL texts.

`token_logprobs` / `sequence_logprobs` are the building blocks PPO and GRPO use for policy and
reference log-probs; `score_file` is the library side of `python -m launch.score`.

Tokenization (`encode_example`): a text is tokenized as the model's tokenizer does by default
(`tok(text).input_ids`, so a BOS is included when the tokenizer adds one) and scored over every
token after the first. With a prompt, `tok(prompt)` and `tok(prompt + text)` are tokenized with
the same defaults and the continuation is every token after `len(tok(prompt))`, provided the
prompt's tokens are a prefix of the joint ones. When they are not (BPE merged across the seam,
typically a prompt ending in a space), the prompt's trailing whitespace is moved to the text and
the two are encoded separately (`tok(prompt.rstrip())` + `tok(ws + text, add_special_tokens=False)`,
as lm-evaluation-harness does); the output line then carries `"split": "separate"`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_sparse import parallel
from jaxrl_sparse.errors import UserError
from jaxrl_sparse.models.config import ModelConfig
from jaxrl_sparse.models.decoder import forward


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """lp[b, t] = log softmax(logits[b, t])[tokens[b, t + 1]].

    logits [B, T, V] (any float dtype; computed in float32), tokens [B, T] int -> lp [B, T-1] float32:
    the log-probability of each token given the ones before it (aligned with `tokens[:, 1:]`).
    """
    lg = logits[:, :-1].astype(jnp.float32)
    picked = jnp.take_along_axis(lg, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(lg, axis=-1)


def sequence_logprobs(params, cfg: ModelConfig, tokens: jax.Array, mask: jax.Array,
                      loss_mask: Optional[jax.Array] = None) -> jax.Array:
    """Per-token log-probs [B, T-1] of `tokens[:, 1:]`, zero where not scored.

    tokens [B, T] int32 (left padding works), mask [B, T] (1 = real token).
    loss_mask [B, T]: 1 at tokens to score (the first real token can never be scored); default:
    every real token after the first, i.e. `mask[:, 1:] & mask[:, :-1]`.
    Sequence log-likelihood = `sequence_logprobs(...).sum(-1)`.
    """
    logits = forward(params, cfg, tokens, mask).logits
    lp = token_logprobs(logits, tokens)
    m = mask.astype(bool)
    scored = m[:, 1:] & m[:, :-1]
    if loss_mask is not None:
        scored = scored & loss_mask[:, 1:].astype(bool)
    return jnp.where(scored, lp, 0.0)


# ----------------------------------------------------------------------------- tokenization

def encode_example(tok, text: str, prompt: Optional[str] = None) -> Tuple[List[int], int, str]:
    """(token ids, index of the first scored token, split mode 'joint' | 'separate'); see module doc."""
    if prompt is None:
        return list(tok(text).input_ids), 1, "joint"
    p = list(tok(prompt).input_ids)
    full = list(tok(prompt + text).input_ids)
    if full[:len(p)] == p:
        return full, max(1, len(p)), "joint"
    stripped = prompt.rstrip()
    p = list(tok(stripped).input_ids)
    c = list(tok(prompt[len(stripped):] + text, add_special_tokens=False).input_ids)
    return p + c, max(1, len(p)), "separate"


def bucket_length(n: int, bucket: int) -> int:
    """n rounded up to a multiple of `bucket` (few distinct shapes -> few compiles)."""
    return max(bucket, -(-n // bucket) * bucket)


def score_sequences(params, cfg: ModelConfig, seqs: Sequence[Sequence[int]], starts: Sequence[int], *,
                    batch_size: int = 8, bucket: int = 64, pad_id: int = 0,
                    progress: bool = True, mesh=None) -> List[np.ndarray]:
    """Per sequence, the log-probs [len - start] of tokens `seq[start:]` given their prefix.

    Sequences are sorted by length, batched (always `batch_size` rows: short batches are filled
    with one-token dummies) and left-padded to a multiple of `bucket`, so one jitted function
    compiles once per bucket length.

    mesh: a `jaxrl_sparse.parallel` Mesh (or None = one device). The rows of each batch are split
    over its data x fsdp devices (the batch is filled with dummies up to a multiple of them) and
    the params placed with `parallel.put_params` (replicated, or fsdp-sharded when fsdp > 1).
    """
    from tqdm.auto import tqdm
    fn = jax.jit(sequence_logprobs, static_argnums=1)
    rows = batch_size
    if mesh is not None:
        k = parallel.batch_size_multiple(mesh)
        rows = -(-batch_size // k) * k
        params = parallel.put_params(params, mesh)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out: List[Optional[np.ndarray]] = [None] * len(seqs)
    bar = tqdm(total=len(seqs), desc="scoring", unit="text", disable=not progress)
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        T = bucket_length(max(len(seqs[i]) for i in idx), bucket)
        tokens = np.full((rows, T), pad_id, np.int32)
        mask = np.zeros((rows, T), np.int32)
        mask[:, -1] = 1  # dummy rows: one real token, nothing scored
        for r, i in enumerate(idx):
            n = len(seqs[i])
            if n:
                tokens[r, T - n:] = seqs[i]
                mask[r, T - n:] = 1
        if mesh is None:
            lp = np.asarray(fn(params, cfg, jnp.asarray(tokens), jnp.asarray(mask)))
        else:
            tokens, mask = parallel.put_batch((tokens, mask), mesh)
            lp = parallel.to_host(fn(params, cfg, tokens, mask))
        for r, i in enumerate(idx):
            n, s = len(seqs[i]), starts[i]
            # token k of the sequence sits in slot T - n + k; its log-prob is lp[:, slot - 1]
            out[i] = lp[r, T - n + s - 1:T - 1] if n > s else np.zeros((0,), np.float32)
        bar.update(len(idx))
    bar.close()
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- JSONL files

@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """`python -m launch.score` settings."""
    model: str                   # registry name, HF folder, .gguf file or hub id
    texts_file: str              # JSONL: {"text": ...} per line, optionally with "prompt"
    out: str                     # JSONL written atomically: input fields + logprob, n_tokens, token_logprobs
    batch_size: int = 8          # rows per forward pass
    dtype: str = "float32"       # compute dtype (float32 | bfloat16); parameters are stored in it too
    bucket: int = 64             # sequence lengths are padded to a multiple of this (fewer recompiles)
    progress: bool = True        # tqdm progress bar
    mesh: str = ""               # device mesh 'data:N,fsdp:M' ('' = all devices on data); rows split over it


def read_jsonl_texts(path: str) -> List[Dict[str, Any]]:
    """Rows of a JSONL file; each must be an object with a string "text" (and optional "prompt")."""
    if not os.path.isfile(path):
        raise UserError(f"texts file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n} is not valid JSON ({e.msg}); one JSON object per line") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise UserError(f'{path}:{n} needs a string field "text" (e.g. {{"text": "..."}})')
            if "prompt" in row and not isinstance(row["prompt"], str):
                raise UserError(f'{path}:{n}: "prompt" must be a string')
            rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no texts")
    return rows


def write_jsonl_atomic(path: str, rows: Sequence[Dict[str, Any]]) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".jsonl", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def score_rows(lm, rows: Sequence[Dict[str, Any]], *, batch_size: int = 8, bucket: int = 64,
               progress: bool = True, where: str = "input", mesh=None) -> List[Dict[str, Any]]:
    """Scores rows {"text", optional "prompt"} with a LoadedModel; returns rows with results added.
    mesh: see `score_sequences` (None = one device)."""
    tok, cfg = lm.tokenizer, lm.config
    seqs, starts, modes = [], [], []
    for n, row in enumerate(rows, 1):
        ids, start, mode = encode_example(tok, row["text"], row.get("prompt"))
        if len(ids) > cfg.max_position_embeddings:
            raise UserError(f"{where} row {n} has {len(ids)} tokens, more than the model's "
                            f"{cfg.max_position_embeddings} positions; shorten it")
        seqs.append(ids)
        starts.append(start)
        modes.append(mode)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    lps = score_sequences(lm.params, cfg, seqs, starts, batch_size=batch_size, bucket=bucket,
                          pad_id=pad, progress=progress, mesh=mesh)
    out = []
    for row, lp, mode in zip(rows, lps, modes):
        r = dict(row, logprob=float(np.sum(lp, dtype=np.float64)), n_tokens=int(lp.shape[0]),
                 token_logprobs=[float(x) for x in lp])
        if mode != "joint":
            r["split"] = mode
        out.append(r)
    return out


def score_file(config: ScoreConfig) -> int:
    """Reads `config.texts_file`, scores every row on the mesh `config.mesh`, writes `config.out`
    (process 0 only); returns the row count."""
    from jaxrl_sparse.models.hub import load_model
    if config.batch_size < 1 or config.bucket < 1:
        raise UserError("--batch_size and --bucket must be >= 1")
    mesh = parallel.make_mesh(config.mesh)  # a bad --mesh fails before the model loads
    rows = read_jsonl_texts(config.texts_file)
    lm = load_model(config.model, param_dtype=config.dtype, dtype=config.dtype)
    scored = score_rows(lm, rows, batch_size=config.batch_size, bucket=config.bucket,
                        progress=config.progress and parallel.is_main_process(),
                        where=config.texts_file, mesh=mesh)
    if parallel.is_main_process():
        write_jsonl_atomic(config.out, scored)
    return len(scored)
