"""Qwen2-Audio through the Hugging Face checkpoint tools, both ways, as a user runs them.

A tiny random ``Qwen2AudioForConditionalGeneration`` (Whisper's 128 mel bins and 30 s window, a 2-layer
tower of width 16, a 2-layer Qwen2; norms, biases and the position table moved off their init) and a
byte-level BPE tokenizer with Qwen2-Audio's chat tokens, saved by transformers. Checked against the
installed transformers (printed; 5.24.0 when written). Three processes:

* ``tools/convert_checkpoint.py from-hf`` at TP = 1 (one process);
* one TP = 2 spawn: ``convert_cli.main from-hf --tensor-model-parallel-size 2`` (what the script runs under
  torchrun); a TP = 2 model loaded from the TP = 1 checkpoint (resharded) equals one loaded from the
  folder with ``load_hf_into_model``; its logits on an audio prompt equal transformers'; ``export_model``
  gathers its shards into a folder;
* ``tools/convert_checkpoint.py to-hf`` of the TP = 2 checkpoint.

Both written folders load strictly into ``Qwen2AudioForConditionalGeneration`` with every tensor equal to
the original's, and give its logits exactly; the ``to-hf`` one is the source file for file (names,
dtypes, config); ``AutoProcessor`` builds a ``Qwen2AudioProcessor`` from it whose chat template and
Whisper features give exactly the prompt our model was run on. Without a process: the full-state file,
``--llm-only`` (``Qwen2ForCausalLM``) and the configs both ways.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.dist import init_cpu_dist, run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]
SECONDS, TOKENS = 7.0, 175  # one partial window: 700 mel frames -> 175 tower tokens
TEXT = "what is this sound"
TOL = 1e-4


def _make_source(folder: str):
    """The tokenizer and the random model, saved to ``folder``; returns the model."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    from tests.checkpoint.hf_fixtures import make_tokenizer

    texts = ["what is this sound", "a dog barks in the rain", "glass breaking"] * 20
    tok = make_tokenizer(texts, folder, special=SPECIAL)
    config = Qwen2AudioConfig(
        audio_config=dict(d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32, num_mel_bins=128,
                          max_source_positions=1500),
        text_config=dict(model_type="qwen2", vocab_size=-(-len(tok) // 8) * 8, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096),
        audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"))
    torch.manual_seed(0)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "embed_positions" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return model


def _wave():
    g = torch.Generator().manual_seed(1)
    t = torch.arange(int(SECONDS * 16000)) / 16000.0
    return (0.1 * torch.randn(len(t), generator=g) + 0.5 * torch.sin(2 * torch.pi * 440.0 * t)).numpy()


def _inputs(folder: str) -> dict:
    """The audio prompt our model is run on, built by hand: our chat rendering with ``<|AUDIO|>`` x 175, and
    Whisper features of the wave (what a ``Qwen2AudioProcessor`` should make of them)."""
    from transformers import AutoTokenizer, WhisperFeatureExtractor

    tok = AutoTokenizer.from_pretrained(folder)
    text = (f"<|im_start|>user\n<|audio_bos|>{'<|AUDIO|>' * TOKENS}<|audio_eos|>{TEXT}<|im_end|>\n"
            f"<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt")["input_ids"]
    features = WhisperFeatureExtractor(feature_size=128)(_wave(), sampling_rate=16000, padding="max_length",
                                                         return_attention_mask=True, return_tensors="pt")
    return {"input_ids": ids, "input_features": features["input_features"],
            "feature_attention_mask": features["attention_mask"]}


def _hf_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _cli(*argv: str) -> None:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), *argv, "--no-progress"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _tp2_worker(rank, world_size, root, inputs):
    import torch.distributed as dist

    from megatron_longvideo.checkpoint.convert_cli import main
    from megatron_longvideo.checkpoint.dist_ckpt import load_checkpoint, model_config_of
    from megatron_longvideo.checkpoint.hf_convert import export_model, load_hf_into_model
    from megatron_longvideo.models.qwen2_audio.model import build_qwen2_audio, qwen2_audio_forward
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    init_cpu_dist()
    code = main(["from-hf", "--hf", f"{root}/src", "--out", f"{root}/ckpt_tp2", "--tensor-model-parallel-size", "2",
                 "--no-progress"])
    cfg = model_config_of(f"{root}/ckpt_tp1")
    groups = initialize_parallel(ParallelConfig(tensor_parallel_size=2))
    resharded = build_qwen2_audio(cfg, groups, seed=7)
    load_checkpoint(f"{root}/ckpt_tp1", model=resharded, groups=groups, weights_only=True)
    model = build_qwen2_audio(cfg, groups, seed=9)
    load_hf_into_model(model, groups, f"{root}/src")
    theirs = dict(resharded.named_parameters())
    differ = [k for k, p in model.named_parameters() if not torch.equal(p, theirs[k])]
    with torch.no_grad():
        mask = inputs["feature_attention_mask"]
        out = qwen2_audio_forward(model, groups, input_ids=inputs["input_ids"],
                                  audios=[[(inputs["input_features"], mask.sum(-1))]])
    parts = [torch.empty_like(out) for _ in range(groups.tp_size)]  # [1, S, vocab / TP] each
    dist.all_gather(parts, out.contiguous(), group=groups.tp)
    export_model(model, groups, cfg, f"{root}/exported", tokenizer=f"{root}/src", progress=False)
    destroy_parallel()
    return {"code": code, "cfg": cfg, "shard_rows": model.llm.embedding.word_embeddings.weight.shape[0],
            "differ": differ, "logits": torch.cat(parts, dim=-1)}


def _loads_strictly(folder: str, reference) -> dict:
    """What ``from_pretrained`` of ``folder`` left out, and the tensors not equal to ``reference``'s."""
    from transformers import Qwen2AudioForConditionalGeneration

    model, info = Qwen2AudioForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    ref = reference.state_dict()
    state = model.eval().state_dict()
    return {"info": {k: list(v) for k, v in info.items() if v}, "names": sorted(state) == sorted(ref),
            "differ": [k for k in ref if not torch.equal(state[k], ref[k])], "model": model}


def test_qwen2_audio_round_trips_through_the_cli(tmp_path):
    import transformers
    from transformers import AutoProcessor

    from megatron_longvideo.checkpoint.hf_io import read_checkpoint
    from megatron_longvideo.models.qwen2_audio.model import Qwen2AudioConfig

    root = str(tmp_path)
    hf = _make_source(f"{root}/src")
    inputs = _inputs(f"{root}/src")
    assert int((inputs["input_ids"] == hf.config.audio_token_index).sum()) == TOKENS
    expected = _hf_logits(hf, inputs)
    _cli("from-hf", "--hf", f"{root}/src", "--out", f"{root}/ckpt_tp1")
    out = run_ranks(_tp2_worker, 2, root, inputs)
    _cli("to-hf", "--dist-checkpoint", f"{root}/ckpt_tp2", "--out", f"{root}/back")
    first = out[0]
    assert [o["code"] for o in out] == [0, 0], out
    assert isinstance(first["cfg"], Qwen2AudioConfig) and first["cfg"].audio.num_mel_bins == 128
    assert first["shard_rows"] * 2 == hf.config.text_config.vocab_size  # the model was sharded
    assert first["differ"] == [], first["differ"]  # TP=1 checkpoint resharded == the folder loaded at TP=2
    error = ((first["logits"] - expected).abs().max() / expected.abs().max()).item()
    print(f"transformers {transformers.__version__}: TP=2 logits vs transformers', relative {error:.1e}")
    assert error < TOL, error
    assert torch.equal(out[1]["logits"], first["logits"])

    for folder in ("back", "exported"):  # to-hf of the TP=2 checkpoint; export_model of the TP=2 model
        loaded = _loads_strictly(f"{root}/{folder}", hf)
        assert loaded["info"] == {} and loaded["names"], (folder, loaded["info"])
        assert loaded["differ"] == [], (folder, loaded["differ"])
        assert torch.equal(_hf_logits(loaded["model"], inputs), expected), folder
        assert {"preprocessor_config.json", "processor_config.json", "chat_template.jinja", "generation_config.json",
                "tokenizer.json"} <= set(os.listdir(f"{root}/{folder}")), folder

    source, back = dict(read_checkpoint(f"{root}/src")), dict(read_checkpoint(f"{root}/back"))
    assert sorted(source) == sorted(back)
    assert all(torch.equal(source[k], back[k]) and source[k].dtype == back[k].dtype for k in source)

    def config(folder):
        with open(os.path.join(root, folder, "config.json")) as f:
            return {k: v for k, v in json.load(f).items() if k != "transformers_version"}

    assert config("src") == config("back")

    processor = AutoProcessor.from_pretrained(f"{root}/back")
    assert type(processor).__name__ == "Qwen2AudioProcessor"
    assert processor.feature_extractor.feature_size == 128 and processor.feature_extractor.sampling_rate == 16000
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": TEXT}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    made = processor(text=prompt, audio=[_wave()], sampling_rate=16000, return_tensors="pt")
    assert torch.equal(made["input_ids"], inputs["input_ids"]), prompt
    assert torch.equal(made["input_features"], inputs["input_features"])
    assert torch.equal(made["feature_attention_mask"], inputs["feature_attention_mask"])


def test_qwen2_audio_full_state_llm_only_and_configs(tmp_path):
    """No process group: ``from-hf --format full-state`` / ``to-hf --full-state`` (in-process), the language
    model alone as ``Qwen2ForCausalLM``, and the configs ours -> transformers' -> ours."""
    from transformers import Qwen2ForCausalLM

    from megatron_longvideo.checkpoint.hf_config import config_from_hf, hf_config
    from megatron_longvideo.checkpoint.hf_convert import (load_full_state_file, load_hf, read_hf_config,
                                                          save_full_state_file, save_hf)
    from megatron_longvideo.models.qwen2_audio.model import Qwen2AudioConfig

    root = str(tmp_path)
    hf = _make_source(f"{root}/src")
    cfg = read_hf_config(f"{root}/src")
    assert isinstance(cfg, Qwen2AudioConfig) and cfg.audio_token_id == hf.config.audio_token_index
    assert config_from_hf(hf_config(cfg).to_dict()) == cfg
    checkpoint = load_hf(f"{root}/src")
    save_full_state_file(f"{root}/state.pt", checkpoint.config, checkpoint.state)
    cfg_back, state = load_full_state_file(f"{root}/state.pt")
    assert cfg_back == cfg
    save_hf(state, cfg_back, f"{root}/full", progress=False)
    loaded = _loads_strictly(f"{root}/full", hf)
    assert loaded["info"] == {} and loaded["names"] and loaded["differ"] == [], loaded["info"]

    save_hf(state, cfg, f"{root}/llm", part="language_model", progress=False, source_config=_source_config(root))
    llm, info = Qwen2ForCausalLM.from_pretrained(f"{root}/llm", output_loading_info=True)
    assert not any(info.values()), info
    text = {k: v for k, v in hf.state_dict().items() if k.startswith(("model.language_model.", "lm_head."))}
    mine = llm.state_dict()
    assert sorted(mine) == sorted(k.replace("model.language_model.", "model.") for k in text)
    assert all(torch.equal(mine[k.replace("model.language_model.", "model.")], t) for k, t in text.items())
    assert not {"preprocessor_config.json", "processor_config.json"} & set(os.listdir(f"{root}/llm"))
    with pytest.raises(ValueError, match="vision_tower"):
        save_hf(state, cfg, f"{root}/tower", part="vision_tower", progress=False)


def _source_config(root: str) -> dict:
    with open(os.path.join(root, "src", "config.json")) as f:
        return json.load(f)
