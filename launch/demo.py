"""The README's main job: a short offline PPO run, then the sparse-subnetwork analyzer on it.

    python -m launch.demo [--workdir=runs/demo] [--num_updates=12]
SmolLM2-135M-Instruct (packaged GGUF) + VADER reward + built-in review openings, CPU-sized.
"""
import os

from absl import flags

from launch.common import run_main

flags.DEFINE_string("workdir", "runs/demo", "run folder (re-running resumes it)")
flags.DEFINE_integer("num_updates", 12, "PPO updates")
flags.DEFINE_integer("batch_size", 8, "PPO batch size")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from jaxrl_sparse.analysis.report import AnalyzeConfig, analyze, format_summary
    from jaxrl_sparse.rl.ppo import PPOConfig, train
    cfg = PPOConfig(model="smollm2-135m-instruct", reward_model="vader", data="generated",
                    n_prompts=256, query_len=12, output_min_length=12, output_max_length=20,
                    top_k=0, top_p=1.0,  # full-distribution sampling, as the offline preset (BUILD_NOTES)
                    batch_size=FLAGS.batch_size, mini_batch_size=4, ppo_epochs=2,
                    learning_rate=1e-5, num_updates=FLAGS.num_updates, save_ckpt_every=4,
                    rank_log_every=4, tau=1e-6, workdir=FLAGS.workdir)
    summary = train(cfg)
    rows = summary["metrics"]
    print(f"PPO done: {len(rows)} updates, reward first {rows[0]['env/reward_mean']:.3f} "
          f"last {rows[-1]['env/reward_mean']:.3f}; curves: {summary['plots']}")
    out = os.path.join(FLAGS.workdir, "plots")
    result = analyze(AnalyzeConfig(ckpt_dir=summary["ckpt_dir"], out=out))
    print(format_summary(result))
    print(f"plots and tables in {out}")


if __name__ == "__main__":
    run_main(main)
