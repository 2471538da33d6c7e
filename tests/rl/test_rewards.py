"""Rewards: hand-checked parses, the tag rules, adversarial inputs, the registry and batch sums."""

import sys
import threading
import time

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


# ---------------------------------------------------------------------------------------------
# Caps on normalised text: a cut answer matches only by what its start decides.


def test_cut_answers_match_only_by_their_start():
    # The raw text is cut before NFKC, so its "end" is unknown: "B" + spaces does not count as "B".
    assert R.parse_choice("B" + " " * 50 + "x", OPTIONS, max_chars=20) is None
    assert R.parse_choice("B) " + "\ufdfa" * 5, OPTIONS, max_chars=20) == 1  # closed letter: decided
    assert R.parse_choice("blue" + "\ufdfa" * 5, OPTIONS, max_chars=20) is None  # 94 chars once NFKC'd
    assert R.parse_choice("blue " + "\ufdfa", OPTIONS) is None  # uncut: no option's text either
    assert R.parse_number("12" + "x" * 30, max_chars=20) == 12.0  # 3 characters follow: complete
    assert R.parse_number("x" * 17 + "123456", max_chars=20) is None  # "123" might go on
    assert R.parse_number("12e-" + "\ufdfa" * 3, max_chars=4) is None  # the exponent may go on
    assert R.parse_number("1" * 30, max_chars=20) is None
    # Exact match: "ab" + "..." * n normalises to "ab"; cut, it matches nothing.
    ff = dict(answer="ab", problem_type="free_form")
    assert R.exact_match_reward(RewardInput(response="<answer>ab" + "…" * 8 + "</answer>", **ff), max_chars=30) == 1.0
    assert R.exact_match_reward(RewardInput(response="<answer>ab" + "…" * 10 + "</answer>", **ff), max_chars=30) == 0.0
    assert R.normalize_text("Ａ" * 10, max_chars=4) == "aaaa"
    with pytest.raises(ValueError, match="max_chars"):
        R.parse_number("1", max_chars=0)


def test_long_combining_runs_keep_their_first_30_marks():
    assert R.normalize_text("a" + "\u0301" * 40) == R.normalize_text("a" + "\u0301" * 30)
    assert R.normalize_text("a" + "\u0301" * 29) != R.normalize_text("a" + "\u0301" * 30)
    # Half-width voiced marks decompose to combining marks: they count too.
    assert R._cut_non_starter_runs("a" + "\uff9e" * 40) == "a" + "\uff9e" * 30
    assert R._cut_non_starter_runs("x" * 40 + "a\u0301" * 40) == "x" * 40 + "a\u0301" * 40  # short runs kept


# ---------------------------------------------------------------------------------------------
# Ground truths that cannot be scored.


@pytest.mark.parametrize(
    "gt, spec, reason",
    [
        (GroundTruth(answer="B", options=OPTIONS), None, None),
        (GroundTruth(answer="blue", options=OPTIONS), None, None),
        (GroundTruth(answer="C"), None, None),  # no options: letters compare
        (GroundTruth(answer="12 s", problem_type="numeric"), None, None),
        (GroundTruth(answer="Yes.", problem_type="free_form"), None, None),
        (GroundTruth(answer="E", options=OPTIONS), None, "ground truth: answer names no option"),
        (GroundTruth(answer="purple", options=OPTIONS), None, "ground truth: answer names no option"),
        (GroundTruth(answer="purple"), None, "ground truth: answer names no option"),
        (GroundTruth(answer="", options=OPTIONS), None, "ground truth: empty answer"),
        (GroundTruth(answer="  ", problem_type="numeric"), None, "ground truth: empty answer"),
        (GroundTruth(answer="?!", problem_type="free_form"), None, "ground truth: empty answer"),
        (GroundTruth(answer="three", problem_type="numeric"), None, "ground truth: answer is not a number"),
        (GroundTruth(answer="1e999", problem_type="numeric"), None, "ground truth: answer is not a number"),
        (GroundTruth(answer="3", problem_type="essay"), None, "ground truth: unknown problem type"),
        (GroundTruth(answer="B", options=("A. red", None)), None, "ground truth: unparsable options"),
        (GroundTruth(answer="B", options="AB"), None, "ground truth: unparsable options"),
        (GroundTruth(answer=3, problem_type="numeric"), None, "ground truth: malformed"),
        (None, None, "ground truth: malformed"),
        # The spec decides what is read: format and user rewards read no answer.
        (GroundTruth(answer="E", options=OPTIONS), {"format": 1.0, "m:f": 1.0}, None),
        (GroundTruth(answer="B", options=OPTIONS), ["numeric"], "ground truth: answer is not a number"),
        (GroundTruth(answer="12", problem_type="numeric"), ["format", "multiple_choice"],
         "ground truth: answer names no option"),
    ],
)
def test_check_ground_truth(gt, spec, reason):
    assert R.check_ground_truth(gt, spec) == reason


def test_check_ground_truth_reads_the_data_side_record():
    from megatron_longvideo.data.prompts import GroundTruth as RecordTruth

    def record(answer, options=(("A", "red"), ("B", "blue"))):
        return RecordTruth(problem_id="q1", problem_type="multiple choice", answer=answer, options=options)

    assert R.check_ground_truth(record("B")) is None
    assert R.check_ground_truth(record("E")) == "ground truth: answer names no option"
    assert R.check_ground_truth(record("B", options=(("A",),))) == "ground truth: malformed"  # no option text


# ---------------------------------------------------------------------------------------------
# The failure channel of compute_rewards.


def test_compute_rewards_reports_failures_and_nan_totals(monkeypatch):
    monkeypatch.setattr(R, "REWARDS", dict(R.REWARDS))

    def picky(inp):
        return {"raise": lambda: 1 / 0, "nan": lambda: float("nan"), "text": lambda: "0.5"}.get(
            inp.response, lambda: 0.25)()

    R.register_reward("picky", picky)
    mc, bad = GroundTruth(answer="B", options=OPTIONS), GroundTruth(answer="E", options=OPTIONS)
    responses = ["ok", "raise", "nan", "text", wrap("B"), wrap("B")]
    gts = [mc, mc, mc, mc, bad, bad]
    ids = ["q0", "q1", "q2", "q3", "q4", "q4"]
    failures = []
    total, parts = R.compute_rewards(responses, gts, {"accuracy": 1.0, "picky": 2.0}, failures=failures, ids=ids)
    assert [(f.index, f.reason) for f in failures] == [
        (1, "reward: error"), (2, "reward: non-finite"), (3, "reward: not a number"),
        (4, "ground truth: answer names no option"), (5, "ground truth: answer names no option"),
    ]
    assert all(isinstance(f, tuple) and len(f) == 3 and "\n" not in f.message for f in failures)
    assert "'picky'" in failures[0].message and "'q1'" in failures[0].message
    assert "ZeroDivisionError" in failures[0].message
    assert "'accuracy'" in failures[3].message and "'q4'" in failures[3].message and "'E'" in failures[3].message
    assert total[0].item() == 0.5 and total[1:].isnan().all()
    assert parts["accuracy"][:4].tolist() == [0.0] * 4 and parts["accuracy"][4:].isnan().all()
    # Without a failures list the first failure raises, naming the reward and the record.
    with pytest.raises(ValueError, match="'picky' on record 'q1'.*ZeroDivisionError"):
        R.compute_rewards(responses, gts, {"picky": 1.0}, ids=ids)
    with pytest.raises(ValueError, match="'accuracy' on response 0: ground truth answer 'E' names no option"):
        R.compute_rewards(responses[4:] * 3, gts[4:] * 3, {"accuracy": 1.0})
    with pytest.raises(ValueError, match="ids"):
        R.compute_rewards(responses, gts, {"picky": 1.0}, ids=ids[:2])
    with pytest.raises(ValueError, match="time_limit_s"):
        R.compute_rewards(responses, gts, {"picky": 1.0}, time_limit_s=0.0)


def test_compute_rewards_time_limit(tmp_path, monkeypatch):
    # One timing assertion, generous: a 5 s call abandoned after 0.2 s leaves the batch well under 3 s.
    (tmp_path / "slow_rewards_mod.py").write_text(
        "import threading\n"
        "release = threading.Event()\n"
        "def slow(inp):\n"
        "    if inp.response == 'slow':\n"
        "        release.wait(5.0)\n"
        "    if inp.response == 'own-timeout':\n"
        "        raise TimeoutError('from the reward itself')\n"
        "    return 1.0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "slow_rewards_mod", raising=False)
    import slow_rewards_mod

    gts = [GroundTruth(answer="B", options=OPTIONS)] * 5
    responses = ["a", "slow", "b", "own-timeout", "slow"]
    spec = {"slow_rewards_mod:slow": 1.0, "format": 1.0}
    try:
        failures = []
        start = time.perf_counter()
        total, _ = R.compute_rewards(responses, gts, spec, failures=failures, ids=list("vwxyz"), time_limit_s=0.2)
        elapsed = time.perf_counter() - start
        assert elapsed < 3.0, elapsed
        assert [(f.index, f.reason) for f in failures] == [
            (1, "reward: timeout"), (3, "reward: error"), (4, "reward: timeout")]  # the next call was not blocked
        assert "'w'" in failures[0].message and "0.2 s" in failures[0].message
        assert total[[0, 2]].tolist() == [1.0, 1.0]
        # From a worker thread of the process too (no signals involved).
        out = {}
        worker = threading.Thread(target=lambda: out.update(r=R.compute_rewards(["a"], gts[:1], spec, time_limit_s=1.0)))
        worker.start()
        worker.join(10.0)
        assert out["r"][0].tolist() == [1.0]
    finally:
        slow_rewards_mod.release.set()  # let the abandoned calls finish
