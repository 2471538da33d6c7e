"""Choosing the core attention: TE / megatron's for plain layouts only, refused clearly where they would be wrong."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from megatron_longvideo.models.llm import check_layout_supported
from tests.dist import init_cpu_dist, run_ranks

HAS_TE = importlib.util.find_spec("transformer_engine") is not None


def test_packed_layouts_are_refused_by_attentions_that_cannot_express_them():
    for kind in ("te", "megatron"):
        check_layout_supported(kind, packed=False)
        with pytest.raises(ValueError, match=f"--core-attention {kind}"):
            check_layout_supported(kind, packed=True)
    check_layout_supported("engine", packed=True)


def _worker(rank, world_size):
    init_cpu_dist()
    from megatron_longvideo.models.llm import LLMConfig, build_llm, lm_forward
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    groups = initialize_parallel(ParallelConfig())
    out = {}
    model = build_llm(LLMConfig.tiny(vocab_size=64), groups, core_attention="megatron")
    ids = torch.randint(0, 64, (1, 8))
    lm_forward(model, input_ids=ids, position_ids=torch.arange(8)[None])  # plain rows: fine
    try:
        lm_forward(model, input_ids=ids, position_ids=torch.arange(8)[None], segment_ids=torch.zeros(1, 8, dtype=torch.long))
    except ValueError as e:
        out["packed"] = str(e)
    try:
        build_llm(LLMConfig.tiny(vocab_size=64), groups, attention_dropout=0.1)
    except ValueError as e:
        out["dropout"] = str(e)
    try:
        build_llm(LLMConfig.tiny(vocab_size=64), groups, attention_kernel="fastest")
    except ValueError as e:
        out["kernel"] = str(e)
    if not HAS_TE:
        try:
            build_llm(LLMConfig.tiny(vocab_size=64), groups, core_attention="te")
        except ImportError as e:
            out["te"] = str(e)
    destroy_parallel()
    return out


def test_build_and_forward_errors_name_the_flag():
    out = run_ranks(_worker, 1)[0]
    assert "--core-attention megatron" in out["packed"] and "packed" in out["packed"]
    assert "attention_dropout=0.1" in out["dropout"] and "core_attention='megatron'" in out["dropout"]
    assert "attention kernel must be one of" in out["kernel"]
    if not HAS_TE:
        assert "--core-attention te" in out["te"] and "TransformerEngine" in out["te"]


def test_grpo_script_refuses_te_with_packing_at_start_up(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
    try:
        import train_grpo
    finally:
        sys.path.pop(0)
    (tmp_path / "x.jsonl").write_text("")  # the inputs are checked to exist at parse time
    (tmp_path / "t.model").write_bytes(b"")
    need = ["--data-path", str(tmp_path / "x.jsonl"), "--video-root", str(tmp_path), "--tokenizer", str(tmp_path / "t.model")]
    args = train_grpo.parse_args(need + ["--core-attention", "te"])
    with pytest.raises(ValueError, match="--core-attention te"):
        train_grpo.build(args)
    args = train_grpo.parse_args(need + ["--attention-kernel", "torch_flash"])
    assert args.attention_kernel == "torch_flash"
