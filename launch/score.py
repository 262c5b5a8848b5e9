"""Log-likelihood of texts under a model.

    python -m launch.score --model=smollm2-135m-instruct --texts_file=in.jsonl --out=out.jsonl
        [--batch_size=8] [--dtype=float32] [--bucket=64] [--mesh=data:N,fsdp:M]
        [--coordinator_address=HOST:PORT --num_processes=N --process_id=I | --distributed=auto]

Each input line is `{"text": ...}`, optionally with `"prompt"`; each output line repeats the input
fields and adds `logprob` (sum of log p(token | previous tokens) over every token after the first,
or over the continuation tokens when a prompt is given), `n_tokens` and `token_logprobs`.
Tokenization rules: `jaxrl_sparse/score.py`. The rows of each batch are split over the mesh
(default: every device on 'data'); only process 0 writes --out and prints.
"""
from __future__ import annotations

from absl import flags, logging

from jaxrl_sparse.errors import UserError
from jaxrl_sparse.parallel import is_main_process
from jaxrl_sparse.score import ScoreConfig, score_file
from launch.common import config_from_flags, define_flags_from_config, run_main

define_flags_from_config(ScoreConfig, defaults={"model": "smollm2-135m-instruct", "texts_file": None,
                                                "out": None})


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; all options are --flags")
    logging.set_verbosity(logging.WARNING)  # absl's INFO would echo JAX's backend probing
    for name in ("texts_file", "out"):
        if not flags.FLAGS[name].value:
            raise UserError(f"--{name} is required (python -m launch.score --texts_file=in.jsonl --out=out.jsonl)")
    cfg = config_from_flags(ScoreConfig)
    n = score_file(cfg)
    if is_main_process():
        print(f"scored {n} texts -> {cfg.out}")


if __name__ == "__main__":
    run_main(main)
