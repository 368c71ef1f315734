"""The Predictor shared by the generate verb, the experiments and the server: batch predictions, chunk seeding, and
streaming text that adds up to the batch prediction; and the checkpoint side of `generate`: a damaged checkpoint is
one line naming the file, and the fingerprints a resume compares."""

import dataclasses
import hashlib
import json
import shutil

import pytest
import torch

from flythinker import FlyThinker
from flythinker.data import DataConfig, Example
from flythinker.decoding import DecodeConfig
from flythinker.inference import (
    Predictor,
    checkpoint_fingerprint,
    data_fingerprint,
    decode_fingerprint,
    load_checkpoint,
    validate_checkpoint,
)
from flythinker.safeio import fingerprint
from flythinker.testing import tiny_lm, tiny_tokenizer
from flythinker.utils import UserError


def _predictor(**decode):
    tok = tiny_tokenizer()
    model = FlyThinker(tiny_lm("llama", seed=1), tiny_lm("llama", seed=2, num_layers=1), tokenizer=tok).eval()
    return Predictor(model, tok, DataConfig(retrieval="recency", k=1, profile_tokens=32, query_tokens=16),
                     DecodeConfig(max_new_tokens=8, batch_size=2, **decode))


def _examples(n=3):
    return [Example(id=f"e{i}", user_id="u", input=f"Write about album {i}.", output="ref",
                    profile=[{"text": f"Earlier review {i} of songs."}]) for i in range(n)]


def test_stream_pieces_add_up_to_the_batch_prediction():
    p = _predictor()
    exs = _examples()
    batch = p.predict(exs)
    assert len(batch) == 3 and all(isinstance(t, str) for t in batch)
    for ex, text in zip(exs, batch):
        pieces = list(p.stream(ex))
        assert "".join(pieces).strip() == text
        assert all(pieces)  # never an empty piece


def test_batch_fn_seeds_each_chunk_by_its_position():
    p = _predictor(do_sample=True, temperature=1.0, seed=5)
    exs = _examples(4)
    fn = p.batch_fn([e.id for e in exs])
    assert fn(exs[2:]) == p.predict(exs[2:], seed=6)  # chunk 1 of batch size 2 -> seed + 1
    torch.manual_seed(123)
    assert fn(exs[:2]) == p.predict(exs[:2], seed=5)


# ----------------------------------------------------------------------------------------------------------------
# the checkpoint side of `generate`: damaged checkpoints are one line naming the file; fingerprints


def _damaged(saved, tmp_path, damage):
    d = tmp_path / "ckpt"
    shutil.copytree(saved, d)
    damage(d)
    return d


def _cut(p, n):
    p.write_bytes(p.read_bytes()[:n])


@pytest.mark.parametrize("damage, expect", [
    (lambda d: _cut(d / "generator" / "model.safetensors", 5000), r"generator/model\.safetensors: damaged weights"),
    (lambda d: _cut(d / "reasoner" / "model.safetensors", 0), r"reasoner/model\.safetensors: damaged weights"),
    (lambda d: (d / "flythinker.json").write_text("{nope"), r"flythinker\.json: checkpoint config is not valid JSON"),
    (lambda d: (d / "flythinker.json").write_bytes(b"\x00\xff"), r"flythinker\.json: checkpoint config is binary"),
    (lambda d: (d / "flythinker.json").write_text('{"has_reasoner": true}'), r"flythinker\.json: no 'flythinker'"),
    (lambda d: (d / "flythinker.json").write_text("[1]"), r"flythinker\.json: checkpoint config must be a JSON obj"),
    (lambda d: (d / "flythinker.json").write_text('{"flythinker": {"bogus": 1}}'), r"flythinker\.json: .*bogus"),
    (lambda d: shutil.rmtree(d / "generator"), r"ckpt/generator: missing"),
    (lambda d: shutil.rmtree(d / "reasoner"), r"ckpt/reasoner: missing"),
    (lambda d: (d / "generator" / "model.safetensors").unlink(), r"ckpt/generator: no model weights"),
    (lambda d: (d / "generator" / "config.json").write_text("{x"), r"generator/config\.json: generator file is not"),
    (lambda d: (d / "generator" / "tokenizer.json").write_text("{x"), r"generator/tokenizer\.json: generator file"),
    (lambda d: (d / "train_config.json").write_bytes(b"\xff\xfe"), r"train_config\.json:1: not UTF-8"),
    (lambda d: (d / "train_config.json").write_text('"x"'), r"train_config\.json: checkpoint training config must"),
])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(saved, tmp_path, damage, expect):
    d = _damaged(saved, tmp_path, damage)
    with pytest.raises(UserError, match=expect):
        load_checkpoint(d)


def test_what_loading_still_raises_becomes_one_line(saved, monkeypatch):
    from flythinker.methods.flythinker.model import FlyThinker as F

    def broken(*a, **k):
        raise KeyError("weird")

    monkeypatch.setattr(F, "from_pretrained", classmethod(lambda cls, *a, **k: broken()))
    with pytest.raises(UserError, match=r"cannot load checkpoint .*ckpt: 'weird'"):
        load_checkpoint(saved)
    for missing in (saved.parent / "nope", saved / "flythinker.json"):
        with pytest.raises(UserError, match="not found|not a directory"):
            validate_checkpoint(missing)


def test_checkpoint_fingerprint_follows_the_content(saved, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    assert checkpoint_fingerprint(copy) == checkpoint_fingerprint(saved)  # another path, same model
    (copy / "training_state.pt").write_bytes(b"optimizer")  # not part of what predicts
    assert checkpoint_fingerprint(copy) == checkpoint_fingerprint(saved)
    FlyThinker(tiny_lm("llama", seed=9), tiny_lm("llama", seed=2, num_layers=1),
               tokenizer=tiny_tokenizer()).save_pretrained(copy)  # retrained in place
    assert checkpoint_fingerprint(copy) != checkpoint_fingerprint(saved)
    copy2 = tmp_path / "copy2"
    shutil.copytree(saved, copy2)
    (copy2 / "train_config.json").write_text(json.dumps({"data": {"k": 1}}))
    assert checkpoint_fingerprint(copy2) != checkpoint_fingerprint(saved)


def test_decode_and_data_fingerprints():
    greedy = decode_fingerprint(DecodeConfig(max_new_tokens=8))
    assert decode_fingerprint(DecodeConfig(max_new_tokens=8, temperature=0.3, top_p=0.5, seed=7)) == greedy
    assert decode_fingerprint(DecodeConfig(max_new_tokens=8, concurrent=False)) == greedy  # the backend
    for other in (DecodeConfig(max_new_tokens=9), DecodeConfig(max_new_tokens=8, batch_size=2),
                  DecodeConfig(max_new_tokens=8, do_sample=True)):
        assert decode_fingerprint(other) != greedy
    assert decode_fingerprint(DecodeConfig(max_new_tokens=8), "bfloat16") != greedy
    s1 = decode_fingerprint(DecodeConfig(do_sample=True, seed=1))
    assert s1 != decode_fingerprint(DecodeConfig(do_sample=True, seed=2))
    exs, cfg = _examples(), DataConfig(retrieval="recency")
    fp = data_fingerprint(exs, cfg)
    assert data_fingerprint(_examples(), DataConfig(retrieval="recency")) == fp
    assert data_fingerprint(exs, DataConfig(retrieval="recency", k=1)) != fp
    # training-only settings (the EOS after a cut target) render the same prompts: an earlier run's predictions
    # (recorded before the field existed) resume; the checkpoint fingerprint is what tells the models apart
    assert data_fingerprint(exs, DataConfig(retrieval="recency", eos_after_cut=False)) == fp
    before = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "eos_after_cut"}
    h = hashlib.sha256()
    for ex in exs:
        h.update(json.dumps(dataclasses.asdict(ex), sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    assert fingerprint({"examples": h.hexdigest(), "prompt": before}) == fp  # what a file written before says
    exs[1].output = "another reference"
    assert data_fingerprint(exs, cfg) != fp


def test_load_checkpoint_dispatches_on_the_saved_method(tmp_path):
    """`generate --checkpoint` loads each method's checkpoint with that method's `load` (a Coconut checkpoint is not
    read as its plain Generator)."""
    from flythinker.inference import checkpoint_method, load_checkpoint
    from flythinker.methods import ModelArgs, get_method

    coconut = get_method("coconut").from_lms(tiny_lm("llama", seed=1), None, ModelArgs(method="coconut"),
                                             tiny_tokenizer())
    coconut.save_pretrained(tmp_path / "coco")
    sft = FlyThinker(tiny_lm("llama", seed=1), None, tokenizer=tiny_tokenizer())
    sft.save_pretrained(tmp_path / "sft")
    assert checkpoint_method(tmp_path / "coco") == "coconut" and checkpoint_method(tmp_path / "sft") == "sft"
    model, _ = load_checkpoint(tmp_path / "coco", dtype="float32")
    assert type(model).__name__ == type(coconut).__name__
    assert type(load_checkpoint(tmp_path / "sft", dtype="float32")[0]) is FlyThinker
