"""Convert checkpoints between Megatron (dist checkpoint or full state) and Hugging Face (Qwen2 /
LLaVA-OneVision / Qwen2.5-VL / Qwen2-Audio).

    python tools/convert_checkpoint.py to-hf --full-state policy.pt --out hf_model [--max-shard-size 2GB]
        [--dtype bfloat16] [--tokenizer tokenizer_dir]
    python tools/convert_checkpoint.py from-hf --hf hf_model --out ckpt/init   # a dist checkpoint to --load

See megatron_longvideo/checkpoint/convert_cli.py (the same command, importable) for details.
"""

import sys
import warnings

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")

from megatron_longvideo.checkpoint.convert_cli import main

if __name__ == "__main__":
    sys.exit(main())
