"""Evolution strategies (weight / low-rank weight / node perturbation) on math word problems.

    python -m launch.es --flagfile=configs/es_qwen_gsm8k_np.flags     # the seed's NP experiment
    python -m launch.es --np_include=mlp --last_k=1                    # --np_include alone means NP
    python -m launch.es --flagfile=configs/es_tiny.flags               # seconds on a CPU
Outputs go to --visualization_dir; re-running with the same folder resumes from its checkpoints.
"""
from absl import flags

from launch.common import config_from_flags, define_flags_from_config, run_main
from jaxrl_sparse.rl.es import ESConfig

define_flags_from_config(ESConfig)
flags.DEFINE_bool("progress", True, "show a progress bar per iteration")


def main(argv):
    del argv
    from jaxrl_sparse.rl.es import train
    s = train(config_from_flags(ESConfig), progress=flags.FLAGS.progress)
    h = s["history"]
    print(f"method: {s['method']}  sigma: {s['sigma']}  out: {s['out_dir']}")
    if h:
        k = min(10, len(h))
        first = sum(r["reward_mean"] for r in h[:k]) / k
        last = sum(r["reward_mean"] for r in h[-k:]) / k
        print(f"iterations: {s['iterations_done']}  train reward first {k}: {first:.4f}  last {k}: {last:.4f}")
    if s["export_dir"]:
        print(f"exported: {s['export_dir']}")


if __name__ == "__main__":
    run_main(main)
