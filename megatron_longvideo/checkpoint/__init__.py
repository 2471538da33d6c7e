"""Checkpoints: full-shape state gather/load across TP/PP, dist-checkpoint save/resume, HF weight map."""
