"""`flythinker serve`'s settings: flags and YAML through the one config mechanism, the checkpoint's training data
settings layered under them, one-line errors, and loading a checkpoint or an untrained model for the service."""

from __future__ import annotations

import json

import pytest

from flythinker.cli.main import Parser
from flythinker.cli.serve import add_cli, main, serve_config
from flythinker.config import ConfigError
from flythinker.utils import UserError

from .conftest import scaled_tiny_model


def _args(*argv):
    p = Parser(prog="flythinker serve")
    add_cli(p)
    return p.parse_args(list(argv))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, _ = scaled_tiny_model()
    path = tmp_path_factory.mktemp("ckpt") / "my-model"
    model.save_pretrained(path)
    (path / "train_config.json").write_text(json.dumps({"data": {"retrieval": "recency", "k": 3,
                                                                  "profile_tokens": 300}}))
    return path


def test_flags_reach_the_nested_settings():
    cfg = serve_config(_args("--db", "sqlite:///x.db", "--port", "9001", "--host", "0.0.0.0",
                             "--data.retrieval", "none", "--decode.max_new_tokens", "32", "--decode.batch_size", "8",
                             "--limits.max_queue", "5", "--limits.request_timeout_s", "2.5",
                             "--model.reasoner", "3"))
    assert (cfg.db, cfg.port, cfg.host) == ("sqlite:///x.db", 9001, "0.0.0.0")
    assert cfg.data.retrieval == "none" and cfg.decode.max_new_tokens == 32 and cfg.decode.batch_size == 8
    assert cfg.limits.max_queue == 5 and cfg.limits.request_timeout_s == 2.5 and cfg.model.reasoner == "3"


def test_checkpoint_data_settings_sit_under_yaml_and_flags(checkpoint, tmp_path):
    cfg = serve_config(_args("--checkpoint", str(checkpoint)))
    assert (cfg.data.retrieval, cfg.data.k, cfg.data.profile_tokens) == ("recency", 3, 300)
    yaml = tmp_path / "serve.yaml"
    yaml.write_text("data:\n  k: 1\nlimits:\n  max_queue: 7\n")
    cfg = serve_config(_args("--checkpoint", str(checkpoint), "--config", str(yaml), "--data.profile_tokens", "99"))
    assert (cfg.data.retrieval, cfg.data.k, cfg.data.profile_tokens) == ("recency", 1, 99)
    assert cfg.limits.max_queue == 7


@pytest.mark.parametrize("argv,exc,fragment", [
    (["--checkpoint", "/no/such/dir"], UserError, "not a FlyThinker checkpoint"),
    (["--port", "70000"], ConfigError, "port"),
    (["--decode.max_new_tokens", "5000"], ConfigError, "exceeds limits.max_new_tokens"),
    (["--limits.max_queue", "0"], ConfigError, "limits.max_queue"),
    (["--batch_wait_ms", "nan"], ConfigError, "batch_wait_ms"),
    (["--data.retrieval", "magic"], ConfigError, "retrieval"),
    (["--dtype", "int8"], ConfigError, "dtype"),
    (["--batching", "eager"], ConfigError, "batching"),
])
def test_bad_settings_are_one_line_errors(argv, exc, fragment):
    with pytest.raises(exc, match=fragment):
        serve_config(_args(*argv))


def test_checkpoint_and_model_flags_conflict(checkpoint):
    with pytest.raises(UserError, match="not both"):
        serve_config(_args("--checkpoint", str(checkpoint), "--model.generator", "x"))


def test_main_reports_errors_in_one_line(capsys, tmp_path):
    assert main(["--help"]) == 0
    assert main(["--checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a FlyThinker checkpoint" in err[0]
    assert main(["--db", "mysql://u@h/d", "--checkpoint", ""]) == 2
    assert "unsupported database" in capsys.readouterr().err


def test_service_from_a_checkpoint(checkpoint, tmp_path):
    from flythinker.serving.service import Service

    cfg = serve_config(_args("--checkpoint", str(checkpoint), "--db", f"sqlite:///{tmp_path / 'db.sqlite'}",
                             "--decode.max_new_tokens", "4"))
    assert cfg.batching == "continuous"
    assert serve_config(_args("--batching", "wave")).batching == "wave"
    svc = Service.from_config(cfg)
    assert svc.name == "my-model" and svc.db.revision() == "0001_initial"
    assert svc.engine.batching == "continuous"
    svc.db.create_user("u", "k" * 64)
    i = svc.db.add_item("u", "an item")
    svc.start()
    try:
        p = svc.prepare("u", "write")
        assert p.retrieved == [i]
        _, done = svc.engine.generate(p.prompt_ids, 4)
        assert done.completion_tokens <= 4
    finally:
        svc.stop()
        svc.db.close()


def test_untrained_model_through_the_method_registry(tmp_path):
    from flythinker.serving.service import load_model
    from flythinker.testing import tiny_lm, tiny_tokenizer

    gen = tmp_path / "gen"
    tiny_lm("llama", seed=3).save_pretrained(gen)
    tiny_tokenizer().save_pretrained(gen)
    cfg = serve_config(_args("--model.generator", str(gen), "--model.reasoner", "1"))
    model, _, name = load_model(cfg)
    assert name == "flythinker-untrained" and model.reasoner is not None and not model.training
    cfg = serve_config(_args("--model.method", "sft", "--model.generator", str(gen)))
    model, _, name = load_model(cfg)
    assert name == "sft-untrained" and model.reasoner is None


def test_serve_model_method_cos_builds_the_steered_generator(tmp_path):
    """`flythinker serve --model.method cos` serves context steering (an untrained method ModelArgs alone refuses);
    other untrained methods are one-line errors naming the method."""
    from flythinker.methods.cos import CoSModel
    from flythinker.serving.service import Service, load_model
    from flythinker.testing import tiny_lm, tiny_tokenizer

    gen = tmp_path / "gen"
    tiny_lm("llama", seed=3).save_pretrained(gen)
    tiny_tokenizer().save_pretrained(gen)
    cfg = serve_config(_args("--model.method", "cos", "--model.generator", str(gen), "--model.cos.lam", "0.5",
                             "--db", f"sqlite:///{tmp_path / 'db.sqlite'}"))
    assert cfg.model.method == "cos"
    model, _, name = load_model(cfg)
    assert isinstance(model, CoSModel) and model.cos.lam == 0.5 and model.reasoner is None and not model.training
    assert name == "cos-untrained"
    svc = Service.from_config(cfg)
    try:
        assert svc.engine.batching == "continuous" and isinstance(svc.model, CoSModel)
    finally:
        svc.db.close()
    with pytest.raises(ConfigError, match="'rag' cannot be served") as e:
        serve_config(_args("--model.method", "rag"))
    assert "\n" not in str(e.value)
