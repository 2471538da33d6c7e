"""Every flag of the four scripts has help text, its default shown once; inputs are checked before a model
is built, every wrong path named in one message."""

from __future__ import annotations

import importlib.util
import os

import pytest

from megatron_longvideo.training.args import build_parser, parse, validate_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parsers():
    yield "pretrain / sft", build_parser("shared flags")
    grpo = build_parser("grpo")
    _script("train_grpo").add_grpo_args(grpo)
    yield "train_grpo", grpo
    evaluate = build_parser("evaluate")
    _script("evaluate").add_eval_args(evaluate)
    yield "evaluate", evaluate


@pytest.mark.parametrize("name,parser", list(_parsers()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_flag_has_help_and_shows_its_default_once(name, parser):
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help and action.help.strip(), f"{name}: {action.option_strings[0]} has no help text"
        text = formatter._expand_help(action)
        assert text.lower().count("default") <= 1, f"{name}: {action.option_strings[0]}: {text!r}"
        if action.default is not None and action.default is not False and "default" not in action.help.lower():
            assert f"(default: {action.default})" in text, f"{name}: {action.option_strings[0]}: {text!r}"
    assert "--on-bad-input" in parser.format_help()


def test_inputs_are_checked_before_a_model_is_built(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("{}\n")
    args = parse(["--data-path", str(data), "--video-root", str(tmp_path / "videos"), "--tokenizer",
                  str(tmp_path / "tok.model"), "--load", str(tmp_path / "ckpt")])
    with pytest.raises(ValueError) as e:
        validate_inputs(args)
    message = str(e.value)
    assert "\n" not in message and message.startswith("3 inputs are wrong")
    assert f"--video-root {tmp_path / 'videos'}: does not exist" in message
    assert f"--tokenizer {tmp_path / 'tok.model'}: does not exist" in message
    assert f"--load {tmp_path / 'ckpt'}: does not exist" in message
    os.makedirs(tmp_path / "videos")
    (tmp_path / "tok.model").write_bytes(b"x")
    os.makedirs(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"^--load .*ckpt: holds no complete checkpoint"):
        validate_inputs(args)
    args.load = None
    validate_inputs(args)
    args.data_path = str(tmp_path)
    with pytest.raises(ValueError, match="--data-path .*: is a directory; expected a records file"):
        validate_inputs(args)
