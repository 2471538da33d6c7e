"""A 16-bit model keeps fp32 rotary frequencies: megatron's Float16Module casts every floating buffer, and
bf16 frequencies at bf16 positions collapse neighbouring positions of a long sequence (1000-1003 rotate
alike), which would blur every long video."""

from __future__ import annotations

import torch

from megatron_longvideo.models.rotary import PositionRotaryEmbedding
from megatron_longvideo.parallel.context import SequenceContext


def test_rotary_frequencies_stay_fp32_in_a_bf16_model():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_longvideo.platform import enable_cpu_mode

    enable_cpu_mode()
    context = SequenceContext()
    rope = PositionRotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_base=10000, sequence_context=context)
    reference = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_base=10000).inv_freq.float()
    wrapped = torch.nn.Sequential(rope).bfloat16()  # what Float16Module does to the model
    assert rope.inv_freq.dtype == torch.float32 and torch.equal(rope.inv_freq, reference)
    assert "inv_freq" not in wrapped.state_dict().keys() and "0.inv_freq" not in wrapped.state_dict()
    positions = torch.arange(1000, 1010)[None]  # [1, 10]
    with context.use(position_ids=positions):
        freqs = rope(10)  # [10, 1, 1, 16]
    expected = positions[0].double()[:, None] * reference.double()
    assert torch.allclose(freqs[:, 0, 0, :8].double(), expected, rtol=1e-6)
    assert len({round(x, 3) for x in freqs[:, 0, 0, 0].tolist()}) == 10, "neighbouring positions must rotate apart"
