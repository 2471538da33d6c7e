"""Tokenizers (sentencepiece and Hugging Face, one interface) and the prompt / target builders."""

from __future__ import annotations

import pickle

import pytest
import torch

from megatron_longvideo.data.prompts import (
    IGNORE_INDEX,
    build_caption_example,
    build_rl_prompt,
    build_sft_example,
    format_response,
    resolve_num_video_tokens,
)
from megatron_longvideo.data.records import load_records
from megatron_longvideo.data.tokenizer import HFTokenizer, SpecialTokens, load_tokenizer, train_sentencepiece


def _check_example(tok, ex, n):
    ids = ex.input_ids.tolist()
    assert ids.count(tok.video_id) == n
    assert ids[ex.video_start : ex.video_start + n] == [tok.video_id] * n
    assert ids[0] == tok.im_start_id


def test_sentencepiece_tokenizer(tokenizer):
    tok = tokenizer
    ids = {tok.pad_id, tok.video_id, tok.im_start_id, tok.im_end_id}
    assert len(ids) == 4 and max(ids) < tok.vocab_size <= 512
    assert tok.eos_id == tok.im_end_id  # a chat turn's end is where a rollout stops
    text = "Héllo wörld 123\n  two  spaces\tand <think>x</think><answer>B</answer>"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<video>") == [tok.video_id]
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(text) == tok.encode(text) and clone.video_id == tok.video_id


def test_special_token_missing_is_named(tmp_path):
    model = train_sentencepiece(["some text for a model"] * 20, str(tmp_path / "m"), vocab_size=320)
    with pytest.raises(ValueError, match="token '<frame>' is not in the tokenizer's vocabulary"):
        load_tokenizer(model, special=SpecialTokens(video="<frame>"))
    with pytest.raises(ValueError, match="special tokens must be distinct"):
        SpecialTokens(video="<|im_end|>")
    with pytest.raises(ValueError, match="not a sentencepiece .model file nor a Hugging Face"):
        (tmp_path / "empty").mkdir()
        load_tokenizer(str(tmp_path / "empty"))
    assert load_tokenizer(str(tmp_path)).vocab_size == load_tokenizer(model).vocab_size  # folder with one .model


def test_sft_rl_caption_examples(synth, tokenizer):
    tok = tokenizer
    qa = load_records(synth.qa_path).records
    cap = load_records(synth.caption_path, kind="caption").records
    rec = qa[0]
    sft = build_sft_example(rec, tok, 9)
    _check_example(tok, sft, 9)
    target = sft.labels[sft.num_prompt_tokens :].tolist()
    assert (sft.labels[: sft.num_prompt_tokens] == IGNORE_INDEX).all()
    assert target[-1] == tok.eos_id
    assert tok.decode(target) == format_response(rec.reasoning, rec.answer, tok.special) + tok.special.im_end
    assert "<think>" in tok.decode(target) and f"<answer>{rec.answer}</answer>" in tok.decode(target)

    rl = build_rl_prompt(rec, tok, 9)
    assert rl.labels is None and torch.equal(rl.input_ids, sft.input_ids[: sft.num_prompt_tokens])
    assert rl.ground_truth.answer == rec.answer and rl.ground_truth.problem_type == "multiple choice"
    assert rl.ground_truth.options == rec.options and len(rec.options) == 4
    prompt_text = tok.decode(rl.input_ids.tolist())
    assert prompt_text.endswith("<|im_start|>assistant\n") and rec.question_text in prompt_text

    shape_q = next(r for r in qa if r.problem_id.endswith("-shape"))
    assert "A. square\nB. disc\nC. triangle" in tok.decode(build_rl_prompt(shape_q, tok, 1).input_ids.tolist())
    c = build_caption_example(cap[0], tok, 5)
    _check_example(tok, c, 5)
    assert tok.decode(c.labels[c.num_prompt_tokens :].tolist()) == cap[0].caption + tok.special.im_end


def test_num_video_tokens_helper():
    assert resolve_num_video_tokens(196, 64) == 196
    assert resolve_num_video_tokens(lambda t: t * 196 + 1, 64) == 64 * 196 + 1
    with pytest.raises(ValueError, match="num_video_tokens must be a positive int"):
        resolve_num_video_tokens(lambda t: 0, 4)
    with pytest.raises(ValueError, match="num_video_tokens must be a positive int"):
        resolve_num_video_tokens(2.5, 4)


def test_hf_tokenizer_from_local_folder(tmp_path, synth):
    """A Hugging Face tokenizer folder, built offline, behind the same interface."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    special = SpecialTokens()
    words = sorted({w for line in open(synth.qa_path) for w in line.replace('"', " ").split()})
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token=special.pad)
    fast.add_special_tokens({"additional_special_tokens": [t for t in special.all() if t != special.pad]})
    fast.save_pretrained(str(tmp_path / "hf"))

    tok = load_tokenizer(str(tmp_path / "hf"))
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("<video>") == [tok.video_id] and tok.pad_id == fast.pad_token_id
    rec = load_records(synth.qa_path).records[0]
    ex = build_sft_example(rec, tok, 7)
    _check_example(tok, ex, 7)
    assert ex.labels[-1].item() == tok.eos_id == tok.im_end_id


def test_byte_tokenizer_needs_no_file_and_round_trips():
    from megatron_longvideo.data.tokenizer import ByteTokenizer, load_tokenizer

    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer)
    text = "<|im_start|>user\nhéllo <video><video> what?<|im_end|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids.count(tok.video_id) == 2 and ids[0] == tok.im_start_id and ids[-1] == tok.eos_id
    assert max(ids) < tok.vocab_size and all(0 <= i < 256 for i in tok.encode("plain bytes"))
    tok.check_special_tokens()


def test_qwen_family_tokens_render_the_video_between_its_delimiters(synth):
    """Qwen2.5-VL's spelling: ``<|vision_start|><|video_pad|><|vision_end|>`` with the text straight after;
    the response tags need not be single tokens (public Qwen tokenizers spell them as pieces)."""
    from megatron_longvideo.data.prompts import PromptConfig, render_prompt
    from megatron_longvideo.data.tokenizer import ByteTokenizer
    from megatron_longvideo.models import special_tokens

    qwen = special_tokens("qwen2_5_vl")
    assert qwen.structural() == ["<|im_start|>", "<|im_end|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    text = render_prompt("Q?", PromptConfig(system_prompt="S"), qwen)
    assert text == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Q?"
                    "<|im_end|>\n<|im_start|>assistant\n")
    assert render_prompt("Q?", PromptConfig(system_prompt="S"), special_tokens("llava_onevision")).count("<video>\nQ?") == 1

    class NoTags(ByteTokenizer):  # a vocabulary without <think> / <answer> as tokens
        def _id(self, token):
            return None if token in (qwen.think_start, qwen.think_end, qwen.answer_start, qwen.answer_end) else super()._id(token)

    tok = NoTags(special=qwen)
    tok.check_special_tokens()
    ex = build_rl_prompt(load_records(synth.qa_path).records[0], tok, 6)
    ids = ex.input_ids.tolist()
    start = ex.video_start
    assert ids[start - 1] == tok.token_id("<|vision_start|>") and ids[start + 6] == tok.token_id("<|vision_end|>")
    assert ids[start : start + 6] == [tok.video_id] * 6

    with pytest.raises(ValueError, match="vision_start and vision_end come together"):
        SpecialTokens(vision_start="<|vision_start|>")
    with pytest.raises(ValueError, match="model family: must be one of"):
        special_tokens("llava")


def test_entry_scripts_read_the_tokenizer_with_the_familys_tokens(tokenizer):
    """``--model-family qwen2_5_vl`` with a tokenizer made for LLaVA-OneVision is refused, naming the tokens."""
    from megatron_longvideo.training.args import load_tokenizer_for, parse

    args = parse(["--model-family", "qwen2_5_vl", "--tokenizer", tokenizer.source])
    with pytest.raises(ValueError, match=r"the qwen2_5_vl family's prompts need its chat tokens .*<\|video_pad\|>"):
        load_tokenizer_for(args)
    assert load_tokenizer_for(parse(["--tokenizer", tokenizer.source])).video_id == tokenizer.video_id
