"""Greedy math accuracy of a model, optionally with GRPO LoRA adapters (the seed's eval_math.py).

    python -m launch.eval_math --model=gemma-2-2b-it --data=data/test_math.jsonl
    python -m launch.eval_math --model=smollm2-135m-instruct --lora_ckpt=runs/grpo/lora/lora_epoch1_step50 \
        --data=generated --n=200 --compare_base
Prints `Total: N Correct: C Accuracy: X%` per model and writes per-question JSONL
(question, gold, output, extracted, correct).
"""
import os

from absl import flags

from launch.common import run_main
from jaxrl_sparse.parallel import is_main_process

flags.DEFINE_string("model", "", "registry name, HF id, HF folder or .gguf (default: the checkpoint's model)")
flags.DEFINE_string("lora_ckpt", "", "GRPO workdir, its checkpoints/ dir, a step folder or a lora/ alias")
flags.DEFINE_bool("compare_base", False, "with --lora_ckpt: also evaluate the base model")
flags.DEFINE_string("data", "generated", "generated | gsm8k | path to a {question, answer} JSONL")
flags.DEFINE_integer("n", 200, "number of problems (0 = the whole file)")
flags.DEFINE_integer("data_seed", 0, "seed of generated problems (the GRPO run's --data_seed)")
flags.DEFINE_integer("batch_size", 32, "prompts per generate call")
flags.DEFINE_integer("max_new_tokens", 256, "completion length cap")
flags.DEFINE_integer("max_prompt_len", 512, "prompts keep their last N tokens")
flags.DEFINE_string("prompt_template", "auto", "auto | chat | plain")
flags.DEFINE_string("param_dtype", "float32", "float32 | bfloat16")
flags.DEFINE_string("compute_dtype", "float32", "float32 | bfloat16")
flags.DEFINE_string("out", "", "per-question JSONL path ('' = eval_<tag>.jsonl in the run's workdir, or .)")
flags.DEFINE_bool("progress", True, "show a progress bar")


def main(argv):
    del argv
    from absl import logging
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    from jaxrl_sparse.errors import UserError
    from jaxrl_sparse import eval_math as em
    from jaxrl_sparse.models import load_model
    F = flags.FLAGS
    adapters, meta = None, {}
    if F.lora_ckpt:
        from jaxrl_sparse.rl.grpo import load_adapters
        adapters, meta = load_adapters(F.lora_ckpt)
    elif F.compare_base:
        raise UserError("--compare_base needs --lora_ckpt=PATH")
    model = F.model or meta.get("model")
    if not model:
        raise UserError("--model is required (or a --lora_ckpt whose metadata names the model)")
    if meta and F.model and os.path.abspath(F.model) != os.path.abspath(meta["model"]) and \
            F.model != meta["model"]:
        print(f"note: adapters were trained on {meta['model']!r}, evaluating them on {F.model!r}")
    lm = load_model(model, param_dtype=F.param_dtype, dtype=F.compute_dtype)
    problems = em.load_problems(F.data, n=F.n or None, seed=F.data_seed, split="eval")
    mask = None
    if adapters is not None and meta.get("update_mask"):
        from jaxrl_sparse.rl.grpo import _target_mask
        mask = _target_mask(meta["update_mask"], lm.params, adapters)
    runs = []
    if adapters is None or F.compare_base:
        runs.append(("base", None))
    if adapters is not None:
        runs.append((meta.get("name", "lora"), adapters))
    out_dir = "."
    if F.lora_ckpt:  # the run's workdir (the folder holding checkpoints/)
        from jaxrl_sparse.rl.grpo import resolve_lora_ckpt
        out_dir = os.path.dirname(resolve_lora_ckpt(F.lora_ckpt)[0])
    results = []
    for tag, ad in runs:
        kw = {}
        if ad is not None:
            kw = dict(adapters=ad, alpha=meta["lora"]["alpha"], rank=meta["lora"]["rank"], mask=mask)
        res = em.evaluate(lm.params, lm.config, lm.tokenizer, problems, batch_size=F.batch_size,
                          max_new_tokens=F.max_new_tokens, max_prompt_len=F.max_prompt_len,
                          template=F.prompt_template, progress=F.progress, desc=tag, mesh=F.mesh, **kw)
        path = F.out if (F.out and len(runs) == 1) else (
            os.path.splitext(F.out)[0] + f"_{tag}.jsonl" if F.out else
            os.path.join(out_dir, f"eval_{tag}.jsonl"))
        if is_main_process():
            em.write_rows(path, res["rows"])
        results.append((tag, res, path))
    for tag, res, path in results:
        print(f"[{tag}] {em.summary_line(res)}   ({path})")
    if len(results) == 2:
        d = results[1][1]["accuracy"] - results[0][1]["accuracy"]
        print(f"LoRA - base: {d:+.2f} points")


if __name__ == "__main__":
    run_main(main)
