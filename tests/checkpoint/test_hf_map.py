"""The weight map, the HF configs and the converter's errors, without processes (fast).

The layer-by-layer logit agreement with transformers across TP/PP layouts is in test_hf_export.py.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_longvideo.checkpoint import hf_config as hc
from megatron_longvideo.models.llava_onevision import hf as llava_hf
from megatron_longvideo.checkpoint.hf_convert import load_hf, save_full_state_file, save_hf
from megatron_longvideo.checkpoint.hf_io import INDEX_FILE, read_checkpoint
from megatron_longvideo.checkpoint.hf_map import CheckpointMismatchError, WeightMap, merge_qkv, split_qkv
from megatron_longvideo.models.llm import LLMConfig
from megatron_longvideo.models.llava_onevision.vision import VisionConfig
from megatron_longvideo.models.llava_onevision.model import VLMConfig

VLM = VLMConfig(llm=LLMConfig.tiny(vocab_size=96), vision=VisionConfig(image_size=24, patch_size=8), video_token_id=5)
LLM = LLMConfig.tiny(vocab_size=96, num_layers=1)


def _hf_folder(cfg, folder, *, perturb_post_layernorm=False):
    from transformers import LlavaOnevisionForConditionalGeneration, Qwen2ForCausalLM

    torch.manual_seed(3)
    model = (LlavaOnevisionForConditionalGeneration if isinstance(cfg, VLMConfig) else Qwen2ForCausalLM)(hc.hf_config(cfg))
    if perturb_post_layernorm:
        with torch.no_grad():
            model.model.vision_tower.post_layernorm.weight.add_(0.5)
    model.save_pretrained(folder)
    return folder


def test_qkv_layout_is_per_group_q_heads_then_k_then_v():
    rows = torch.arange(8.0)[:, None]  # nh=4, ng=2, head_dim=1: [q0 q1 k0 v0 | q2 q3 k1 v1]
    q, k, v = split_qkv(rows, num_heads=4, num_groups=2)
    assert q.flatten().tolist() == [0, 1, 4, 5] and k.flatten().tolist() == [2, 6] and v.flatten().tolist() == [3, 7]
    full = torch.randn(4 * 3 + 2 * 2 * 3, 5)  # head_dim 3
    assert torch.equal(merge_qkv(*split_qkv(full, 4, 2), 4, 2), full)


def test_configs_round_trip_and_match_llava_onevision_defaults():
    assert hc.llm_config_from_hf(hc.qwen2_config(LLM)) == LLM
    tied = LLMConfig.tiny(tie_word_embeddings=True, rotary_base=1e6)
    assert hc.config_from_hf(hc.qwen2_config(tied).to_dict()) == tied
    back = llava_hf.vlm_config_from_hf(llava_hf.llava_onevision_config(VLM))
    assert back == VLM
    # 7B-shaped (VLMConfig.seven_b() itself cannot be built yet: VisionConfig refuses 384 px / patch 14)
    seven = llava_hf.llava_onevision_config(VLMConfig(
        llm=LLMConfig.qwen2_7b(), video_token_id=151647,
        vision=VisionConfig(image_size=384, patch_size=16, hidden_size=1152, num_layers=26, num_attention_heads=16, ffn_hidden_size=4304)))
    from transformers import LlavaOnevisionConfig

    default = LlavaOnevisionConfig()  # the published llava-onevision-qwen2-7b settings
    for field in ("video_token_index", "image_token_index", "vision_feature_layer", "vision_feature_select_strategy",
                  "image_grid_pinpoints", "vision_aspect_ratio", "projector_hidden_act", "multimodal_projector_bias"):
        assert getattr(seven, field) == getattr(default, field), field
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size"):
        assert getattr(seven.vision_config, field) == getattr(default.vision_config, field), field


@pytest.mark.parametrize("vision, words", [
    (VisionConfig(pooling="merge2x2"), ["merge2x2", "LLaVA-OneVision"]),
    (VisionConfig(pooling="none"), ["pooling='none'", "bilinear"]),
    (VisionConfig(newline=False), ["newline=False", "image_newline"]),
])
def test_poolings_without_hf_equivalent_are_refused(vision, words):
    cfg = VLMConfig(llm=LLMConfig.tiny(), vision=vision)
    for build in (llava_hf.llava_onevision_config, WeightMap):
        with pytest.raises(ValueError) as e:
            build(cfg)
        assert all(w in str(e.value) for w in words), str(e.value)


def test_unsupported_hf_settings_are_refused():
    config = llava_hf.llava_onevision_config(VLM)
    config.vision_feature_layer = -2
    with pytest.raises(ValueError, match="vision_feature_layer=-2"):
        llava_hf.vlm_config_from_hf(config)
    with pytest.raises(ValueError, match="model_type 'llama'"):
        hc.config_from_hf({"model_type": "llama"})


def test_transformers_version_range_is_checked():
    assert hc.check_transformers_version("5.23.0") == "5.23.0"
    for bad in ("4.40.2", "6.0.0"):
        with pytest.raises(RuntimeError) as e:
            hc.check_transformers_version(bad)
        assert bad in str(e.value) and ">=4.57" in str(e.value) and "<6" in str(e.value)


def test_hf_megatron_hf_round_trip_is_exact_with_unmapped_tensors(tmp_path):
    src = _hf_folder(VLM, str(tmp_path / "src"), perturb_post_layernorm=True)
    ckpt = load_hf(src)
    assert ckpt.config == VLM
    assert set(ckpt.state) == set(WeightMap(VLM).megatron_shapes)
    assert sorted(ckpt.unmapped) == ["vision_tower.vision_model.post_layernorm.bias", "vision_tower.vision_model.post_layernorm.weight"]
    original = {WeightMap(VLM).canonical_hf_name(n): t for n, t in read_checkpoint(src)}
    # streamed: an iterator in, several shards out
    save_hf(iter(ckpt.state.items()), VLM, str(tmp_path / "out"), max_shard_size="20KB", extra_tensors=ckpt.unmapped, progress=False)
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((tmp_path / "out" / s).exists() for s in shards)
    again = dict(read_checkpoint(str(tmp_path / "out")))
    assert set(again) == set(original)
    assert [k for k in original if not torch.equal(original[k], again[k])] == []
    # without the unmapped tensors the (unused) post-layernorm is written as identity
    save_hf(ckpt.state, VLM, str(tmp_path / "plain"), progress=False)
    plain = dict(read_checkpoint(str(tmp_path / "plain")))
    assert torch.equal(plain["vision_tower.vision_model.post_layernorm.weight"], torch.ones(VLM.vision.hidden_size))


def test_shard_size_bounds_every_shard(tmp_path):
    state = dict(WeightMap(LLM).to_megatron(read_checkpoint(_hf_folder(LLM, str(tmp_path / "src")))))
    save_hf(state, LLM, str(tmp_path / "out"), max_shard_size="30KB", progress=False)
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    per_shard = {}
    tensors = dict(read_checkpoint(str(tmp_path / "out")))
    for name, shard in index["weight_map"].items():
        per_shard[shard] = per_shard.get(shard, 0) + tensors[name].numel() * tensors[name].element_size()
    biggest = max(t.numel() * t.element_size() for t in tensors.values())
    assert all(size <= max(30_000, biggest) for size in per_shard.values()), per_shard
    assert index["metadata"]["total_size"] == sum(per_shard.values())


def test_checkpoint_of_another_shape_names_the_tensor_and_both_shapes(tmp_path):
    src = _hf_folder(LLM, str(tmp_path / "src"))
    wider = LLMConfig.tiny(vocab_size=96, num_layers=1, ffn_hidden_size=96)
    with pytest.raises(CheckpointMismatchError) as e:
        load_hf(src, wider)
    msg = str(e.value)
    assert "model.layers.0.mlp." in msg and "(64, 128)" in msg and "(64, 96)" in msg, msg
    deeper = LLMConfig.tiny(vocab_size=96, num_layers=2)
    with pytest.raises(CheckpointMismatchError, match=r"lacks .*model\.layers\.1\."):
        load_hf(src, deeper)
    state = dict(WeightMap(LLM).to_megatron(read_checkpoint(src)))
    state["decoder.layers.0.self_attention.linear_qkv.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointMismatchError, match=r"linear_qkv.weight.*\(3, 3\).*\(128, 64\)"):
        save_hf(state, LLM, str(tmp_path / "bad"), progress=False)


def test_missing_and_corrupt_files_are_named(tmp_path):
    state = dict(WeightMap(LLM).to_megatron(read_checkpoint(_hf_folder(LLM, str(tmp_path / "src")))))
    out = tmp_path / "out"
    files = save_hf(state, LLM, str(out), max_shard_size="30KB", progress=False)
    shard = next(f for f in files if f.startswith("model-00002"))
    data = (out / shard).read_bytes()
    (out / shard).write_bytes(b"\x07" * 8 + b"not a safetensors header")
    with pytest.raises(ValueError, match=rf"{shard}: corrupt"):
        load_hf(str(out))
    (out / shard).write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=rf"{shard}"):
        load_hf(str(out))
    os.remove(out / shard)
    with pytest.raises(FileNotFoundError, match=rf"{shard}: shard listed in {INDEX_FILE} is missing"):
        load_hf(str(out))
    (out / "config.json").write_text("{ nope")
    with pytest.raises(ValueError, match="config.json: corrupt"):
        load_hf(str(out))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf(str(tmp_path), LLM)


def test_cli_round_trip_with_tokenizer(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

    from megatron_longvideo.checkpoint.convert_cli import main

    vocab = {f"w{i}": i for i in range(LLM.vocab_size)}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="w0")
    fast.save_pretrained(str(tmp_path / "tok"))
    src = _hf_folder(LLM, str(tmp_path / "src"))
    assert main(["from-hf", "--hf", src, "--out", str(tmp_path / "state.pt"), "--format", "full-state", "--no-progress"]) == 0
    assert main(["to-hf", "--full-state", str(tmp_path / "state.pt"), "--out", str(tmp_path / "hf"),
                 "--tokenizer", str(tmp_path / "tok"), "--dtype", "bfloat16", "--no-progress"]) == 0
    model = Qwen2ForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert model.config.dtype == torch.bfloat16
    for name in os.listdir(tmp_path / "tok"):
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "tok" / name).read_bytes(), name
    assert PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "hf"))("w5 w7")["input_ids"] == [5, 7]
    assert main(["to-hf", "--full-state", str(tmp_path / "absent.pt"), "--out", str(tmp_path / "x")]) == 2
    assert "absent.pt: no such full-state file" in capsys.readouterr().err
    save_full_state_file(str(tmp_path / "vlm.pt"), VLMConfig(vision=VisionConfig(pooling="merge2x2")), {})
    assert main(["to-hf", "--full-state", str(tmp_path / "vlm.pt"), "--out", str(tmp_path / "y")]) == 2
    assert "merge2x2" in capsys.readouterr().err


def test_vlm_parts_from_public_qwen2_and_siglip_folders(tmp_path):
    from transformers import SiglipConfig, SiglipModel

    qwen = _hf_folder(VLM.llm, str(tmp_path / "qwen"))
    part = load_hf(qwen, VLM, part="language_model")
    assert set(part.state) == {k for k in WeightMap(VLM).megatron_shapes if k.startswith("llm.")}
    torch.manual_seed(4)
    vision = llava_hf.siglip_vision_config(VLM.vision)
    siglip = SiglipModel(SiglipConfig(vision_config=vision.to_dict(), text_config={"vocab_size": 50, "hidden_size": 16,
                                      "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}))
    siglip.save_pretrained(str(tmp_path / "siglip"))
    tower = load_hf(str(tmp_path / "siglip"), VLM, part="vision_tower")
    assert set(tower.state) == {k for k in WeightMap(VLM).megatron_shapes if k.startswith("vision.vit.")}
    assert any(k.startswith("text_model.") for k in tower.unmapped) and "vision_model.post_layernorm.weight" in tower.unmapped
    q, k, v = split_qkv(tower.state["vision.vit.decoder.layers.1.self_attention.linear_qkv.weight"], 2, 2)
    assert torch.equal(k, siglip.vision_model.encoder.layers[1].self_attn.k_proj.weight.detach())
    with pytest.raises(ValueError, match="part='vision_tower' needs cfg"):
        load_hf(str(tmp_path / "siglip"), part="vision_tower")


def test_unsupported_installed_transformers_is_refused(tmp_path, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.40.0")
    with pytest.raises(RuntimeError, match=r"transformers 4\.40\.0 is not supported.*>=4\.57, <6"):
        save_hf({}, LLM, str(tmp_path / "x"), progress=False)
