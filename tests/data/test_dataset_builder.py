"""The reasoning-dataset builder against a scripted OpenAI-compatible server on 127.0.0.1.

Each caption carries a tag (``[good]``, ``[flaky]``, ``[slow]``, ...) that tells the server how to answer
requests about it: a good reply, an HTTP error first, a malformed or invalid reply, or no reply within
the client's timeout (the server waits on an event that teardown sets, so no test waits it out).
"""

from __future__ import annotations

import collections
import http.server
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import threading

import pytest

from megatron_longvideo.data.builder import (
    AttemptFailed,
    BuildConfig,
    ChatEndpoint,
    backoff_delay,
    build_dataset,
    extract_json_object,
    record_from_reply,
)
from megatron_longvideo.data.records import CaptionRecord, load_records

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TOOL = os.path.join(ROOT, "tools", "build_reasoning_dataset.py")
OPTIONS = "\nA. red\nB. green\nC. blue\nD. yellow"


def _question(tag: str, n: int, **changes) -> dict:
    q = {"problem": f"Which colour is the shape ({tag} #{n})?{OPTIONS}", "problem_type": "multiple choice",
         "reasoning": "A green disc is shown on the grey background, so the answer is B.", "answer": "B"}
    q.update(changes)
    return {k: v for k, v in q.items() if v is not None}


class ScriptedServer:
    """Requests seen, by tag, with the Authorization header and body of each."""

    def __init__(self):
        self.requests: list[tuple[str, str | None, dict]] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                tag = re.search(r"\[(\w+)\]", body["messages"][-1]["content"]).group(1)
                with server.lock:
                    server.requests.append((tag, self.headers.get("Authorization"), body))
                    n = server.count(tag)
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": f"no route {self.path}"})
                server.answer(self, tag, n)

            def _send(self, status, payload, headers=()):
                data = json.dumps(payload).encode()
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def reply(self, content: str):
                self._send(200, {"id": "x", "object": "chat.completion",
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def count(self, tag: str) -> int:
        return sum(t == tag for t, _, _ in self.requests)

    def counts(self) -> collections.Counter:
        with self.lock:
            return collections.Counter(t for t, _, _ in self.requests)

    def answer(self, h, tag: str, n: int):
        good = "```json\n" + json.dumps(_question(tag, n), indent=2) + "\n```"
        if tag == "prose":
            return h.reply("Here is the question:\n" + json.dumps(_question(tag, n)) + "\nHope this helps {:}")
        if tag == "flaky" and n == 1:
            return h._send(500, {"error": "overloaded"})
        if tag == "busy" and n <= 2:
            return h._send(429, {"error": "rate limited"}, headers=[("Retry-After", "7")] if n == 1 else [])
        if tag == "reject":
            return h._send(400, {"error": "bad request"})
        if tag == "slow" or (tag == "slowonce" and n == 1):
            self.release.wait(30)  # longer than any client timeout; teardown sets it
            return None
        if tag == "malformed":
            return h.reply("Sorry, I can only describe the video: a green disc appears.")
        if tag == "missing":
            return h.reply(json.dumps(_question(tag, n, reasoning=None)))
        if tag == "badletter":
            return h.reply(json.dumps(_question(tag, n, answer="E")))
        return h.reply(good)

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    s = ScriptedServer()
    yield s
    s.close()


def _captions(path, tags) -> str:
    with open(path, "w") as f:
        for i, tag in enumerate(tags):
            f.write(json.dumps({"id": f"c{i}", "data_type": "video", "videos": f"clip{i}.mp4",
                                "caption": f"A green disc on a grey background [{tag}]."}) + "\n")
    return str(path)


def _tool():
    spec = importlib.util.spec_from_file_location("build_reasoning_dataset", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_reply_parsing_and_validation():
    q = _question("good", 1)
    assert extract_json_object(json.dumps(q)) == q
    assert extract_json_object("```json\n" + json.dumps(q) + "\n```") == q
    assert extract_json_object("Sure {not json} here: " + json.dumps(q) + " -- done {}") == q
    for text in ("no json here", "[1, 2]", '{"problem": "cut off'):
        with pytest.raises(AttemptFailed) as e:
            extract_json_object(text)
        assert e.value.reason == "malformed reply" and not e.value.backoff
    cap = CaptionRecord(id="v7", video="v7.mp4", caption="x", source="caps.jsonl:1")
    rec = record_from_reply({**q, "answer": "B. green", "extra": 1}, cap, "v7-q0")
    assert rec == {"problem_id": "v7-q0", "data_type": "video", "videos": "v7.mp4", "problem": q["problem"],
                   "problem_type": "multiple choice", "reasoning": q["reasoning"], "answer": "B"}
    for bad, field in ((dict(answer="E"), "answer"), (dict(reasoning=None), "reasoning"),
                       (dict(problem="What colour?"), "problem"),
                       (dict(problem="How many?", problem_type="numerical", answer="2"), "problem_type")):
        with pytest.raises(AttemptFailed) as e:
            record_from_reply(_question("good", 1, **bad), cap, "v7-q0")
        assert e.value.reason == "invalid record" and f"'{field}'" in str(e.value)


def test_backoff_doubles_with_jitter_and_honours_retry_after():
    rng = random.Random(0)
    delays = [backoff_delay(r, base_s=1.0, max_s=30.0, rng=rng) for r in range(8)]
    for r, d in enumerate(delays):
        cap = min(30.0, 2.0 ** r)
        assert cap / 2 <= d <= cap
    assert backoff_delay(0, base_s=1.0, max_s=30.0, rng=rng, retry_after=7) == 7
    assert backoff_delay(0, base_s=1.0, max_s=30.0, rng=rng, retry_after=600) == 30


def test_cli_builds_retries_skips_and_resumes(server, tmp_path, capsys):
    tags = ["good", "flaky", "prose", "slowonce", "malformed", "missing", "badletter", "slow"]
    caps, out = _captions(tmp_path / "captions.jsonl", tags), str(tmp_path / "out" / "qa.jsonl")
    argv = ["--captions", caps, "--out", out, "--base-url", server.base_url, "--model", "m-test",
            "--api-key", "sk-test", "--timeout", "0.5", "--max-retries", "1", "--backoff", "0"]
    tool = _tool()

    assert tool.main(argv) == 0
    printed = capsys.readouterr()
    assert printed.out.splitlines()[0] == (f"{out}: built 4, resumed 0, skipped 4 "
                                           "(invalid record 2, malformed reply 1, timeout 1) from 8 captions")
    assert "c7-q0): timeout after 2 attempts" in printed.out and "c5-q0): invalid record after 2 attempts" in printed.out
    assert "sk-test" not in printed.out + printed.err
    records = load_records(out, kind="qa", require_reasoning=True).records
    assert [(r.problem_id, r.video, r.answer) for r in records] == [
        (f"c{i}-q0", f"clip{i}.mp4", "B") for i in range(4)]
    assert "(flaky #2)" in records[1].problem  # the reply after the 500
    assert "(slowonce #2)" in records[3].problem  # the reply after the timeout
    # One request per good caption; two (one re-ask, --max-retries 1) for each failing first.
    assert server.counts() == {"good": 1, "prose": 1, "flaky": 2, "slowonce": 2, "malformed": 2, "missing": 2,
                               "badletter": 2, "slow": 2}
    assert {auth for _, auth, _ in server.requests} == {"Bearer sk-test"}
    assert {body["model"] for _, _, body in server.requests} == {"m-test"}

    before, written = server.counts(), open(out, "rb").read()
    assert tool.main(argv) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith(f"{out}: built 0, resumed 4, skipped 4 ")
    assert open(out, "rb").read() == written
    after = server.counts()
    assert all(after[t] == before[t] for t in tags[:4])  # nothing built is asked for again

    with open(out, "r+b") as f:  # a run killed in the middle of writing the last record
        f.truncate(len(written) - 25)
    assert tool.main([*argv, "--limit", "4"]) == 0
    printed = capsys.readouterr()
    assert f"{out}:4: removed an incomplete last record" in printed.err
    assert printed.out.splitlines()[0] == f"{out}: built 1, resumed 3, skipped 0 from 4 captions"
    repaired = load_records(out, kind="qa").records
    assert [r.problem_id for r in repaired] == [f"c{i}-q0" for i in range(4)]
    assert "(slowonce #3)" in repaired[3].problem and server.counts()["slowonce"] == after["slowonce"] + 1


def test_backoff_non_retryable_and_several_questions_per_clip(server, tmp_path):
    caps, out = _captions(tmp_path / "captions.jsonl", ["busy", "reject", "good"]), str(tmp_path / "qa.jsonl")
    slept = []
    endpoint = ChatEndpoint(base_url=server.base_url + "/", model="m", timeout_s=5.0)
    config = BuildConfig(questions_per_clip=2, max_retries=3, backoff_s=1.0, workers=2)
    summary = build_dataset(caps, out, endpoint, config, sleep=slept.append, log=pytest.fail)
    assert (summary.num_built, summary.num_resumed, summary.skipped) == (4, 0, {"HTTP 400": 2})
    assert "caption" in summary.summary() and "HTTP 400 from" in summary.messages[0]
    assert slept[0] == 7 and 1 <= slept[1] <= 2  # Retry-After, then the doubled backoff
    ids = [r.problem_id for r in load_records(out, kind="qa").records]
    assert ids == ["c0-q0", "c0-q1", "c2-q0", "c2-q1"]  # the captions' order, with 2 workers
    assert server.counts() == {"busy": 4, "reject": 2, "good": 2}
    assert {auth for _, auth, _ in server.requests} == {None}
    good = [body["messages"][-1]["content"] for t, _, body in server.requests if t == "good"]
    assert "question 2 of 2" in good[1] and "(good #1)" in good[1] and "question 2" not in good[0]


def test_bad_input_exits_2_naming_the_file(tmp_path, capsys):
    tool = _tool()
    base = ["--base-url", "http://127.0.0.1:9/v1", "--model", "m"]
    missing = str(tmp_path / "nope.jsonl")
    assert tool.main(["--captions", missing, "--out", str(tmp_path / "o.jsonl"), *base]) == 2
    assert capsys.readouterr().err.strip() == f"build_reasoning_dataset: error: {missing}: captions file not found"
    caps = _captions(tmp_path / "captions.jsonl", ["good"])
    out = tmp_path / "o.jsonl"
    out.write_text('{"problem_id": "a"}\nnot json\n{"problem_id": "b"}\n')
    assert tool.main(["--captions", caps, "--out", str(out), *base]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out}:2: bad record" in err[0]
    with pytest.raises(SystemExit) as e:
        tool.main(["--captions", caps, "--out", str(out), *base, "--questions-per-clip", "0"])
    assert e.value.code == 2 and "--questions-per-clip must be >= 1" in capsys.readouterr().err


def test_script_in_a_subprocess(server, tmp_path):
    caps, out = _captions(tmp_path / "captions.jsonl", ["good", "flaky"]), str(tmp_path / "qa.jsonl")
    env = {**os.environ, "OPENAI_API_KEY": "sk-env", "no_proxy": "*", "NO_PROXY": "*"}
    proc = subprocess.run([sys.executable, TOOL, "--captions", caps, "--out", out, "--base-url", server.base_url,
                           "--model", "m", "--backoff", "0"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{out}: built 2, resumed 0, skipped 0 from 2 captions"
    assert "sk-env" not in proc.stdout + proc.stderr
    assert {auth for _, auth, _ in server.requests} == {"Bearer sk-env"} and server.counts()["flaky"] == 2
    assert len(load_records(out, kind="qa").records) == 2
