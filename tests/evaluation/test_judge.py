"""The LLM judge against a fake OpenAI-compatible server on 127.0.0.1 (http.server in a thread; no network)."""

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from flythinker.evaluation.judge import RUBRIC, JudgeConfig, build_prompt, judge, normalize_score, parse_score
from flythinker.utils import UserError


class FakeServer:
    """Answers POST /v1/chat/completions. `reply(body) -> (status, text)` decides each answer; requests are kept."""

    def __init__(self, reply):
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, **body})
                outer.headers.append(dict(self.headers))
                status, text = reply(body)
                if status == "sleep":
                    time.sleep(text)
                    status, text = 200, "3"
                payload = (json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})
                           if status == 200 else text).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and hung up first
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _score_by_content(body):
    prompt = body["messages"][0]["content"]
    pred = prompt.split("[LLM-generated response]:")[1].split("[Score]:")[0]
    return 200, ("5" if "warm" in pred else "Score: 2" if "bad" in pred else "I cannot tell")


def test_rubric_prompt_holds_the_paper_template():
    p = build_prompt("Write a review.", "I loved the warm album.", "A warm record.")
    assert p.startswith("You are an impartial evaluator")
    for i in range(1, 6):
        assert f"[Score {i}]:" in p
    assert "[Instruction]: Write a review.\n[User's real response]: I loved the warm album.\n" \
           "[LLM-generated response]: A warm record.\n[Score]:" in p
    assert "Output the numerical score only" in RUBRIC


def test_parse_and_normalize():
    assert [parse_score(t) for t in ["4", " Score: 5\n", "3/5", "10", "4.5", "none", "0"]] == \
        [4, 5, 3, None, None, None, None]
    assert normalize_score(1, "minmax") == 0.0 and normalize_score(5, "minmax") == 1.0
    assert normalize_score(3, "minmax") == 0.5 and normalize_score(3, "div5") == 0.6
    assert math.isnan(normalize_score(math.nan))


def test_judge_against_fake_server(monkeypatch):
    monkeypatch.setenv("FLYTHINKER_JUDGE_API_KEY", "test-token")
    with FakeServer(_score_by_content) as srv:
        cfg = JudgeConfig(url=srv.url, model="fake-judge", timeout=5, workers=2)
        res = judge(cfg, ["a warm album", "a bad album", "something else"], ["ref one", "ref two", "ref three"],
                    ["Write A", "Write B", None])
    assert res.scores[:2] == [5.0, 2.0] and math.isnan(res.scores[2])
    assert res.normalized[:2] == [1.0, 0.25]
    assert res.n == 2 and res.unparsed == 1
    assert res.mean_raw == 3.5 and res.mean_normalized == pytest.approx(0.625)
    assert len(srv.requests) == 3
    req = srv.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["model"] == "fake-judge" and req["temperature"] == 0.0
    assert req["messages"][0]["role"] == "user"
    assert all(h.get("Authorization") == "Bearer test-token" for h in srv.headers)
    prompts = sorted(r["messages"][0]["content"] for r in srv.requests)
    assert any("[Instruction]: (not available)" in p for p in prompts)


def test_div5_normalization():
    with FakeServer(lambda body: (200, "4")) as srv:
        res = judge(JudgeConfig(url=srv.url + "/", model="m", normalize="div5"), ["x"], ["y"])
    assert res.normalized == [0.8] and res.mean_raw == 4.0


def test_server_error_retries_then_clear_error():
    with FakeServer(lambda body: (500, '{"error": "boom"}')) as srv:
        cfg = JudgeConfig(url=srv.url, model="m", retries=2, backoff=0.01, workers=1)
        with pytest.raises(UserError, match=r"judge endpoint http://127\.0\.0\.1:\d+/v1/chat/completions failed "
                                            r"after 3 attempt\(s\): HTTP 500") as e:
            judge(cfg, ["x"], ["y"])
    assert len(srv.requests) == 3 and "\n" not in str(e.value)


def test_client_error_is_not_retried():
    with FakeServer(lambda body: (404, '{"error": "model not found"}')) as srv, \
            pytest.raises(UserError, match="HTTP 404.*model not found"):
        judge(JudgeConfig(url=srv.url, model="nope", retries=3, backoff=0.01), ["x"], ["y"])
    assert len(srv.requests) == 1


def test_timeout_is_a_clear_error():
    with FakeServer(lambda body: ("sleep", 1.0)) as srv, pytest.raises(UserError, match="timed out after 0.2s"):
        judge(JudgeConfig(url=srv.url, model="m", timeout=0.2, retries=0), ["x"], ["y"])


def test_refused_connection_is_a_clear_error():
    with FakeServer(lambda body: (200, "3")) as srv:
        url = srv.url
    # the server is closed now: nothing listens on that port
    with pytest.raises(UserError, match="failed after 1 attempt"):
        judge(JudgeConfig(url=url, model="m", retries=0, timeout=2), ["x"], ["y"])


def test_not_a_chat_completion_reply():
    def raw(body):
        return 201, "<html>not json</html>"  # a 2xx that is not an OpenAI completion

    with FakeServer(raw) as srv, pytest.raises(UserError, match="unexpected reply"):
        judge(JudgeConfig(url=srv.url, model="m", retries=0), ["x"], ["y"])


def test_config_errors():
    with pytest.raises(UserError, match="--judge-model"):
        JudgeConfig(url="http://127.0.0.1:1/v1", model="")
    with pytest.raises(UserError, match="normalize"):
        JudgeConfig(url="http://127.0.0.1:1/v1", model="m", normalize="other")


def test_evaluate_with_judge(tmp_path):
    from flythinker.cli.main import main

    rows_a = [{"id": f"e{i}", "prediction": "a bad text", "reference": "ref", "input": "Write."} for i in range(4)]
    rows_b = [{"id": f"e{i}", "prediction": "a warm text", "reference": "ref", "input": "Write."} for i in range(4)]
    for name, rows in (("sft", rows_a), ("fly", rows_b)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with FakeServer(_score_by_content) as srv:
        rc = main(["evaluate", str(tmp_path / "sft.jsonl"), str(tmp_path / "fly.jsonl"), "--out",
                   str(tmp_path / "out"), "--metrics", "rouge1", "--segments", "none", "--judge-url", srv.url,
                   "--judge-model", "fake", "--n-boot", "50"])
    assert rc == 0
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert data["methods"]["sft"]["metrics"]["judge"] == 0.25 and data["methods"]["fly"]["metrics"]["judge"] == 1.0
    assert data["methods"]["fly"]["judge"]["mean_raw"] == 5.0
    d = data["comparisons"]["vs_baseline"]["fly"]["judge"]
    assert d["diff"] == d["lo"] == d["hi"] == 0.75
    md = (tmp_path / "out" / "report.md").read_text()
    assert "LLM judge" in md and "(s−1)/4" in md


def test_evaluate_judge_from_config_with_flag_override(tmp_path):
    from flythinker.cli.main import main

    rows_a = [{"id": f"e{i}", "prediction": "a bad text", "reference": "ref", "input": "Write."} for i in range(3)]
    rows_b = [{"id": f"e{i}", "prediction": "a warm text", "reference": "ref", "input": "Write."} for i in range(3)]
    for name, rows in (("sft", rows_a), ("fly", rows_b)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with FakeServer(_score_by_content) as srv:
        cfg = tmp_path / "eval.yaml"
        cfg.write_text(f"metrics: [rouge1]\nsegments: none\nn_boot: 20\n"
                       f"judge:\n  url: {srv.url}\n  model: fake\n  normalize: minmax\n  workers: 1\n")
        rc = main(["evaluate", str(tmp_path / "sft.jsonl"), str(tmp_path / "fly.jsonl"), "--out",
                   str(tmp_path / "out"), "--config", str(cfg), "--judge-normalize", "div5"])
    assert rc == 0
    assert len(srv.requests) == 6 and srv.requests[0]["model"] == "fake"
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert data["info"]["judge"]["normalize"] == "div5"  # the flag overrides the YAML
    assert data["methods"]["sft"]["metrics"]["judge"] == pytest.approx(0.4)
    assert data["methods"]["fly"]["metrics"]["judge"] == 1.0


def test_empty_predictions_are_not_sent_and_get_the_lowest_score():
    with FakeServer(lambda body: (200, "4")) as srv:
        res = judge(JudgeConfig(url=srv.url, model="m", workers=1), ["a text", "  ", None, ""], ["r"] * 4)
    assert len(srv.requests) == 1
    assert res.scores == [4.0, 1.0, 1.0, 1.0] and res.normalized == [0.75, 0.0, 0.0, 0.0]
    assert res.empty == 3 and res.n == 4 and res.unparsed == 0 and res.mean_normalized == pytest.approx(0.1875)
    with FakeServer(lambda body: (200, "4")) as srv:
        res = judge(JudgeConfig(url=srv.url, model="m", normalize="div5"), [""], ["r"])
    assert srv.requests == [] and res.normalized == [0.2]  # the rubric's floor on the div5 scale


def test_a_failing_judge_cancels_the_requests_not_yet_sent():
    with FakeServer(lambda body: (404, '{"error": "no such model"}')) as srv, \
            pytest.raises(UserError, match="HTTP 404"):
        judge(JudgeConfig(url=srv.url, model="m", workers=1, retries=0), [f"p{i}" for i in range(20)], ["r"] * 20)
    assert len(srv.requests) == 1  # not 20: with one worker, the first failure ends the run before another is sent


@pytest.mark.parametrize("kw,match", [
    ({"url": "127.0.0.1:8000/v1"}, "not an http"),
    ({"url": "ftp://host/v1"}, "not an http"),
    ({"timeout": float("nan")}, "timeout must be a finite number > 0"),
    ({"timeout": 0}, "timeout must be a finite number > 0"),
    ({"backoff": float("inf")}, "backoff must be a finite"),
    ({"temperature": float("nan")}, "temperature must be a finite"),
    ({"retries": -1}, "retries must be an integer >= 0"),
    ({"workers": 0}, "workers must be an integer >= 1"),
    ({"max_tokens": 0}, "max_tokens must be"),
])
def test_bad_settings_are_refused_before_any_request(kw, match):
    with pytest.raises(UserError, match=match):
        JudgeConfig(**{"url": "http://127.0.0.1:9/v1", "model": "m", **kw})


def test_evaluate_unreachable_judge_is_one_line_and_writes_nothing(tmp_path, capsys):
    """Nothing listens on 127.0.0.1:9: one error line naming the endpoint, before any metric or file."""
    from flythinker.cli.main import main

    rows = [{"id": f"e{i}", "prediction": "a text", "reference": "ref"} for i in range(6)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("judge:\n  url: http://127.0.0.1:9/v1\n  model: m\n  retries: 0\n  timeout: 5\n")
    t0 = time.perf_counter()
    rc = main(["evaluate", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "out"), "--config", str(cfg),
               "--metrics", "rouge1", "--segments", "none"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "Traceback" not in err
    assert "judge endpoint http://127.0.0.1:9/v1/chat/completions failed after 1 attempt(s)" in err
    assert not (tmp_path / "out").exists() and time.perf_counter() - t0 < 30


def test_evaluate_judge_scores_empty_predictions_zero_paired_with_the_others(tmp_path):
    from flythinker.evaluation.report import EvalConfig, run_evaluation

    rows_a = [{"id": f"e{i}", "prediction": "a warm text", "reference": "ref"} for i in range(4)]
    rows_b = [{"id": f"e{i}", "prediction": "a warm text" if i < 2 else "", "reference": "ref"} for i in range(4)]
    for name, rows in (("full", rows_a), ("half", rows_b)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with FakeServer(_score_by_content) as srv:
        cfg = EvalConfig(metrics=("rouge1",), segments=None, n_boot=50,
                         judge=JudgeConfig(url=srv.url, model="fake", workers=1))
        rep = run_evaluation([tmp_path / "full.jsonl", tmp_path / "half.jsonl"], tmp_path / "out", cfg)
    assert len(srv.requests) == 6  # 4 + the 2 non-empty ones
    assert rep.methods["half"]["metrics"]["judge"] == 0.5 and rep.methods["half"]["judge"]["empty"] == 2
    assert rep.scores["half"].per_example["judge"].tolist() == [1.0, 1.0, 0.0, 0.0]
    d = rep.comparisons["vs_baseline"]["half"]["judge"]
    assert d["n"] == 4 and d["diff"] == -0.5
