"""Record parsing and validation: formats, options, answers, and errors that name file:line field."""

from __future__ import annotations

import json

import pytest

from megatron_longvideo.data.errors import RecordError
from megatron_longvideo.data.records import load_records, normalize_choice, parse_inline_options

BASE = {"problem_id": "p0", "data_type": "video", "videos": "a.mp4", "problem_type": "multiple choice",
        "problem": "Which one? A. red B. green C. blue", "reasoning": "r", "answer": "B"}


def write_jsonl(tmp_path, rows, name="qa.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("problem,expected", [
    ("Which? A. red B. green C. blue", [("A", "red"), ("B", "green"), ("C", "blue")]),
    ("Which?\n(A) a cat\n(B) a dog", [("A", "a cat"), ("B", "a dog")]),
    ("Pick: A: one, B: two, C: three", [("A", "one,"), ("B", "two,"), ("C", "three")]),
    ("What is a car? Answer in one word.", []),
])
def test_inline_options(problem, expected):
    assert list(parse_inline_options(problem)) == expected


@pytest.mark.parametrize("answer,letter", [("B", "B"), ("b", "B"), ("(B)", "B"), ("B.", "B"), ("B. green", "B"),
                                           ("green", "B"), ("<answer>C</answer>", "C"), ("B. blue", None),
                                           ("E", None), ("purple", None)])
def test_answer_normalisation(answer, letter):
    assert normalize_choice(answer, (("A", "red"), ("B", "green"), ("C", "blue"))) == letter


def test_formats_jsonl_and_json_list(tmp_path):
    rows = [
        BASE,
        {**BASE, "problem_id": "p1", "videos": ["b.mp4"], "problem": "Which?", "options": ["red", "green"],
         "answer": "green"},
        {**BASE, "problem_id": "p2", "problem_type": "numerical", "problem": "How many?", "answer": "3"},
        {**BASE, "problem_id": "p3", "problem_type": "free-form", "problem": "What happens?", "answer": "a dog runs"},
    ]
    jsonl = load_records(write_jsonl(tmp_path, rows)).records
    list_path = tmp_path / "qa.json"
    list_path.write_text(json.dumps(rows, indent=2))
    listed = load_records(str(list_path)).records
    assert [r.problem_id for r in jsonl] == [r.problem_id for r in listed] == ["p0", "p1", "p2", "p3"]
    assert [r.answer for r in jsonl] == ["B", "B", "3", "a dog runs"]
    assert jsonl[1].video == "b.mp4" and jsonl[1].question_text == "Which?\nA. red\nB. green"
    assert jsonl[0].question_text == BASE["problem"]
    # JSON-list records report the real line of the object's opening brace
    text = list_path.read_text().splitlines()
    for rec in listed:
        line = int(rec.source.rsplit(":", 1)[1])
        assert text[line - 1].strip() == "{"


@pytest.mark.parametrize("change,line_field,fragment", [
    ({"problem_type": "essay"}, "problem_type", "expected one of multiple choice, numerical, free-form"),
    ({"answer": "Q"}, "answer", "'Q' is not among the options A, B, C"),
    ({"problem": "No options here"}, "problem", "multiple-choice question without options"),
    ({"options": ["only one"]}, "options", "at least 2"),
    ({"problem_type": "numerical", "answer": "three"}, "answer", "numerical answer expected"),
    ({"videos": []}, "videos", "non-empty list"),
    ({"videos": ["a.mp4", 3]}, "videos", "expected a path string, got 3"),
    ({"videos": None}, "videos", "missing \\(a question without visual input needs data_type 'text'\\)"),
    ({"data_type": "image"}, "images", "missing"),
    ({"data_type": "text"}, "data_type", "'text' records have no videos, images or audios"),
    ({"data_type": "audio"}, "audios", "missing"),
    ({"data_type": "speech"}, "data_type", "expected one of video, image, audio, text"),
    ({"problem_id": ""}, "problem_id", "non-empty string"),
])
def test_bad_record_names_file_line_field(tmp_path, change, line_field, fragment):
    bad = {k: v for k, v in {**BASE, "problem_id": "bad", **change}.items() if v is not None}
    path = write_jsonl(tmp_path, [BASE, "", bad])
    with pytest.raises(RecordError, match=fragment) as e:
        load_records(path)
    assert str(e.value).startswith(f"{path}:3: bad record: field '{line_field}': ")
    skipped = load_records(path, on_error="skip")
    assert [r.problem_id for r in skipped.records] == ["p0"] and len(skipped.errors) == 1


def test_skip_mode_collects_every_error(tmp_path):
    rows = [BASE, "{oops", {**BASE, "problem_id": "p0"}, [1, 2], {**BASE, "problem_id": "p9"}]
    path = write_jsonl(tmp_path, rows)
    result = load_records(path, on_error="skip")
    assert [r.problem_id for r in result.records] == ["p0", "p9"]
    assert [(e.line, e.field) for e in result.errors] == [(2, None), (3, "problem_id"), (4, None)]
    assert "duplicate 'p0' (first at line 1)" in str(result.errors[1])
    with pytest.raises(RecordError, match=":2: bad record: invalid JSON"):
        load_records(path)


def test_require_reasoning_and_video_root(tmp_path):
    path = write_jsonl(tmp_path, [{k: v for k, v in BASE.items() if k != "reasoning"}])
    assert load_records(path).records[0].reasoning is None
    with pytest.raises(RecordError, match="field 'reasoning': missing"):
        load_records(path, require_reasoning=True)
    with pytest.raises(RecordError, match="field 'videos': video file not found"):
        load_records(path, video_root=str(tmp_path))


def test_caption_records(tmp_path):
    path = write_jsonl(tmp_path, [{"videos": "a.mp4", "caption": "A red disc."}, {"videos": "b.mp4"}])
    result = load_records(path, kind="caption", on_error="skip")
    assert result.records[0].caption == "A red disc." and result.records[0].id.endswith(":1")
    assert "field 'caption': missing" in str(result.errors[0])
    with pytest.raises(ValueError, match="on_error must be"):
        load_records(path, on_error="ignore")
