"""Reward fuzzing: random and adversarial text never raises, scores in range, and costs a bounded
multiple of plain text.

The time budget is a ratio measured within the run, never an absolute time: ``UNIT`` is the median
cost of the costliest built-in reward on a plain 64 KB answer (ASCII words, normalised once), and
every adversarial call must cost at most ``K`` units. Seeded; ``REWARD_FUZZ_SEED=n`` reruns a seed.
"""

import os
import random
import statistics
import time
import unicodedata

import pytest

from megatron_longvideo.rl import rewards as R
from megatron_longvideo.rl.rewards import GroundTruth, RewardInput

SEED = int(os.environ.get("REWARD_FUZZ_SEED", "1234"))
K = 30
"""Budget, in units of a plain 64 KB answer's cost. Measured worst: 2-5 (U+3300 squared words,
expanded 3-5x by NFKC into kana that must be recomposed); the code before the caps took ~40 on
U+FDFA and ~350 (4 s) on one long run of alternating combining marks."""
OPTIONS = ("A. red", "B. blue", "C. green", "D. yellow")
GTS = {
    "mc_letter": GroundTruth(answer="B", options=OPTIONS),
    "mc_text": GroundTruth(answer="blue", options=OPTIONS),
    "mc_no_options": GroundTruth(answer="C"),
    "mc_unicode": GroundTruth(answer="(Ｂ)", options=("A. 赤", "B. 青い 🚀", "C. ﷺ")),
    "numeric": GroundTruth(answer="12", problem_type="numeric"),
    "numeric_exp": GroundTruth(answer="-3.5e2", problem_type="numeric"),
    "free_form": GroundTruth(answer="the red ball", problem_type="free_form"),
    "free_form_unicode": GroundTruth(answer="青い 🚀 \u0645\u0631\u062d\u0628\u0627", problem_type="free_form"),
}
REWARDS = ("format", "multiple_choice", "numeric", "exact_match", "accuracy")
KINDS = {"multiple_choice": "mc", "numeric": "numeric", "exact_match": "free_form"}
TIMED = (("format", "mc_letter"), ("multiple_choice", "mc_letter"), ("numeric", "numeric"),
         ("exact_match", "free_form"), ("accuracy", "mc_text"))
"""(reward, ground truth) pairs timed: one per rule; the range checks cover every pair."""
N = R.DEFAULT_MAX_CHARS - 64  # characters of an answer that fits the scan window with its tags

# Characters picked for how they break things: combining marks (several classes, astral ones too),
# NFKC expanders (U+FDFA 18x, U+3300 squared words, ligatures, circled numbers), half-width marks
# that decompose to combining ones, case folds that expand, RTL and zero-width marks, digits.
SPICY = (
    [chr(c) for c in range(0x300, 0x370)] + ["\u0316", "\u0344", "\u0f73", "\u3099", "\uff9e", "\uff9f"]
    + ["\U0001d165", "\U0001d167", "\U0001d16d", "\U0001e94a", "\u20d0", "\ufe20", "\u1ab0"]
    + ["\ufdfa", "\ufdfb", "\u3300", "\u3331", "\u3357", "\ufb03", "\u2474", "\u2488", "\u00bd", "\u2460"]
    + ["ß", "ΐ", "İ", "\u0130", "\u1e9e"] + ["\u200f", "\u202e", "\u2067", "\u200b", "\ufeff", "\u00a0", "\u3000"]
    + list("0123456789.,+-eE()[]:;\u2212１２．") + ["<answer>", "</answer>", "<think>", "</think>", "<", ">"]
    + ["Answer: ", "the answer is ", "B", "b) ", "blue", "12", " ", "\n"]
)


def random_code_point(rng):
    while True:
        c = rng.randrange(0x110000) if rng.random() < 0.5 else rng.randrange(0x3000)
        if not 0xD800 <= c < 0xE000:  # no surrogates: not text
            return chr(c)


def random_text(rng, n):
    return "".join(rng.choice(SPICY) if rng.random() < 0.6 else random_code_point(rng) for _ in range(n))


def random_response(rng):
    n = rng.choice([0, 1, 3, 10, 40, 200, 1000])
    shape = rng.randrange(4)
    if shape == 0:
        return random_text(rng, n)
    if shape == 1:
        return f"<think>{random_text(rng, n)}</think><answer>{random_text(rng, rng.randrange(12))}</answer>"
    if shape == 2:
        tags = ["<answer>", "</answer>", "<think>", "</think>"]
        return "".join(rng.choice(tags) + random_text(rng, rng.randrange(4)) for _ in range(rng.randrange(30)))
    return rng.choice(["", " ", "\n\t ", "\u3000", "\u200f"]) * rng.randrange(5) + random_text(rng, n)


def answer(text):
    return f"<think>t</think><answer>{text}</answer>"


def adversarial():
    """name -> response: each a worst case for one step, as big as the scan window lets it be."""
    sq = "".join(chr(0x3300 + i % 0x58) for i in range(N))
    rng = random.Random(SEED)
    return {
        "fdfa": answer("\ufdfa" * N),
        "fdfa_64kb_utf8": answer("\ufdfa" * (N // 3)),
        "squared_words": answer(sq),
        "squared_word_one": answer("\u3300" * N),
        "letter_then_fdfa": answer("B" + "\ufdfa" * N),
        "combining_one_run": answer("a" + "\u0301\u0316" * (N // 2)),
        "combining_runs_30": answer(("a" + "\u0301\u0316" * 15) * (N // 31)),
        "combining_astral": answer("a" + "\U0001d165\U0001d167" * (N // 2)),
        "halfwidth_marks": answer("a" + "\u0301\uff9e" * (N // 2)),
        "letter_then_marks": answer("B" + "\u0301" * N),
        "casefold_expanders": answer("ΐ" * N),
        "ligatures": answer("\ufb03" * N),
        "rtl_marks": answer("\u202e\u200f" * (N // 2) + "B"),
        "digits": answer("9" * N),
        "digits_fullwidth": answer("９" * N),
        "thousands": answer("1," * (N // 2)),
        "groups_of_three": answer("1" + ",000" * (N // 4)),
        "leading_zeros": answer("0" * N + "12"),
        "long_fraction": answer("0." + "0" * N + "1"),
        "exponent_digits": answer("1e" + "9" * N),
        "dots": answer("." * N + "1"),
        "signs": answer("-" * N + "1"),
        "prefix_words": answer("the answer is " * (N // 14)),
        "spaces": answer("B" + " " * N + "x"),
        "parens": answer("(" * N),
        "nested_answer": "<answer>" * (N // 17) + "B" + "</answer>" * (N // 17),
        "nested_think": "<think>" * (N // 15) + "</think>" * (N // 15) + "<answer>B</answer>",
        "unbalanced_tags": "<answer></think><think>" * (N // 23) + "B</answer>",
        "random_256k": random_text(rng, 256 * 1024),
        "random_in_answer": answer(random_text(rng, N)),
        "empty": "",
        "whitespace": " \n\t\u3000" * (N // 4),
    }


def plain_answer():
    """A plain 64 KB answer: ASCII words, the way a long free-text answer looks."""
    words = "the quick brown fox jumps over the lazy dog while the blue one waits".split()
    rng = random.Random(SEED)
    text = " ".join(rng.choice(words) for _ in range(N // 4))[:N]
    return answer(text)


def call(reward, gt, response):
    return R.get_reward(reward)(RewardInput.of(response, gt))


def cost(reward, gt, response, repeats=3):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(reward, gt, response)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def scorable(reward, gt):
    kind = KINDS.get(reward)
    return kind is None or gt.problem_type.startswith(kind)


def check_value(value, reward, gt_name, case):
    assert isinstance(value, float) and value in (0.0, 1.0), (
        f"seed {SEED}: {reward} on {gt_name} / {case}: {value!r} is not 0.0 or 1.0")


def test_ground_truths_are_scorable():
    for name, gt in GTS.items():
        assert R.check_ground_truth(gt) is None, name


def test_random_text_scores_in_range():
    rng = random.Random(SEED)
    for trial in range(1500):
        response = random_response(rng)
        for gt_name, gt in GTS.items():
            for reward in REWARDS:
                if not scorable(reward, gt):
                    continue
                try:
                    value = call(reward, gt, response)
                except Exception as err:  # report the case, reproducibly
                    raise AssertionError(f"seed {SEED} trial {trial}: {reward} on {gt_name} raised "
                                         f"{type(err).__name__}: {err}; response {response[:200]!r}") from err
                check_value(value, reward, gt_name, f"trial {trial}")


def test_adversarial_text_scores_in_range():
    for case, response in adversarial().items():
        for gt_name, gt in GTS.items():
            for reward in REWARDS:
                if scorable(reward, gt):
                    check_value(call(reward, gt, response), reward, gt_name, case)


def test_adversarial_cost_is_a_bounded_multiple_of_plain_text():
    cases = adversarial()
    plain, short = plain_answer(), answer("B")
    for reward, gt_name in TIMED:  # warm up: the combining-class table, option caches
        call(reward, GTS[gt_name], cases["random_in_answer"])

    def unit():
        return max(cost(r, GTS[g], plain, repeats=5) for r, g in TIMED)

    base = unit()
    short_cost = statistics.median(cost("accuracy", GTS["mc_letter"], short) for _ in range(21))
    worst = (0.0, None)
    for reward, gt_name in TIMED:
        for case, response in cases.items():
            ratio = cost(reward, GTS[gt_name], response) / base
            if ratio > K:  # a load spike? measure both again before failing
                base = unit()
                ratio = cost(reward, GTS[gt_name], response, repeats=5) / base
            worst = max(worst, (ratio, f"{reward} on {gt_name} / {case}"))
            assert ratio <= K, (f"seed {SEED}: {reward} on {gt_name} / {case} costs {ratio:.1f}x a plain 64 KB "
                                f"answer ({base * 1e3:.2f} ms; a short answer: {short_cost * 1e6:.0f} us)")
    print(f"seed {SEED}: worst {worst[0]:.1f}x a plain 64 KB answer ({worst[1]}); unit {base * 1e3:.2f} ms, "
          f"short answer {short_cost * 1e6:.0f} us")


def test_compute_rewards_never_raises_with_a_failures_list():
    rng = random.Random(SEED)
    bad = [GroundTruth(answer="E", options=OPTIONS), GroundTruth(answer="", problem_type="free_form"),
           GroundTruth(answer="\ufdfa" * 5000, problem_type="numeric"), GroundTruth(answer="1", problem_type="essay"),
           GroundTruth(answer="B", options=(None,))]
    gts = [rng.choice(list(GTS.values()) + bad) for _ in range(300)]
    responses = [random_response(rng) for _ in gts]
    failures = []
    total, parts = R.compute_rewards(responses, gts, {"accuracy": 1.0, "format": 0.5}, failures=failures,
                                     ids=[f"r{i}" for i in range(len(gts))])
    failed = {f.index for f in failures}
    assert failed == {i for i, g in enumerate(gts) if g in bad}, f"seed {SEED}"
    assert all(f.reason.startswith("ground truth: ") for f in failures), f"seed {SEED}"
    assert all(total[i].isnan() == (i in failed) for i in range(len(gts))), f"seed {SEED}"
    ok = total[[i for i in range(len(gts)) if i not in failed]]
    assert ((ok >= 0) & (ok <= 1.5)).all(), f"seed {SEED}"


def test_prefix_normalisation_equals_normalising_everything():
    # _nfkc normalises growing prefixes; small caps make it stop early on most of these texts.
    rng = random.Random(SEED)
    for trial in range(400):
        text = random_text(rng, rng.choice([0, 5, 100, 2000, 6000]))
        cap = rng.choice([1, 7, 60, 500, 3000])
        got, cut = R._nfkc(text, cap)
        full = unicodedata.normalize("NFKC", R._cut_non_starter_runs(text[:cap]))
        assert (got, cut) == (full[:cap], len(text) > cap or len(full) > cap), f"seed {SEED} trial {trial}"


def test_normalize_text_is_nfkc_casefold_on_short_text():
    def reference(text):
        text = unicodedata.normalize("NFKC", text).casefold()
        return " ".join("".join(" " if unicodedata.category(c)[0] in "PSZC" else c for c in text).split())

    rng = random.Random(SEED)
    for trial in range(2000):
        text = random_text(rng, rng.randrange(25))  # too short for a run of 31 combining marks
        assert R.normalize_text(text) == reference(text), f"seed {SEED} trial {trial}: {text!r}"


@pytest.mark.parametrize("reward", REWARDS)
def test_builtins_need_no_timer(reward):
    assert R.get_reward(reward) in R._BUILTIN_REWARDS
