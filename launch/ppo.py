"""PPO with a value head and adaptive KL on a sentiment reward, with sparse-update tracking.

    python -m launch.ppo --flagfile=configs/ppo_smollm2_vader.flags
    python -m launch.ppo --flagfile=configs/ppo_gpt2_imdb.flags     # the seed's experiment
Re-running with the same --workdir resumes from its latest checkpoint.
"""
from absl import flags

from launch.common import config_from_flags, define_flags_from_config, run_main
from jaxrl_sparse.rl.ppo import PPOConfig

define_flags_from_config(PPOConfig)
flags.DEFINE_bool("progress", True, "show a progress bar")


def main(argv):
    del argv
    from jaxrl_sparse.rl.ppo import train
    summary = train(config_from_flags(PPOConfig), progress=flags.FLAGS.progress)
    rows = summary["metrics"]
    if rows:
        r = [x["env/reward_mean"] for x in rows]
        k = min(20, len(r))
        print(f"workdir: {summary['workdir']}")
        print(f"steps: {summary['steps_done']}  reward first {k}: {sum(r[:k]) / k:.4f}  "
              f"last {k}: {sum(r[-k:]) / k:.4f}  final KL: {rows[-1].get('objective/kl')}")
    if summary["export_dir"]:
        print(f"exported: {summary['export_dir']}")


if __name__ == "__main__":
    run_main(main)
