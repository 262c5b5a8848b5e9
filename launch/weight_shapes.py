"""Parameter tree of a model: names, shapes, dtypes, counts per module and the total.

    python -m launch.weight_shapes --model=gpt2-medium [--hf_names] [--param_dtype=bfloat16]

Shapes come from the model's own config (config.json or GGUF metadata) through `jax.eval_shape`,
so nothing is allocated; when the weights cannot be had (offline), a registry name falls back to
its preset shape and the output says "shapes only (no weights)".
"""
from __future__ import annotations

from absl import flags, logging

from jaxrl_sparse.errors import UserError
from launch.common import run_main

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m-instruct", "Registry name, HF folder, .gguf file or hub id.")
flags.DEFINE_bool("hf_names", False, "Rows named as HF tensors (per-layer shapes, [out, in] Linear weights).")
flags.DEFINE_string("param_dtype", "float32", "Storage dtype to show: float32 | bfloat16.")


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; all options are --flags")
    logging.set_verbosity(logging.WARNING)  # absl's INFO would echo JAX's backend probing
    from jaxrl_sparse.models.hub import model_shape
    from jaxrl_sparse.models.shapes import format_table, param_shapes
    cfg, have_weights = model_shape(FLAGS.model)
    cfg = cfg.replace(param_dtype=FLAGS.param_dtype).validate()
    what = "config of the weights" if have_weights else "shapes only (no weights): registry preset"
    title = (f"{FLAGS.model}: {cfg.family}, L={cfg.num_layers} D={cfg.hidden_size} H={cfg.num_heads} "
             f"K={cfg.num_kv_heads} hd={cfg.head_dim} F={cfg.intermediate_size} V={cfg.vocab_size} "
             f"tied={cfg.tie_embeddings} [{what}]")
    print(format_table(cfg, param_shapes(cfg), hf_names=FLAGS.hf_names, title=title))


if __name__ == "__main__":
    run_main(main)
