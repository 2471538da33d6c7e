"""Rewards: hand-checked parses, the tag rules, adversarial inputs, the registry and batch sums."""

import sys

import pytest
import torch

from megatron_longvideo.rl import rewards as R
from megatron_longvideo.rl.rewards import GroundTruth, RewardInput

OPTIONS = ("A. red", "B. blue", "C. green", "D. yellow")


def mc(response, answer="B", options=OPTIONS):
    return R.multiple_choice_reward(RewardInput(response=response, answer=answer, options=options))


def wrap(answer, think="because"):
    return f"<think>{think}</think><answer>{answer}</answer>"


# ---------------------------------------------------------------------------------------------
# Answer tag rule: the last complete pair.


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer>B</answer>", "B"),
        ("<answer>A</answer> then <answer>C</answer>", "C"),  # several: the last one counts
        ("<answer>A</answer> <answer>C", "A"),  # unclosed trailing tag ignored
        ("<answer><answer>D</answer></answer>", "D"),  # nested: innermost last pair
        ("<answer>A<answer>C</answer>", "C"),
        ("</answer>B<answer>", None),  # reversed
        ("no tags at all", None),
        ("<answer>B", None),
        ("B</answer>", None),
        ("<answer></answer>", ""),
        ("<ANSWER>B</ANSWER>", None),  # tags are exact, lower case
        ("<answer>青い 🚀</answer>", "青い 🚀"),
    ],
)
def test_extract_answer(text, expected):
    assert R.extract_answer(text) == expected


def test_extract_answer_scans_only_the_tail():
    text = "<answer>B</answer>" + "x" * 100
    assert R.extract_answer(text, max_chars=50) is None  # the open tag lies before the last 50 chars
    assert R.extract_answer(text, max_chars=200) == "B"
    with pytest.raises(ValueError, match="max_chars"):
        R.extract_answer(text, max_chars=0)


# ---------------------------------------------------------------------------------------------
# Format reward.


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>t</think><answer>B</answer>", 1.0),
        ("  \n<think>t</think>\n<answer>B</answer>\n ", 1.0),  # whitespace around and between
        ("<think></think><answer></answer>", 1.0),  # empty parts are allowed
        ("<think>t</think><answer>A</answer><answer>B</answer>", 0.0),  # several answer tags
        ("<think><think>t</think></think><answer>B</answer>", 0.0),  # nested think
        ("<think>t</think><answer><answer>B</answer></answer>", 0.0),  # nested answer
        ("<answer>B</answer>", 0.0),  # no think
        ("<think>t</think>", 0.0),  # no answer
        ("<think>t</think><answer>B", 0.0),  # unclosed answer
        ("<think>t<answer>B</answer>", 0.0),  # unclosed think
        ("<think>t</think>so<answer>B</answer>", 0.0),  # text between
        ("hi <think>t</think><answer>B</answer>", 0.0),  # text before
        ("<think>t</think><answer>B</answer> bye", 0.0),  # text after
        ("<answer>B</answer><think>t</think>", 0.0),  # wrong order
        ("<think>a</answer></think><answer>B<think></answer>", 0.0),  # tags inside the wrong block
        ("<think>思考 🤔</think><answer>Ｂ</answer>", 1.0),
    ],
)
def test_format_reward(text, expected):
    assert R.format_reward(RewardInput(response=text, answer="B")) == expected


def test_format_reward_is_zero_over_the_cap():
    text = wrap("B", think="x" * 100)
    assert R.format_reward(RewardInput(response=text, answer="B"), max_chars=len(text)) == 1.0
    assert R.format_reward(RewardInput(response=text, answer="B"), max_chars=len(text) - 1) == 0.0


# ---------------------------------------------------------------------------------------------
# Multiple choice.


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("B", 1.0),
        ("b", 1.0),
        ("(B)", 1.0),
        ("[B]", 1.0),
        ("B.", 1.0),
        ("B:", 1.0),
        ("b) blue", 1.0),
        ("B. the blue one", 1.0),  # the letter wins
        ("  B  ", 1.0),
        ("blue", 1.0),  # option text, label "B." stripped
        ("Blue!", 1.0),  # normalised: case, punctuation
        ("Answer: B", 1.0),
        ("The answer is (B)", 1.0),
        ("Option b", 1.0),
        ("（Ｂ）", 1.0),  # full-width, NFKC
        ("A", 0.0),
        ("red", 0.0),
        ("E", 0.0),  # no such option
        ("bluish", 0.0),
        ("a blue thing", 0.0),  # neither a letter form nor an option text
        ("", 0.0),
    ],
)
def test_multiple_choice(answer, expected):
    assert mc(wrap(answer)) == expected


def test_multiple_choice_ground_truth_forms():
    assert mc(wrap("C"), answer="green") == 1.0  # ground truth given as option text
    assert mc(wrap("green"), answer="(C)") == 1.0
    assert mc(wrap("C"), answer="C", options=()) == 1.0  # no options: letters compare
    assert mc(wrap("D"), answer="C", options=()) == 0.0
    assert mc("C with no tags", answer="C") == 0.0
    assert mc(wrap("A") + wrap("C"), answer="C") == 1.0  # last answer counts
    with pytest.raises(ValueError, match="ground-truth"):
        mc(wrap("C"), answer="purple")


# ---------------------------------------------------------------------------------------------
# Numeric and exact match.


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3.5", 3.5),
        ("1,024", 1024.0),
        ("1,024,000.5", 1024000.5),
        ("-2", -2.0),
        ("+7", 7.0),
        ("\u22122", -2.0),  # unicode minus sign
        ("1e3", 1000.0),
        ("2.5E-1", 0.25),
        (".5", 0.5),
        ("12 seconds", 12.0),
        ("about 12, maybe 13", 12.0),  # the first number; a trailing comma ends it
        ("1,2", 1.0),  # not a thousands grouping
        ("１２", 12.0),  # full-width digits
        ("twelve", None),
        ("1e999", None),  # not finite
        ("", None),
    ],
)
def test_parse_number(text, expected):
    assert R.parse_number(text) == expected


def numeric(answer, truth, **kw):
    return R.numeric_reward(RewardInput(response=wrap(answer), answer=truth, problem_type="numeric"), **kw)


def test_numeric_reward_tolerance():
    assert numeric("12 seconds", "12") == 1.0
    assert numeric("1,024", "1024") == 1.0
    assert numeric("1e3", "1000.0") == 1.0
    assert numeric("12.5", "12") == 0.0
    # abs_tol 0.1: |12.09 - 12| = 0.09 passes, |12.2 - 12| = 0.2 fails.
    assert numeric("12.09", "12", abs_tol=0.1, rel_tol=0.0) == 1.0
    assert numeric("12.2", "12", abs_tol=0.1, rel_tol=0.0) == 0.0
    # rel_tol 1%: bound = 0.01 * 200 = 2; 201.5 passes, 203 fails.
    assert numeric("201.5", "200", abs_tol=0.0, rel_tol=0.01) == 1.0
    assert numeric("203", "200", abs_tol=0.0, rel_tol=0.01) == 0.0
    assert numeric("no number", "3") == 0.0
    with pytest.raises(ValueError, match="ground-truth"):
        numeric("3", "three")


def test_exact_match_normalises_case_space_punctuation():
    def em(answer, truth):
        return R.exact_match_reward(RewardInput(response=wrap(answer), answer=truth, problem_type="free_form"))

    assert em("  The RED,   ball! ", "the red ball") == 1.0
    assert em("Ｔｈｅ red ball", "the red ball") == 1.0
    assert em("red ball", "the red ball") == 0.0
    assert em("the red balls", "the red ball") == 0.0


def test_accuracy_dispatches_on_problem_type():
    assert R.accuracy_reward(RewardInput(response=wrap("blue"), answer="B", options=OPTIONS)) == 1.0
    assert R.accuracy_reward(RewardInput(response=wrap("3.0"), answer="3", problem_type="numeric")) == 1.0
    assert R.accuracy_reward(RewardInput(response=wrap("Yes."), answer="yes", problem_type="free_form")) == 1.0
    with pytest.raises(ValueError, match="problem_type"):
        R.accuracy_reward(RewardInput(response=wrap("3"), answer="3", problem_type="essay"))


# ---------------------------------------------------------------------------------------------
# Adversarial inputs: 10 MB strings must be scored (no assertion on time; the test must finish).

TEN_MB = 10 * 1024 * 1024


def adversarial_texts():
    return {
        "open_tags": "<answer>" * (TEN_MB // 8 + 1),
        "close_tags": "</answer>" * (TEN_MB // 9 + 1),
        "open_far_from_close": "<answer>" + "B" * TEN_MB + "</answer>",
        "many_pairs": "<answer>B</answer>" * (TEN_MB // 18 + 1),
        "nested_think": "<think>" * (TEN_MB // 7 + 1) + "</think><answer>B</answer>",
        "parens": "x" * TEN_MB + "<answer>" + "(" * 60_000 + "</answer>",
        "commas": "x" * TEN_MB + "<answer>" + "1," * 30_000 + "</answer>",
        "digits": "x" * TEN_MB + "<answer>" + "9" * 60_000 + "</answer>",
        "spaces": "x" * TEN_MB + "<answer>B" + " " * 60_000 + "x</answer>",
        "unicode": "\u0301\u202e🚀" * (TEN_MB // 3 + 1) + "<answer>\ufeff\u200b</answer>",
    }


def test_adversarial_ten_megabyte_inputs_are_scored():
    expected_mc = {"many_pairs": 1.0, "nested_think": 1.0}  # their last complete pair is "B"
    for name, text in adversarial_texts().items():
        assert len(text) >= TEN_MB, name
        inp = RewardInput(response=text, answer="B", options=OPTIONS)
        assert R.format_reward(inp) == 0.0, name
        assert R.multiple_choice_reward(inp) == expected_mc.get(name, 0.0), name
        num = RewardInput(response=text, answer="1", problem_type="numeric")
        assert R.numeric_reward(num) == (1.0 if name == "commas" else 0.0), name  # "1,1,..." -> 1
        assert R.exact_match_reward(inp) == expected_mc.get(name, 0.0), name


def test_adversarial_uncapped_scan_is_linear():
    # With the cap lifted the whole 10 MB is scanned by find/count; still fine.
    text = "<think>" + "<" * TEN_MB + "</think><answer>B</answer>"
    assert R.format_reward(RewardInput(response=text, answer="B"), max_chars=2 * TEN_MB) == 1.0
    assert R.extract_answer("<answer>" * (TEN_MB // 8 + 1) + "B</answer>", max_chars=2 * TEN_MB) == "B"


# ---------------------------------------------------------------------------------------------
# Registry, user rewards, batch evaluation.


def test_get_reward_by_name_and_by_module_spec(tmp_path, monkeypatch):
    assert R.get_reward("format") is R.format_reward
    (tmp_path / "my_rewards_mod.py").write_text(
        "class ns:\n"
        "    @staticmethod\n"
        "    def length(inp):\n"
        "        return float(len(inp.response))\n"
        "def const(inp):\n"
        "    return 0.25\n"
        "not_callable = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards_mod", raising=False)
    assert R.get_reward("my_rewards_mod:const")(RewardInput(response="x", answer="y")) == 0.25
    assert R.get_reward("my_rewards_mod:ns.length")(RewardInput(response="abc", answer="y")) == 3.0
    total, parts = R.compute_rewards(["ab", "abcd"], [GroundTruth(answer="A")] * 2, {"my_rewards_mod:ns.length": 0.5})
    torch.testing.assert_close(total, torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize(
    "spec, match",
    [
        ("no_such_reward", "unknown name"),
        ("no_such_module_xyz_123:fn", "cannot import"),
        ("math:no_such_fn", "no attribute"),
        ("math:pi", "not callable"),
        ("math:", "expected"),
        (":floor", "expected"),
        ("a:b:c", "expected"),
    ],
)
def test_get_reward_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        R.get_reward(spec)


def test_register_reward(monkeypatch):
    monkeypatch.setattr(R, "REWARDS", dict(R.REWARDS))
    R.register_reward("always_one", lambda inp: 1.0)
    assert R.get_reward("always_one")(RewardInput(response="", answer="")) == 1.0
    with pytest.raises(ValueError, match="already registered"):
        R.register_reward("always_one", lambda inp: 1.0)
    with pytest.raises(ValueError, match="name"):
        R.register_reward("a:b", lambda inp: 1.0)


def test_compute_rewards_weighted_sum_and_parts():
    gts = [GroundTruth(answer="B", options=OPTIONS), GroundTruth(answer="12", problem_type="numeric")] * 2
    responses = [
        wrap("B"),  # accuracy 1, format 1 -> 1 + 0.5 = 1.5
        "<answer>12</answer>",  # accuracy 1, format 0 -> 1.0
        wrap("C"),  # accuracy 0, format 1 -> 0.5
        "12",  # accuracy 0, format 0 -> 0.0
    ]
    total, parts = R.compute_rewards(responses, gts, {"accuracy": 1.0, "format": 0.5})
    torch.testing.assert_close(total, torch.tensor([1.5, 1.0, 0.5, 0.0]))
    torch.testing.assert_close(parts["accuracy"], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(parts["format"], torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert total.dtype == torch.float32


def test_compute_rewards_errors(monkeypatch):
    gts = [GroundTruth(answer="B")]
    with pytest.raises(ValueError, match="gts"):
        R.compute_rewards(["a", "b"], gts, {"format": 1.0})
    with pytest.raises(ValueError, match="spec"):
        R.compute_rewards(["a"], gts, {})
    with pytest.raises(ValueError, match="weight"):
        R.compute_rewards(["a"], gts, {"format": float("nan")})
    monkeypatch.setattr(R, "REWARDS", dict(R.REWARDS))
    R.register_reward("broken", lambda inp: float("inf"))
    with pytest.raises(ValueError, match="broken"):
        R.compute_rewards(["a"], gts, {"broken": 1.0})
