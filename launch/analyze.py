"""Sparse-subnetwork and rank analysis of a run's Orbax checkpoints (or of any two models).

    python -m launch.analyze --ckpt_dir=runs/ppo/ckpt [--taus=1e-7,1e-6,1e-5] [--steps=0,20,40]
        [--include=REGEX] [--out=DIR] [--compare_dir=OTHER_RUN] [--mask_out=mask.npz --mask_tau=1e-6]
        [--rank_method=gram64] [--mesh=data:N,fsdp:M]
        [--coordinator_address=HOST:PORT --num_processes=N --process_id=I | --distributed=auto]
    python -m launch.analyze --base=A --final=B    # checkpoint dirs, step dirs, HF folders / ids

Writes coverage_combined.png, density_combined.png, layer_ranks.png, density_heatmap.png,
summary.json and layer_ranks.csv into --out (default: <parent of ckpt_dir>/plots).
--mesh (default: every device on 'data') splits the stacked layers of each matrix over the devices
(`jaxrl_sparse/analysis/report.py`); only process 0 writes files and prints.
"""
from __future__ import annotations

from absl import flags, logging

from jaxrl_sparse.errors import UserError
from launch.common import run_main

FLAGS = flags.FLAGS
flags.DEFINE_string("ckpt_dir", None, "A run's Orbax checkpoint dir (step-numbered subfolders).")
flags.DEFINE_list("taus", ["1e-7", "1e-6", "1e-5"], "Thresholds on |W_t - W_0| (one curve each).")
flags.DEFINE_list("steps", None, "Steps to analyze (default: all); absent ones become gaps.")
flags.DEFINE_string("include", None, "Regex over a/b/c param paths to track "
                    "(default: layers/(attn|mlp)/.*/kernel|lm_head/kernel).")
flags.DEFINE_string("out", None, "Output dir (default: <parent of ckpt_dir>/plots, or ./plots).")
flags.DEFINE_string("compare_dir", None, "Another run's checkpoint dir: overlap of final subnetworks.")
flags.DEFINE_string("mask_out", None, "Write the final update mask (.npz) for --update_mask.")
flags.DEFINE_float("mask_tau", None, "Tau of the update mask (default: the smallest --taus).")
flags.DEFINE_bool("mask_untracked", False, "Untracked params in the mask: trainable (True) or frozen.")
flags.DEFINE_string("base", None, "W_0: checkpoint dir/step dir/HF model (pair mode with --final).")
flags.DEFINE_string("final", None, "Pair mode: the fine-tuned model (checkpoint dir/step dir/HF).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_string("rank_method", None, "How singular values of ΔW are computed: svd, gram64, "
                    "gram64t, gram32, qr, jacobi, gesvd (default: ranks.DEFAULT_RANK_METHOD; "
                    "error bounds in jaxrl_sparse/analysis/ranks.py).")


def _floats(name, values):
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        raise UserError(f"--{name}={','.join(values)} must be comma-separated numbers, e.g. 1e-6,1e-5")


def _ints(name, values):
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise UserError(f"--{name}={','.join(values)} must be comma-separated integers, e.g. 0,20,40")


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; all options are --flags")
    logging.set_verbosity(logging.ERROR)  # Orbax logs every manager it opens at INFO/WARNING
    from jaxrl_sparse import parallel  # after flag parsing: JAX import is slow
    from jaxrl_sparse.analysis import report

    cfg = report.AnalyzeConfig(
        ckpt_dir=FLAGS.ckpt_dir, taus=_floats("taus", FLAGS.taus),
        steps=_ints("steps", FLAGS.steps) if FLAGS.steps else None, include=FLAGS.include,
        out=FLAGS.out, compare_dir=FLAGS.compare_dir, mask_out=FLAGS.mask_out,
        mask_tau=FLAGS.mask_tau, mask_untracked=FLAGS.mask_untracked, base=FLAGS.base,
        final=FLAGS.final, progress=FLAGS.progress, rank_method=FLAGS.rank_method, mesh=FLAGS.mesh)
    summary = report.analyze(cfg)
    if parallel.is_main_process():
        print(report.format_summary(summary))


if __name__ == "__main__":
    run_main(main)
