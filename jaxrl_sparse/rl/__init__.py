"""RL algorithms: pure loss/advantage/update math (`ppo_math`, `grpo_math`) and the training loops."""
