"""``--transformer-impl``: TransformerEngine layers where TE exists, a clear message where it does not,
and full states in the local spec's names either way (so the HF map, engines and converters see one
naming). TE cannot be installed on the CPU machines: building its spec is exercised on a GPU machine."""

from __future__ import annotations

import importlib.util

import pytest

from megatron_longvideo.checkpoint.full_state import canonical_name

HAS_TE = importlib.util.find_spec("transformer_engine") is not None


def test_te_fused_norm_names_map_to_the_local_names():
    assert canonical_name("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight") == \
        "decoder.layers.3.input_layernorm.weight"
    assert canonical_name("llm.decoder.layers.0.mlp.linear_fc1.layer_norm_weight") == \
        "llm.decoder.layers.0.pre_mlp_layernorm.weight"
    for unchanged in ("decoder.layers.0.self_attention.linear_qkv.weight", "decoder.final_layernorm.weight",
                      "vision.vit.decoder.layers.0.input_layernorm.weight", "embedding.word_embeddings.weight"):
        assert canonical_name(unchanged) == unchanged


@pytest.mark.skipif(HAS_TE, reason="TransformerEngine is installed: the TE spec builds instead")
def test_asking_for_te_without_it_names_the_flag_and_the_extra():
    from megatron_longvideo.models.llm import qwen2_layer_spec
    from megatron_longvideo.parallel.context import SequenceContext

    with pytest.raises(ImportError, match=r"--transformer-impl transformer_engine.*megatron_longvideo\[gpu\]"):
        qwen2_layer_spec(SequenceContext(), transformer_impl="transformer_engine")
    with pytest.raises(ValueError, match="transformer_impl must be one of"):
        qwen2_layer_spec(SequenceContext(), transformer_impl="apex")


def test_megatron_own_recompute_is_refused():
    from tests.dist import run_ranks

    assert "recompute_activations=True" in run_ranks(_recompute_worker, 1)[0]


def _recompute_worker(rank, world_size):
    from tests.dist import init_cpu_dist

    init_cpu_dist()
    from megatron_longvideo.models.llm import LLMConfig, build_llm
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    groups = initialize_parallel(ParallelConfig())
    try:
        build_llm(LLMConfig.tiny(), groups, recompute_granularity="selective")
    except ValueError as e:
        return str(e)
    finally:
        destroy_parallel()
    return "built"
