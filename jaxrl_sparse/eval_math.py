"""Math-word-problem prompts, data and greedy accuracy evaluation (base or base + LoRA).

    res = evaluate(params, cfg, tokenizer, problems, adapters=ad, alpha=16, rank=8)
    print(summary_line(res))            # "Total: 200 Correct: 126 Accuracy: 63.00%"  (the seed's line)

Prompt: the model's chat template (when the tokenizer has one) around one user turn
`"<question>\\n<INSTRUCTION>"`, with the generation prompt; otherwise a plain
`"Question: ...\\n<INSTRUCTION>\\n"` text. Correct = the extracted answer (`rewards.math.extract_answer`)
equals the gold number (`#### n` solutions, plain numbers, `$1,234`, fractions).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_sparse import parallel
from jaxrl_sparse.errors import UserError

INSTRUCTION = ("Solve the problem step by step. End with a final line of the form "
               "'Answer: <number>'.")
EOT_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>")


# ----------------------------------------------------------------------------- data
def load_problems(data: str, *, n: Optional[int] = None, n_train: int = 0, seed: int = 0,
                  split: str = "eval") -> List[Dict[str, str]]:
    """`[{'question', 'answer'}]` for `split` in {'train', 'eval'}.

    data: 'generated' (offline word problems: the eval set is the first `n` problems of
      `generate_problems(seed)`, the train set the next `n_train`, so they never overlap and the
      eval set does not depend on `n_train`), 'gsm8k' (hub: train / test split), or a JSONL path.
    """
    from jaxrl_sparse.data.math_problems import generate_problems, parse_generated_source
    difficulty = parse_generated_source(data)
    if difficulty is not None:
        if split == "eval":
            if not n or n > _EVAL_POOL:
                raise UserError(f"generated eval sets hold 1..{_EVAL_POOL} problems, asked for {n}")
            return generate_problems(n, seed, difficulty)
        return generate_problems(_EVAL_POOL + n_train, seed, difficulty)[_EVAL_POOL:]
    if data == "gsm8k":
        from jaxrl_sparse.data.sources import load_gsm8k
        rows = load_gsm8k("train" if split == "train" else "test",
                          limit=(n_train if split == "train" else n) or None)
        return [{"question": r["question"], "answer": r["answer"]} for r in rows]
    from jaxrl_sparse.data.sources import load_jsonl
    if not data.endswith((".jsonl", ".json")) and not os.path.exists(data):
        raise UserError(f"--data={data!r}: use 'generated', 'gsm8k' or a path to a .jsonl file")
    rows = load_jsonl(data, ("question", "answer"))
    limit = n if split == "eval" else n_train
    rows = rows[:limit] if limit else rows
    return [{"question": str(r["question"]), "answer": str(r["answer"])} for r in rows]


# Generated train problems start after a fixed pool reserved for evaluation, so any eval size up
# to this many is disjoint from any training set.
_EVAL_POOL = 1000


# ----------------------------------------------------------------------------- prompts
def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_text(tokenizer, question: str, template: str = "auto") -> str:
    """The prompt string for one question (`template`: auto | chat | plain)."""
    user = f"{question.strip()}\n{INSTRUCTION}"
    use_chat = template == "chat" or (template == "auto" and has_chat_template(tokenizer))
    if use_chat:
        if not has_chat_template(tokenizer):
            raise UserError("--prompt_template=chat but the tokenizer has no chat template; "
                            "use --prompt_template=plain")
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    if template not in ("auto", "plain"):
        raise UserError(f"--prompt_template={template!r}; choose auto, chat or plain")
    return f"Question: {question.strip()}\n{INSTRUCTION}\n"


def encode_prompts(tokenizer, texts: Sequence[str], max_len: int, pad_id: int
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """Left-padded ids and mask [n, Lp] (Lp = longest prompt, capped at `max_len`; longer prompts
    keep their last `max_len` tokens). The template already holds BOS, so none is added."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][-max_len:] for t in texts]
    if any(len(x) == 0 for x in ids):
        raise UserError("a prompt encodes to no tokens; check the data file")
    if not has_chat_template(tokenizer):
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is not None:
            ids = [([bos] + x)[-max_len:] if x[0] != bos else x for x in ids]
    from jaxrl_sparse.data.batching import pad_left
    return pad_left(ids, pad_id)


def stop_ids(tokenizer, cfg) -> Tuple[int, ...]:
    """EOS ids: the config's, the tokenizer's, and any end-of-turn token the vocabulary has."""
    out = []
    for e in (cfg.eos_token_id, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(e, (list, tuple)):
            out.extend(int(x) for x in e)
        elif e is not None:
            out.append(int(e))
    unk = getattr(tokenizer, "unk_token_id", None)
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for t in EOT_TOKENS:
        i = vocab.get(t)
        if i is not None and i != unk and i < cfg.vocab_size:
            out.append(int(i))
    return tuple(dict.fromkeys(out))


def pad_id(tokenizer, cfg) -> int:
    for p in (getattr(tokenizer, "pad_token_id", None), cfg.pad_token_id):
        if p is not None:
            return int(p)
    s = stop_ids(tokenizer, cfg)
    return s[0] if s else 0


def decode(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> List[str]:
    """Completion texts (masked tokens only, special tokens dropped)."""
    return [tokenizer.decode(t[m.astype(bool)].tolist(), skip_special_tokens=True)
            for t, m in zip(tokens, mask)]


# ----------------------------------------------------------------------------- evaluation
def evaluate(params, cfg, tokenizer, problems: Sequence[Dict[str, str]], *, adapters=None,
             alpha: float = 16.0, rank: int = 8, mask=None, batch_size: int = 32,
             max_new_tokens: int = 256, max_prompt_len: int = 512, template: str = "auto",
             progress: bool = False, desc: str = "eval", mesh=None) -> Dict[str, Any]:
    """Greedy accuracy on `problems`. With `adapters`, decodes base + LoRA (merged in the jit).

    Returns {'total', 'correct', 'accuracy' (percent), 'rows': [{question, gold, output,
    extracted, correct}]}. mesh: the sampler's mesh (a `jaxrl_sparse.parallel` spec or Mesh;
    None = all devices when they divide the batch).
    """
    from tqdm.auto import tqdm
    from jaxrl_sparse.generate import generate
    from jaxrl_sparse.rewards.math import correctness_reward, extract_answer
    from jaxrl_sparse.transforms import lora
    if not problems:
        raise UserError("no evaluation problems (check --data / --n)")
    pid, eos = pad_id(tokenizer, cfg), stop_ids(tokenizer, cfg)
    p_in, fn = params, None
    if isinstance(mesh, str):
        mesh = parallel.make_mesh(mesh) if mesh else None
    if adapters is not None:
        p_in = {"base": params, "lora": adapters}
        if mask is not None:
            p_in["mask"] = mask
        fn = lora.merge_fn(float(alpha), int(rank))
    rows = []
    key = jax.random.key(0)  # unused by greedy decoding
    for s in tqdm(range(0, len(problems), batch_size), disable=not progress, desc=desc):
        chunk = list(problems[s:s + batch_size])
        n_real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - n_real) if len(problems) > batch_size else []
        texts = [prompt_text(tokenizer, p["question"], template) for p in chunk]
        toks, pmask = encode_prompts(tokenizer, texts, max_prompt_len, pid)
        out = generate(p_in, cfg, jnp.asarray(toks), jnp.asarray(pmask), key,
                       max_new_tokens=max_new_tokens, greedy=True, eos_token_id=eos,
                       pad_token_id=pid, params_fn=fn, mesh=mesh)
        outs = decode(tokenizer, *parallel.to_host((out.tokens, out.mask)))
        for p, o in zip(chunk[:n_real], outs[:n_real]):
            rows.append({"question": p["question"], "gold": p["answer"], "output": o,
                         "extracted": extract_answer(o),
                         "correct": bool(correctness_reward(o, p["answer"]))})
    correct = sum(r["correct"] for r in rows)
    return {"total": len(rows), "correct": correct, "accuracy": 100.0 * correct / len(rows),
            "rows": rows}


def summary_line(res: Dict[str, Any]) -> str:
    return f"Total: {res['total']} Correct: {res['correct']} Accuracy: {res['accuracy']:.2f}%"


def write_rows(path: str, rows: Sequence[Dict[str, Any]]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
