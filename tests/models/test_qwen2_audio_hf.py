"""The whole Qwen2-Audio (issue 18) against transformers' ``Qwen2AudioForConditionalGeneration``.

Checked with the installed transformers (5.24.0 when written; the version is printed and returned). A
tiny random HF model (Whisper's real 30 s window of 3000 frames, 128 mel bins, 2 encoder layers of width
16, a 2-layer Qwen2) with its norms, biases and position table moved off their init, so that a swapped
or dropped one shows. Features come from ``WhisperFeatureExtractor`` itself (16 kHz noise with tones).
In one world=1 spawn:

* import (``load_hf_state``): a prompt text - ``<|AUDIO|>`` x N - text with one 7 s audio (one partial
  window, 175 tokens) gives transformers' logits within 1e-4 relative;
* a 45 s audio as one audio of two windows (the second partial: 750 + 375 tokens) gives the logits
  transformers gives for the same prompt with the two windows as two audios whose placeholders follow
  each other (the same embeddings in the same places: transformers fills placeholders in order), and
  our tokens of the windowed audio equal each window encoded alone;
* export (``hf_state``): every tensor equal to transformers' own, loaded strictly into a fresh
  ``Qwen2AudioForConditionalGeneration`` it gives the same logits; importing that back restores every
  parameter;
* the configs: ours -> transformers' -> ours is the identity; a ``save_pretrained`` folder (legacy on-disk
  names) imports to the same parameters; malformed packed windows are refused with a message.

Without a spawn: the per-window token count is transformers' encoder output length for every length.
"""

from __future__ import annotations

import torch

from tests.dist import init_cpu_dist, run_ranks

AUDIO = 5
VOCAB = 96
TOL = 1e-4


def _hf_config():
    from transformers import Qwen2AudioConfig

    return Qwen2AudioConfig(
        audio_config=dict(d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32, num_mel_bins=128,
                          max_source_positions=1500),
        text_config=dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
        audio_token_index=AUDIO)


def _hf_model(seed: int = 0):
    from transformers import Qwen2AudioForConditionalGeneration

    torch.manual_seed(seed)
    hf = Qwen2AudioForConditionalGeneration(_hf_config()).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias") or "embed_positions" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return hf


def _features(seconds: float, seed: int):
    """``(features [w, 128, 3000], masks [w, 3000])`` of a random ``seconds`` long 16 kHz signal, one 30 s
    window each, as ``WhisperFeatureExtractor`` computes and pads them."""
    from transformers import WhisperFeatureExtractor

    g = torch.Generator().manual_seed(seed)
    n = int(seconds * 16000)
    t = torch.arange(n) / 16000.0
    wave = 0.1 * torch.randn(n, generator=g) + 0.5 * torch.sin(2 * torch.pi * 440.0 * t) * torch.sin(torch.pi * t)
    extractor = WhisperFeatureExtractor(feature_size=128)
    chunks = [wave[i : i + 480000].numpy() for i in range(0, n, 480000)]
    out = extractor(chunks, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="pt")
    return out["input_features"].float(), out["attention_mask"].long()


def _prompt(num_tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(6, VOCAB, (5,), generator=g), torch.full((num_tokens,), AUDIO),
                     torch.randint(6, VOCAB, (7,), generator=g)])
    return ids[: len(ids) // 2 * 2][None]  # [1, S], S even


def _relative(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _worker(rank, world_size, folder):
    import transformers
    from transformers import Qwen2AudioForConditionalGeneration

    from megatron_longvideo.checkpoint.hf_io import read_checkpoint
    from megatron_longvideo.models.qwen2_audio.audio import pack_windows
    from megatron_longvideo.models.qwen2_audio.hf import config_from_hf, hf_config
    from megatron_longvideo.models.qwen2_audio.model import build_qwen2_audio, hf_state, load_hf_state, qwen2_audio_forward
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    init_cpu_dist()
    groups = initialize_parallel(ParallelConfig())
    hf = _hf_model()
    cfg = config_from_hf(hf.config)
    model = build_qwen2_audio(cfg, groups, seed=3)
    load_hf_state(model, groups, hf.state_dict().items())
    out = {"version": transformers.__version__, "config_round_trip": config_from_hf(hf_config(cfg).to_dict()) == cfg}

    def ours(ids, features, masks):
        with torch.no_grad():
            return qwen2_audio_forward(model, groups, input_ids=ids, audios=[[(features, masks.sum(-1))]])

    def theirs(net, ids, features, masks):
        with torch.no_grad():
            return net(input_ids=ids, input_features=features, feature_attention_mask=masks).logits

    short, short_mask = _features(7.0, seed=1)  # one window, 700 real frames
    n_short = cfg.num_audio_tokens(int(short_mask.sum()))
    ids_short = _prompt(n_short, seed=2)
    expected_short = theirs(hf, ids_short, short, short_mask)
    out["short"] = (n_short, _relative(ours(ids_short, short, short_mask), expected_short))

    long, long_mask = _features(45.0, seed=3)  # two windows: 3000 + 1500 real frames
    n_long = cfg.num_audio_tokens(int(long_mask.sum()))
    ids_long = _prompt(n_long, seed=4)
    expected_long = theirs(hf, ids_long, long, long_mask)  # two audios, placeholders back to back
    out["long"] = (long.shape[0], n_long, _relative(ours(ids_long, long, long_mask), expected_long))
    with torch.no_grad():
        packed = pack_windows(long, long_mask.sum(-1))
        together = model.vision(packed)  # [2, 750, h]
        alone = torch.cat([model.vision(packed[i : i + 1]) for i in range(2)])
    out["windows_alone"] = _relative(together, alone)

    exported = hf_state(model, groups)
    reference = hf.state_dict()
    out["export_names"] = sorted(exported) == sorted(reference)
    out["export_equal"] = [k for k in reference if not torch.equal(exported[k], reference[k])]
    fresh = Qwen2AudioForConditionalGeneration(_hf_config()).eval()
    fresh.load_state_dict(exported, strict=True)
    out["export_logits"] = max(_relative(theirs(fresh, ids_short, short, short_mask), expected_short),
                               _relative(theirs(fresh, ids_long, long, long_mask), expected_long))
    again = build_qwen2_audio(cfg, groups, seed=9)
    load_hf_state(again, groups, exported.items())
    original = dict(model.named_parameters())
    out["reimport_changed"] = [k for k, p in again.named_parameters() if not torch.equal(p, original[k])]
    hf.save_pretrained(folder)  # on disk: transformers' legacy names (audio_tower.*, language_model.model.*)
    on_disk = dict(read_checkpoint(folder))
    out["disk_names"] = sorted(on_disk)[:2]
    from_disk = build_qwen2_audio(cfg, groups, seed=10)
    load_hf_state(from_disk, groups, on_disk.items())
    out["disk_changed"] = [k for k, p in from_disk.named_parameters() if not torch.equal(p, original[k])]
    out["bad_inputs"] = _bad_inputs(model.vision, packed)
    destroy_parallel()
    return out


def _bad_inputs(tower, packed):
    """The message of every malformed audio ``check_frames`` must refuse (None: it was accepted)."""
    cases = {"shape": packed[:, :-2], "dtype": packed.long(), "mask": packed.clone(), "middle_partial": packed.flip(0),
             "empty_last": packed.clone()}
    cases["mask"][1, -1, 5] = 0.0  # a hole in the frame mask
    cases["empty_last"][1, -1] = 0.0
    messages = {}
    for name, windows in cases.items():
        try:
            tower.check_frames(windows, what=f"audio {name}")
            messages[name] = None
        except ValueError as e:
            messages[name] = str(e)
    return messages


def test_token_counts_follow_transformers():
    """Our per-window count is transformers' encoder output length (and its processor's expansion)."""
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

    from megatron_longvideo.models.qwen2_audio.audio import AudioConfig, pack_windows, unpack_windows, window_tokens

    lengths = torch.arange(1, 3001)
    _, theirs = Qwen2AudioEncoder._get_feat_extract_output_lengths(None, lengths)
    assert [window_tokens(int(n)) for n in lengths] == theirs.tolist()
    cfg = AudioConfig()
    assert cfg.tokens_per_window == 750 and cfg.num_audio_tokens(3000) == 750 and cfg.num_audio_tokens(4500) == 1125
    features = torch.randn(2, 4, 6)
    packed = pack_windows(features, [6, 3])
    assert packed.shape == (2, 5, 6) and packed[1, -1].tolist() == [1, 1, 1, 0, 0, 0]
    back, lens = unpack_windows(packed)
    assert torch.equal(back, features) and lens.tolist() == [6, 3]
    for bad, field in ((dict(hidden_size=33), "hidden_size"), (dict(max_source_positions=1), "max_source_positions"),
                       (dict(num_layers=0), "num_layers")):
        try:
            AudioConfig(**bad)
            raise AssertionError(f"{bad} was accepted")
        except ValueError as e:
            assert field in str(e), (bad, str(e))


def test_qwen2_audio_equals_transformers_import_export_and_windows(tmp_path):
    out = run_ranks(_worker, 1, str(tmp_path / "hf"))[0]
    print(f"transformers {out['version']}:", out)
    assert out["config_round_trip"]
    n_short, error = out["short"]
    assert n_short == 175 and error < TOL, out["short"]
    windows, n_long, error = out["long"]
    assert windows == 2 and n_long == 750 + 375 and error < TOL, out["long"]
    assert out["windows_alone"] < 1e-6, out["windows_alone"]
    assert out["export_names"] and out["export_equal"] == [], out["export_equal"]
    assert out["export_logits"] < 1e-6, out["export_logits"]
    assert out["reimport_changed"] == [], out["reimport_changed"]
    assert out["disk_names"][0].startswith("audio_tower.") and out["disk_changed"] == [], out
    bad = out["bad_inputs"]
    assert all(bad.values()), f"malformed audio accepted: {[k for k, v in bad.items() if v is None]}"
    assert "packed windows" in bad["shape"] and "frame mask" in bad["mask"] and "every window but the last" in bad["middle_partial"]
