"""GRPO: rewards, group advantages, clipped loss with KL, dynamic sampling, rollout engines, trainer."""
