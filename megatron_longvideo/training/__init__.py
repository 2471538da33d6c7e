"""Training plumbing shared by the pretrain, SFT and GRPO loops (megatron DDP, optimizer, schedules)."""
