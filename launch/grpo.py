"""GRPO with LoRA adapters on math word problems (replaces the seed's run_train.py).

    python -m launch.grpo --flagfile=configs/grpo_gemma2_math.flags      # the seed's experiment
    python -m launch.grpo --flagfile=configs/grpo_smollm2_arith.flags    # offline learning check
    python -m launch.grpo --flagfile=configs/grpo_tiny.flags             # smoke test, CPU
Re-running with the same --workdir resumes from its latest LoRA checkpoint.
"""
from absl import flags

from launch.common import config_from_flags, define_flags_from_config, run_main
from jaxrl_sparse.rl.grpo import GRPOConfig

define_flags_from_config(GRPOConfig)
flags.DEFINE_bool("progress", True, "show a progress bar")


def main(argv):
    del argv
    from jaxrl_sparse.rl.grpo import train
    s = train(config_from_flags(GRPOConfig), progress=flags.FLAGS.progress)
    rows = [r for r in s["metrics"] if r.get("reward/mean") is not None]
    print(f"workdir: {s['workdir']}")
    if rows:
        k = min(10, len(rows))
        r = [x["reward/mean"] for x in rows]
        print(f"steps: {s['steps_done']}/{s['total_steps']}  reward first {k}: {sum(r[:k]) / k:.4f}  "
              f"last {k}: {sum(r[-k:]) / k:.4f}")
    if s["eval"]:
        first, last = s["eval"][0], s["eval"][-1]
        print(f"eval accuracy: step {first['step']}: {first['eval/accuracy']:.2f}%  ->  "
              f"step {last['step']}: {last['eval/accuracy']:.2f}%")
    if s["export_dir"]:
        print(f"exported: {s['export_dir']}")


if __name__ == "__main__":
    run_main(main)
