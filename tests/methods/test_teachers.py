"""Reasoning-text teachers: the extractive analysis, the cache (reused, invalidated by a changed example, safe
against a torn line), the self teacher on a tiny model, and the endpoint teacher against a stub server and an
unreachable one."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from flythinker.config import ConfigError
from flythinker.data import DataConfig, Example
from flythinker.methods.teachers import (
    ExtractiveTeacher,
    SelfTeacher,
    TeacherCache,
    TeacherConfig,
    cache_next_to,
    cache_path,
    extractive_analysis,
    make_teacher,
    teacher_inputs,
    teacher_texts,
)
from flythinker.testing import tiny_lm
from flythinker.utils import UserError

DATA = DataConfig(k=2, profile_tokens=96, query_tokens=32, system_prompt="")


def _examples(n=3):
    return [Example(id=f"e{i}", user_id=f"u{i}", input=f"Write a review of album {i}",
                    output="A reference no teacher reads.", task="generic",
                    profile=[{"text": f"I loved this album because the melodies are warm. Track {i} is great!"},
                             {"text": "I loved this album because the lyrics are honest. Would I buy it again?"}])
            for i in range(n)]


class Counting(ExtractiveTeacher):
    def __init__(self):
        self.calls: list[list[str]] = []

    def generate(self, inputs):
        self.calls.append([i.example_id for i in inputs])
        return super().generate(inputs)


def test_extractive_analysis_is_a_short_deterministic_feature_summary():
    items = _examples(1)[0].profile
    text = extractive_analysis(items)
    assert text == extractive_analysis(items)
    sentences = [s for s in text.split(". ") if s]
    assert 2 <= len(sentences) <= 5 and text.endswith(".")
    assert "about 13 words" in text and '"i loved"' in text             # typical length, the shared opening
    assert '"i loved this"' in text and "positive" in text and "first person" in text
    assert "exclamation" in text and "2 sentences" in text               # tone markers, the closest item's shape
    empty = extractive_analysis([])
    assert empty.count(". ") == 1 and "No earlier writing" in empty


def test_cached_texts_are_reused_and_a_changed_example_invalidates_its_entry(tmp_path, tokenizer):
    cache = tmp_path / "t.jsonl"
    teacher = Counting()
    exs = _examples(3)
    first = teacher_texts(teacher, teacher_inputs(exs, tokenizer, DATA), cache)
    assert teacher.calls == [["e0", "e1", "e2"]] and len(cache.read_text().splitlines()) == 3
    again = teacher_texts(teacher, teacher_inputs(exs, tokenizer, DATA), cache)
    assert again == first and teacher.calls == [["e0", "e1", "e2"]]     # not asked again
    exs[1].output = "another reference"                                  # not read by the teacher: still cached
    exs[2].profile[0]["text"] = "Short and sad. The worst record I own."  # read by it: recomputed
    third = teacher_texts(teacher, teacher_inputs(exs, tokenizer, DATA), cache)
    assert teacher.calls[-1] == ["e2"] and third[:2] == first[:2] and third[2] != first[2]
    # the teacher's settings are part of the key
    other = Counting()
    other.VERSION = 2
    teacher_texts(other, teacher_inputs(exs, tokenizer, DATA), cache)
    assert other.calls == [["e0", "e1", "e2"]]


def test_cot_features_read_the_cache_instead_of_the_teacher(tmp_path, tokenizer, monkeypatch):
    from flythinker.methods.cot import CoT, CoTConfig

    calls = []
    real = ExtractiveTeacher.generate
    monkeypatch.setattr(ExtractiveTeacher, "generate", lambda self, inputs: calls.append(len(inputs)) or
                        real(self, inputs))
    method = CoT(CoTConfig(teacher=TeacherConfig(cache=str(tmp_path / "t.jsonl"))))
    a = method.features(_examples(2), tokenizer, DATA)
    b = method.features(_examples(2), tokenizer, DATA)
    assert a == b and calls == [2]
    # next to the data when the caller knows its path
    method = CoT()
    method.features(_examples(2), tokenizer, DATA, data_path=tmp_path / "train.jsonl")
    assert (tmp_path / "train.jsonl.teacher-extractive.cache").is_file() and calls == [2, 2]


def test_cache_survives_a_torn_last_line_and_refuses_a_foreign_file(tmp_path):
    p = tmp_path / "t.jsonl"
    c = TeacherCache(p)
    c.append([{"key": "a", "teacher": "x", "id": "1", "text": "one"}])
    with open(p, "ab") as f:
        f.write(b'{"key": "b", "te')                                     # a kill mid-append
    assert c.load() == {"a": "one"}
    c.append([{"key": "c", "teacher": "x", "id": "3", "text": "three"}])
    assert c.load() == {"a": "one", "c": "three"}
    assert p.read_text().count("\n") == 2
    foreign = tmp_path / "notes.jsonl"
    foreign.write_text('{"something": "else"}\n{"key": "a", "text": "x"}\n')
    with pytest.raises(UserError, match=r"notes.jsonl line 1: not a teacher cache entry"):
        TeacherCache(foreign).load()
    with pytest.raises(UserError, match="is a directory"):
        TeacherCache(tmp_path)


def test_cache_locations(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYTHINKER_CACHE", str(tmp_path / "fc"))
    assert cache_path(TeacherConfig(cache="none")) is None
    assert cache_path(TeacherConfig(cache=str(tmp_path / "x.jsonl"))) == tmp_path / "x.jsonl"
    assert cache_path(TeacherConfig(), tmp_path / "d" / "train.jsonl.gz") == \
        tmp_path / "d" / "train.jsonl.gz.teacher-extractive.cache"
    assert cache_path(TeacherConfig(name="self")) == tmp_path / "fc" / "teachers" / "self.jsonl"
    # never a data suffix, so a directory loader does not take the cache for data
    assert not cache_next_to(tmp_path / "train.jsonl", "self").name.endswith((".jsonl", ".json", ".gz"))


def test_teacher_settings_are_checked():
    with pytest.raises(ConfigError, match="teacher name"):
        TeacherConfig(name="oracle")
    with pytest.raises(ConfigError, match="max_tokens"):
        TeacherConfig(max_tokens=0)
    with pytest.raises(ConfigError, match="timeout"):
        TeacherConfig(timeout=0)
    with pytest.raises(UserError, match="teacher.url"):
        make_teacher(TeacherConfig(name="endpoint"))
    with pytest.raises(UserError, match="teacher.model"):
        make_teacher(TeacherConfig(name="endpoint", url="http://127.0.0.1:9/v1"))


def test_self_teacher_is_greedy_and_capped(tokenizer):
    lm = tiny_lm("llama", seed=5, max_positions=2048)
    teacher = SelfTeacher(TeacherConfig(name="self", max_tokens=6), lm=lm, tokenizer=tokenizer)
    inputs = teacher_inputs(_examples(2), tokenizer, DATA)
    texts = teacher.generate(inputs)
    assert texts == teacher.generate(inputs) and len(texts) == 2
    assert all(len(tokenizer.encode(t, add_special_tokens=False)) <= 8 for t in texts)
    assert teacher.settings()["max_tokens"] == 6 and "instruction" in teacher.settings()


class _Stub(BaseHTTPRequestHandler):
    bodies: ClassVar[list] = []

    def do_POST(self):  # http.server's name for the POST handler
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Stub.bodies.append(body)
        reply = json.dumps({"choices": [{"message": {"content": "  They write short,\n warm texts. "}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_endpoint_teacher_asks_an_openai_compatible_server(tokenizer, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cfg = TeacherConfig(name="endpoint", url=f"http://127.0.0.1:{server.server_port}/v1", model="m",
                            max_tokens=32, retries=0, cache=str(tmp_path / "t.jsonl"))
        texts = teacher_texts(make_teacher(cfg), teacher_inputs(_examples(2), tokenizer, DATA), cache_path(cfg))
    finally:
        server.shutdown()
        server.server_close()
    assert texts == ["They write short, warm texts."] * 2
    assert [b["model"] for b in _Stub.bodies] == ["m", "m"] and _Stub.bodies[0]["max_tokens"] == 32
    assert "album 0" in _Stub.bodies[0]["messages"][0]["content"] or \
        "album 0" in _Stub.bodies[1]["messages"][0]["content"]


def test_an_unreachable_endpoint_is_one_line_naming_the_url(tokenizer):
    cfg = TeacherConfig(name="endpoint", url="http://127.0.0.1:9/v1", model="m", retries=1, backoff=0.01, timeout=2)
    t0 = time.perf_counter()
    with pytest.raises(UserError) as e:
        teacher_texts(make_teacher(cfg), teacher_inputs(_examples(1), tokenizer, DATA))
    msg = str(e.value)
    assert "\n" not in msg and "http://127.0.0.1:9/v1/chat/completions" in msg and "2 attempt(s)" in msg
    assert msg.startswith("teacher endpoint") and "model.cot.teacher.url" in msg
    assert time.perf_counter() - t0 < 10
