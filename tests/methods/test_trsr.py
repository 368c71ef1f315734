"""LLM-TRSR: the summary goes into the prompt before the history and the query, training and decoding see the same
prompt ids, summaries are cached and model teachers are asked for a summary, the trainer trains it, save/load."""

import dataclasses
import json

import pytest
import torch

from flythinker.data import DataConfig
from flythinker.data.collate import encode_example
from flythinker.data.prompts import HISTORY_HEADERS
from flythinker.decoding.sampling import DecodeConfig
from flythinker.inference import Predictor, decode_new_tokens
from flythinker.methods import METHODS, ModelArgs
from flythinker.methods.configs import TRSRConfig
from flythinker.methods.teachers import TeacherConfig, extractive_analysis
from flythinker.methods.trsr import SUMMARY_INSTRUCTION, TRSR, TRSRModel, summary_message, summary_texts
from flythinker.testing import tiny_lm

from .test_cot import _examples

DATA = DataConfig(k=1, profile_tokens=96, min_item_tokens=16, query_tokens=32, target_tokens=24, system_prompt="")




def _cfg(tmp_path, **kw):
    return TRSRConfig(summary_tokens=80, summary_k=3, teacher=TeacherConfig(cache=str(tmp_path / "t.jsonl")), **kw)


def test_the_summary_precedes_the_history_and_the_query_and_the_response_is_sfts(tokenizer, tmp_path):
    cfg = _cfg(tmp_path)
    examples = _examples(2)
    feats = TRSR(cfg).features(examples, tokenizer, DATA)
    for ex, f in zip(examples, feats):
        sft = encode_example(ex, tokenizer, DATA, with_response=True)
        assert f["response_ids"] == sft["response_ids"]                       # supervised exactly as SFT
        text = tokenizer.decode(f["prompt_ids"])
        summary = summary_texts([ex], tokenizer, DATA, cfg)[0]
        assert summary and text.index(cfg.header) < text.index(summary) < text.index(HISTORY_HEADERS["generic"]) \
            < text.index(ex.input)
        # the extractive teacher read summary_k = 3 items although the prompt shows k = 1
        assert extractive_analysis(ex.profile[:3]).startswith(summary.rstrip(".")[:30])
        assert "3 shown past texts" in summary
        assert len(tokenizer.encode(summary, add_special_tokens=False)) <= cfg.summary_tokens
    assert summary_message("", "user text", cfg) == "user text"


def test_decoding_sees_the_training_prompt_and_summaries_are_cached(tokenizer, tmp_path):
    cfg = _cfg(tmp_path)
    examples = _examples(3)
    feats = TRSR(cfg).features(examples, tokenizer, DATA)
    cache = tmp_path / "t.jsonl"
    lines = cache.read_text().splitlines()
    assert len(lines) == 3                       # one entry per example (its query is part of what is read)
    model = TRSRModel(tiny_lm("llama", seed=1, max_positions=1024), cfg, tokenizer=tokenizer)
    enc = model.encode_prompts(examples, tokenizer, DATA)
    for row, mask, f in zip(enc["input_ids"], enc["attention_mask"], feats):
        assert row[mask.bool()].tolist() == f["prompt_ids"]                    # left-padded, same ids
    assert cache.read_text().splitlines() == lines                            # decoding reused the cache
    preds = Predictor(model, tokenizer, DATA, DecodeConfig(max_new_tokens=4, batch_size=3)).predict(examples)
    eos = [tokenizer.eos_token_id]
    direct = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=4,
                            eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, seed=0)
    assert preds == [decode_new_tokens(r, tokenizer, eos) for r in direct.tolist()]


def test_model_teachers_are_asked_for_a_summary(tokenizer, tmp_path, monkeypatch):
    from flythinker.methods import teachers

    seen = {}

    class Fake:
        name, batch_size = "self", 8

        def settings(self):
            return {"name": "self", "instruction": seen["instruction"]}

        def generate(self, inputs):
            seen["messages"] = [i.message for i in inputs]
            return ["They   write short, warm reviews.  Always positive."] * len(inputs)

    def fake_make_teacher(cfg, generator="default", lm=None, tokenizer=None, instruction=""):
        seen.update(instruction=instruction, generator=generator)
        return Fake()

    monkeypatch.setattr(teachers, "make_teacher", fake_make_teacher)
    cfg = TRSRConfig(summary_k=2, teacher=TeacherConfig(name="self", cache="none"))
    out = summary_texts(_examples(1), tokenizer, DATA, cfg, generator="my-base")
    assert seen["instruction"] == SUMMARY_INSTRUCTION and seen["generator"] == "my-base"
    assert out == ["They write short, warm reviews. Always positive."]        # whitespace collapsed
    assert seen["messages"][0].count("[") == 2                                  # the teacher saw summary_k items


def test_the_trainer_trains_it(tokenizer, tmp_path):
    from flythinker.training.config import TrainArgs
    from flythinker.training.loop import fit

    cfg = _cfg(tmp_path)
    margs = dataclasses.replace(ModelArgs(method="trsr"), trsr=cfg)            # what the runner passes both
    method = METHODS["trsr"]
    feats = method.features(_examples(4), tokenizer, DATA, args=margs)
    model = method.from_lms(tiny_lm("llama", seed=1, max_positions=1024), None, margs, tokenizer)
    args = TrainArgs(out_dir=str(tmp_path / "run"), batch_size=2, grad_accum=1, lr_generator=1e-2, max_steps=6,
                     warmup_ratio=0.0, schedule="constant", progress=False, save_final=True)
    res = fit(model, feats, args, tokenizer.pad_token_id)
    assert res.steps == 6 and res.losses[-1] < 0.8 * res.losses[0]
    loaded = METHODS["trsr"].load(res.final_dir)
    assert isinstance(loaded, TRSRModel) and loaded.trsr == cfg


def test_save_and_load_round_trip(tokenizer, tmp_path):
    from flythinker import FlyThinker
    from flythinker.inference import checkpoint_method, validate_checkpoint

    cfg = _cfg(tmp_path, header="About this user:")
    model = TRSRModel(tiny_lm("llama", seed=4, max_positions=1024), cfg, tokenizer=tokenizer,
                      teacher_generator="base-dir")
    enc = model.encode_prompts(_examples(2), tokenizer, DATA)
    kw = {"max_new_tokens": 5, "eos_token_id": [], "pad_token_id": tokenizer.pad_token_id}
    before = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
    model.save_pretrained(tmp_path / "ckpt")
    validate_checkpoint(tmp_path / "ckpt")
    assert checkpoint_method(tmp_path / "ckpt") == "trsr"
    loaded = TRSR().load(tmp_path / "ckpt")
    assert loaded.trsr == cfg and loaded.teacher_generator == "base-dir"
    enc2 = loaded.encode_prompts(_examples(2), tokenizer, DATA)
    assert torch.equal(enc2["input_ids"], enc["input_ids"])
    assert torch.equal(loaded.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kw), before)
    meta = json.loads((tmp_path / "ckpt" / "flythinker.json").read_text())
    assert meta["method"] == "trsr" and meta["trsr"]["config"]["header"] == "About this user:"
    FlyThinker(tiny_lm("llama", seed=4), None, tokenizer=tokenizer).save_pretrained(tmp_path / "sft")
    with pytest.raises(ValueError, match="no 'trsr' section"):
        TRSRModel.from_pretrained(tmp_path / "sft")


def test_settings_are_checked_and_nest_in_model_args():
    from flythinker.config import ConfigError, from_dict

    args = from_dict(ModelArgs, {"method": "trsr", "trsr": {"summary_k": 0, "teacher": {"name": "self"}}})
    assert args.trsr.summary_k == 0 and args.trsr.teacher.name == "self"
    assert METHODS["trsr"].model_args(dataclasses.replace(args, method="sft")).method == "trsr"
    for bad in ({"summary_tokens": 0}, {"summary_k": -1}, {"teacher": {"name": "oracle"}}):
        with pytest.raises(ConfigError):
            from_dict(ModelArgs, {"method": "trsr", "trsr": bad})
