"""Sample completions from a model: `python -m launch.generate --prompt="Hello" [--chat]`.

    python -m launch.generate --model=smollm2-135m-instruct --prompt="Tell me a joke." --chat
    python -m launch.generate --prompts_file=in.jsonl --out=out.jsonl --greedy --max_new_tokens=64

Input lines are JSON objects with a "prompt" string; output lines are the same objects plus
"completion". Without --out, completions are printed.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Iterator, List, Optional

from absl import flags

from launch.common import run_main
from jaxrl_sparse import parallel
from jaxrl_sparse.errors import UserError

flags.DEFINE_string("model", "smollm2-135m-instruct", "Registry name, HF folder, .gguf file or hub id.")
flags.DEFINE_string("prompt", None, "One prompt (exclusive with --prompts_file).")
flags.DEFINE_string("prompts_file", None, "JSONL file of {\"prompt\": ...} objects.")
flags.DEFINE_string("out", None, "Write JSONL here (prompt objects + 'completion'); default: print.")
flags.DEFINE_bool("chat", False, "Apply the tokenizer's chat template (add_generation_prompt=True).")
flags.DEFINE_bool("greedy", False, "Argmax decoding (ignores temperature/top_k/top_p).")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature (> 0).")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1] (1 = off).")
flags.DEFINE_integer("max_new_tokens", 128, "Most tokens generated per prompt.")
flags.DEFINE_integer("min_new_tokens", 0, "EOS is forbidden before this many tokens.")
flags.DEFINE_integer("seed", 0, "PRNG seed (same seed, same completions).")
flags.DEFINE_integer("batch_size", 16, "Prompts per generate call.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    model: str = "smollm2-135m-instruct"  # model name or path (jaxrl_sparse.models.load_model)
    prompt: Optional[str] = None          # a single prompt
    prompts_file: Optional[str] = None    # JSONL with a "prompt" field per line
    out: Optional[str] = None             # output JSONL (None: print)
    chat: bool = False                    # wrap prompts in the chat template
    greedy: bool = False                  # argmax decoding
    temperature: float = 1.0              # softmax temperature
    top_k: int = 0                        # top-k filter (0 = off)
    top_p: float = 1.0                    # nucleus filter (1 = off)
    max_new_tokens: int = 128             # generation length cap
    min_new_tokens: int = 0               # EOS masked before this many tokens
    seed: int = 0                         # PRNG seed
    batch_size: int = 16                  # prompts per batch
    dtype: str = "float32"                # float32 | bfloat16
    mesh: str = ""                        # device mesh 'data:N,fsdp:M' ('' = all devices on data when they divide the batch)

    def validate(self) -> "GenerateConfig":
        if (self.prompt is None) == (self.prompts_file is None):
            raise UserError("give exactly one of --prompt or --prompts_file")
        if self.prompts_file is not None and not os.path.isfile(self.prompts_file):
            raise UserError(f"--prompts_file {self.prompts_file} does not exist")
        if not self.greedy and not self.temperature > 0:
            raise UserError(f"--temperature={self.temperature} must be > 0 (or use --greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise UserError(f"--top_k={self.top_k} must be >= 0 (0 = off)")
        if self.max_new_tokens < 1:
            raise UserError(f"--max_new_tokens={self.max_new_tokens} must be >= 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise UserError(f"--min_new_tokens={self.min_new_tokens} must be in [0, --max_new_tokens]")
        if self.batch_size < 1:
            raise UserError(f"--batch_size={self.batch_size} must be >= 1")
        return self


def read_prompts(path: str) -> List[Dict[str, Any]]:
    """JSONL objects with a string 'prompt' (blank lines skipped); UserError names the bad line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i} is not valid JSON ({e.msg}); one JSON object per line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise UserError(f'{path}:{i} needs a string "prompt" field, e.g. {{"prompt": "Hello"}}')
            rows.append(obj)
    if not rows:
        raise UserError(f"{path} holds no prompts")
    return rows


def _batches(rows: List[Any], n: int) -> Iterator[List[Any]]:
    for i in range(0, len(rows), n):
        yield rows[i:i + n]


def run(config: GenerateConfig) -> List[Dict[str, Any]]:
    """Generates a completion for every prompt; writes/prints them; returns the output rows."""
    import jax
    import numpy as np
    from tqdm import tqdm

    from jaxrl_sparse.generate import generate
    from jaxrl_sparse.models import load_model

    config.validate()
    rows = read_prompts(config.prompts_file) if config.prompts_file else [{"prompt": config.prompt}]
    lm = load_model(config.model, param_dtype=config.dtype, dtype=config.dtype)
    tok, cfg = lm.tokenizer, lm.config
    if config.chat and not getattr(tok, "chat_template", None):
        raise UserError(f"the tokenizer of {config.model} has no chat template; drop --chat")
    eos = sorted({i for i in (cfg.eos_token_id, tok.eos_token_id) if i is not None})
    key = jax.random.key(config.seed)
    mesh = parallel.make_mesh(config.mesh) if config.mesh else None
    if mesh is not None:
        parallel.check_batch(config.batch_size, mesh, "--batch_size")
    out_rows = []
    bar = tqdm(total=len(rows), desc="generate", unit="prompt", disable=config.prompts_file is None)
    for bi, batch in enumerate(_batches(rows, config.batch_size)):
        texts = [r["prompt"] for r in batch]
        if config.chat:
            texts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                             add_generation_prompt=True) for t in texts]
        # the chat template already holds the BOS text; do not add special tokens twice
        enc = tok(texts, padding=True, return_tensors="np", add_special_tokens=not config.chat)
        ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
        if not mask.any(axis=1).all():
            raise UserError("an empty prompt tokenizes to no tokens; give every prompt some text")
        n = len(batch)
        if n < config.batch_size and len(rows) > config.batch_size:  # keep one compiled batch shape
            ids = np.concatenate([ids, np.repeat(ids[-1:], config.batch_size - n, 0)])
            mask = np.concatenate([mask, np.repeat(mask[-1:], config.batch_size - n, 0)])
        res = generate(lm.params, cfg, ids, mask, jax.random.fold_in(key, bi),
                       max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                       top_k=config.top_k, top_p=config.top_p, greedy=config.greedy,
                       min_new_tokens=config.min_new_tokens, eos_token_id=eos,
                       pad_token_id=tok.pad_token_id, mesh=mesh)
        toks, m = parallel.to_host((res.tokens, res.mask))
        for r, t, mm in zip(batch, toks, m):
            t = [int(x) for x, keep in zip(t, mm) if keep and x not in eos]
            out_rows.append(dict(r, completion=tok.decode(t, skip_special_tokens=True)))
        bar.update(n)
    bar.close()
    if not parallel.is_main_process():
        return out_rows
    if config.out:
        os.makedirs(os.path.dirname(os.path.abspath(config.out)), exist_ok=True)
        with open(config.out, "w", encoding="utf-8") as f:
            for r in out_rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"wrote {len(out_rows)} completions to {config.out}")
    else:
        for r in out_rows:
            if len(out_rows) > 1:
                print(f"### {r['prompt']}")
            print(r["completion"])
    return out_rows


def config_from_flags() -> GenerateConfig:
    names = [f.name for f in dataclasses.fields(GenerateConfig)]
    return GenerateConfig(**{n: FLAGS[n].value for n in names})


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; flags look like --name=value")
    run(config_from_flags())


if __name__ == "__main__":
    run_main(main)
