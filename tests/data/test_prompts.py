"""Token budgets (never cut what fits, sentence boundaries, hard cuts), profile selection order (bm25, recency,
seeded random, ties), query extraction per task, prompt rendering (chat template / plain text), encoding and
collation (labels -100 on the prompt, response mask, left/right padding), and the Dataset wrapper."""

import dataclasses

import pytest
import torch

from flythinker.data import (
    IGNORE_INDEX,
    DataConfig,
    Example,
    PersonalizedDataset,
    build_prompt,
    collate,
    count_tokens,
    encode_example,
    query_text,
    select_profile,
    truncate_to_tokens,
)
from flythinker.data.prompts import render_profile, user_message
from flythinker.data.truncate import share_budget
from flythinker.testing import tiny_tokenizer

S1 = "The user writes long reviews about music."
S2 = "I loved this album because the melodies are warm."
S3 = "Overall, the sound is great and the vocals are clear."


def ex(profile=(), input="Write a review about the album.", output="Great album. I loved it.", id="e1",
       task="generic", user="u1"):
    return Example(id=id, user_id=user, input=input, output=output, profile=[dict(p) for p in profile], task=task)


# ----------------------------------------------------------------------------------------------------------------
# truncation


def test_text_that_fits_is_never_cut(tokenizer):
    text = f"{S1} {S2} {S3}  \n"
    n = count_tokens(text, tokenizer)
    assert truncate_to_tokens(text, tokenizer, n) == text          # exactly at the budget: untouched
    assert truncate_to_tokens(text, tokenizer, n + 50) == text
    assert truncate_to_tokens("", tokenizer, 5) == ""


def test_cut_at_the_last_sentence_boundary_that_fits(tokenizer):
    text = f"{S1} {S2} {S3}"
    two = count_tokens(f"{S1} {S2}", tokenizer)
    assert truncate_to_tokens(text, tokenizer, two) == f"{S1} {S2}"
    assert truncate_to_tokens(text, tokenizer, count_tokens(text, tokenizer) - 1) == f"{S1} {S2}"
    assert truncate_to_tokens(text, tokenizer, two - 1) == S1
    # paragraph breaks are sentence boundaries too; the kept prefix is verbatim text
    para = f"First paragraph without a stop\n\n{S2}"
    assert truncate_to_tokens(para, tokenizer, count_tokens(para, tokenizer) - 1) == "First paragraph without a stop"


def test_line_breaks_are_a_fallback_inside_long_sentences(tokenizer):
    text = "this wrapped sentence goes on\nand on across lines\nuntil it finally ends."
    budget = count_tokens("this wrapped sentence goes on\nand on across lines", tokenizer)
    assert truncate_to_tokens(text, tokenizer, budget) == "this wrapped sentence goes on\nand on across lines"


def test_hard_cut_when_the_first_sentence_is_too_long(tokenizer):
    text = "a very long first sentence without any stop that keeps going and going " * 3 + ". Short."
    for budget in (1, 5, 17):
        cut = truncate_to_tokens(text, tokenizer, budget)
        assert text.startswith(cut) and cut
        assert budget - 2 <= count_tokens(cut, tokenizer) <= budget
    assert truncate_to_tokens(text, tokenizer, 0) == ""
    uni = "é" * 40
    cut = truncate_to_tokens(uni, tokenizer, 7)
    assert uni.startswith(cut) and count_tokens(cut, tokenizer) <= 7


def test_share_budget_water_filling():
    assert share_budget([10, 100, 100], 110) == [10, 50, 50]
    assert share_budget([10, 20], 100) == [10, 20]
    assert share_budget([300, 30, 300], 200) == [85, 30, 85]
    assert sum(share_budget([7, 9, 1000, 3], 50)) <= 50


def test_profile_budget_is_shared_and_short_items_stay_whole(tokenizer):
    long_text = " ".join([S1, S2, S3] * 8)
    items = [{"text": long_text}, {"text": S1}, {"text": long_text}]
    cfg = DataConfig(profile_tokens=120, min_item_tokens=16)
    out = render_profile(items, "generic", tokenizer, cfg)
    assert len(out) == 3 and out[1] == f"[2] {S1}"
    assert sum(count_tokens(r, tokenizer) for r in out) <= 120
    assert out[0].endswith(".") and out[2].endswith(".")          # sentence boundaries, not mid-word
    # min_item_tokens caps how many items share the budget: best-ranked first
    few = render_profile(items, "generic", tokenizer, DataConfig(profile_tokens=120, min_item_tokens=60))
    assert len(few) == 2 and few[1] == f"[2] {S1}"


def test_label_line_is_kept_when_text_is_cut(tokenizer):
    items = [{"title": "A title", "text": " ".join([S1, S2, S3] * 5)}]
    budget = count_tokens("[1] A title\n" + S1, tokenizer) + 2
    (out,) = render_profile(items, "generic", tokenizer, DataConfig(profile_tokens=budget, min_item_tokens=1))
    assert out == f"[1] A title\n{S1}"


def test_query_and_target_budgets(tokenizer):
    long_input = " ".join([S1, S2, S3] * 20)
    long_output = " ".join([S3, S2] * 40)
    cfg = DataConfig(query_tokens=30, target_tokens=40, retrieval="none", use_chat_template=False, system_prompt="")
    e = ex(input=long_input, output=long_output)
    assert user_message(e, tokenizer, cfg) == truncate_to_tokens(long_input, tokenizer, 30)
    feat = encode_example(e, tokenizer, cfg)
    assert len(feat["response_ids"]) <= 41 and feat["response_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(feat["response_ids"][:-1]) == truncate_to_tokens(long_output, tokenizer, 40)


# ----------------------------------------------------------------------------------------------------------------
# retrieval


PROFILE = [
    {"id": "p0", "text": "Cooking pasta tonight with fresh basil."},
    {"id": "p1", "text": "The jazz album has warm saxophone solos."},
    {"id": "p2", "text": "Gardening tips for tomatoes."},
    {"id": "p3", "text": "Another jazz album review: saxophone and piano."},
]


def test_bm25_ranks_relevant_items_first(tokenizer):
    e = ex(PROFILE, input="Write about a jazz saxophone album.")
    got = [it["id"] for it in select_profile(e, "generic", "bm25", k=2)]
    assert set(got) == {"p1", "p3"}
    assert [it["id"] for it in select_profile(e, "generic", "bm25", k=10)][2:] == ["p0", "p2"]   # zero scores: order


def test_bm25_ties_keep_profile_order():
    dup = [{"id": "a", "text": "jazz album"}, {"id": "b", "text": "other words"}, {"id": "c", "text": "jazz album"}]
    assert [it["id"] for it in select_profile(ex(dup, input="jazz"), "generic", "bm25", k=3)] == ["a", "c", "b"]
    none = ex(dup, input="unrelated query zebra")
    assert [it["id"] for it in select_profile(none, "generic", "bm25", k=2)] == ["a", "b"]


def test_recency_all_none_and_k():
    dated = [{"id": "old", "text": "x", "date": "2001-01-01"}, {"id": "new", "text": "y", "date": "2005-01-01"}]
    from flythinker.data.schema import newest_first

    e = ex(newest_first(dated))
    assert [it["id"] for it in select_profile(e, "generic", "recency", k=1)] == ["new"]
    assert len(select_profile(e, "generic", "all", k=1)) == 2
    assert select_profile(e, "generic", "none", k=5) == []
    assert select_profile(e, "generic", "bm25", k=0) == []
    assert select_profile(ex([]), "generic", "bm25", k=3) == []


def test_random_is_seeded_per_example_and_in_profile_order():
    many = [{"id": f"p{i}", "text": f"item {i}"} for i in range(12)]
    a = [it["id"] for it in select_profile(ex(many, id="x"), "generic", "random", k=4, seed=1)]
    assert a == [it["id"] for it in select_profile(ex(many, id="x"), "generic", "random", k=4, seed=1)]
    assert a == sorted(a, key=lambda s: int(s[1:]))
    draws = {tuple(it["id"] for it in select_profile(ex(many, id="x"), "generic", "random", k=4, seed=s))
             for s in range(6)}
    assert len(draws) > 1
    per_example = {tuple(it["id"] for it in select_profile(ex(many, id=f"e{i}"), "generic", "random", k=4))
                   for i in range(6)}
    assert len(per_example) > 1


def test_query_extraction_per_task():
    review = ex(input='Generate the review text written by a reviewer who has given an overall rating of "5.0" '
                     'for a product with description "Jazz "live" album". The summary of the review text is '
                     '"Great sax".')
    assert query_text(review, "product_review") == 'Jazz "live" album Great sax'
    own_review = ex(input='Generate the review text written by a reviewer who has given an overall rating of '
                         '"4.0" for a product with summary "Good medicine.".')
    assert query_text(own_review, "product_review") == "Good medicine."
    abstract = ex(input='Generate an abstract for the title "Latent reasoning" using the following items: '
                       '1. fusion, 2. decoding.')
    assert query_text(abstract, "abstract_generation") == "Latent reasoning 1. fusion, 2. decoding."
    assert query_text(ex(input="Write the abstract of the paper titled: Fast decoding"),
                      "abstract_generation") == "Fast decoding"
    assert query_text(ex(input="Generate the content for a reddit post My first marathon"),
                      "topic_writing") == "My first marathon"
    assert query_text(ex(input="Anything at all"), "topic_writing") == "Anything at all"
    assert query_text(ex(input="Whole input here"), "generic") == "Whole input here"


# ----------------------------------------------------------------------------------------------------------------
# prompts


def test_chat_template_prompt(tokenizer):
    e = ex(PROFILE, input="Write about a jazz saxophone album.")
    prompt = build_prompt(e, tokenizer, DataConfig(k=1))
    assert prompt.startswith("<|im_start|>system\nYou are a personalized writing assistant")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "Here are texts this user wrote before:" in prompt and "Write about a jazz saxophone album." in prompt
    assert prompt.count("[1]") == 1 and "[2]" not in prompt
    nosys = build_prompt(e, tokenizer, DataConfig(system_prompt="", retrieval="none"))
    assert nosys == "<|im_start|>user\nWrite about a jazz saxophone album.<|im_end|>\n<|im_start|>assistant\n"


def test_task_templates(tokenizer):
    review = ex([{"overall": 5.0, "summary": "Loved it", "reviewText": "Great piano."}], task="product_review")
    assert "[1] Rating: 5.0 | Summary: Loved it\nGreat piano." in build_prompt(review, tokenizer, DataConfig())
    abstract = ex([{"title": "Engines", "abstract": "We compute."}], task="abstract_generation")
    assert "abstracts of papers this author wrote" in build_prompt(abstract, tokenizer, DataConfig())
    assert "[1] Title: Engines\nWe compute." in build_prompt(abstract, tokenizer, DataConfig())
    topic = ex([{"summary": "Runs", "content": "I ran."}], task="topic_writing")
    assert "[1] Summary: Runs\nI ran." in build_prompt(topic, tokenizer, DataConfig())
    # the config's task overrides the example's
    assert "abstracts of papers" in build_prompt(topic, tokenizer, DataConfig(task="abstract_generation"))


def test_plain_text_prompt_without_chat_template(tokenizer):
    plain_tok = tiny_tokenizer()
    plain_tok.chat_template = None
    e = ex(PROFILE[:1])
    for tok, cfg in ((plain_tok, DataConfig()), (tokenizer, DataConfig(use_chat_template=False))):
        prompt = build_prompt(e, tok, cfg)
        assert "<|im_start|>" not in prompt and prompt.endswith("Response:\n")
        assert prompt.startswith("You are a personalized writing assistant")


def test_template_rejecting_system_role_gets_it_folded_into_user():
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                         "{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<model>{% endif %}")
    prompt = build_prompt(ex(), tok, DataConfig(system_prompt="Be brief.", retrieval="none"))
    assert prompt == "<user>Be brief.\n\nWrite a review about the album.<model>"


# ----------------------------------------------------------------------------------------------------------------
# encoding and collation


def test_encode_example_matches_prompt_and_ends_with_eos(tokenizer):
    e = ex(PROFILE)
    cfg = DataConfig()
    feat = encode_example(e, tokenizer, cfg)
    assert set(feat) == {"prompt_ids", "response_ids"}
    assert tokenizer.decode(feat["prompt_ids"]) == build_prompt(e, tokenizer, cfg)
    assert feat["response_ids"] == tokenizer.encode(e.output, add_special_tokens=False) + [tokenizer.eos_token_id]
    gen = encode_example(e, tokenizer, cfg, with_response=False)
    assert gen["response_ids"] == [] and gen["prompt_ids"] == feat["prompt_ids"]


def test_eos_after_cut_false_drops_eos_only_from_cut_targets(tokenizer):
    long_out = "Great album. I loved it. The saxophone is warm and the piano answers it in every track."
    n_first = len(tokenizer.encode("Great album.", add_special_tokens=False))
    eos = tokenizer.eos_token_id
    cut_to = DataConfig(target_tokens=n_first)  # room for the first sentence only
    assert truncate_to_tokens(long_out, tokenizer, n_first) == "Great album."
    first = tokenizer.encode("Great album.", add_special_tokens=False)
    # default (the paper's preparation): the cut target still ends in EOS
    assert encode_example(ex(output=long_out), tokenizer, cut_to)["response_ids"] == first + [eos]
    no_eos = dataclasses.replace(cut_to, eos_after_cut=False)
    assert encode_example(ex(output=long_out), tokenizer, no_eos)["response_ids"] == first
    # a target that fits is whole, so it keeps its EOS either way
    whole = dataclasses.replace(no_eos, target_tokens=1000)
    assert encode_example(ex(output=long_out), tokenizer, whole)["response_ids"] == \
        tokenizer.encode(long_out, add_special_tokens=False) + [eos]
    # collation supervises exactly the response ids: no EOS label after the cut
    b = collate([encode_example(ex(output=long_out), tokenizer, no_eos)], pad_token_id=0)
    assert b["labels"][0][b["response_mask"][0].bool()].tolist() == first


def _features():
    return [{"prompt_ids": [5, 6, 7], "response_ids": [8, 2]}, {"prompt_ids": [9], "response_ids": [10, 11, 2]},
            {"prompt_ids": [3, 4, 5, 6, 7, 8], "response_ids": [2]}]


def test_collate_right_padding_and_label_masking():
    b = collate(_features(), pad_token_id=0, padding_side="right")
    assert set(b) == {"input_ids", "attention_mask", "labels", "response_mask"}
    assert all(t.dtype == torch.long and t.shape == (3, 7) for t in b.values())
    assert b["input_ids"][0].tolist() == [5, 6, 7, 8, 2, 0, 0]
    assert b["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert b["labels"][0].tolist() == [-100, -100, -100, 8, 2, -100, -100]
    assert b["response_mask"][0].tolist() == [0, 0, 0, 1, 1, 0, 0]
    assert b["labels"][2].tolist() == [-100] * 6 + [2]
    assert torch.equal(b["response_mask"].bool(), b["labels"] != IGNORE_INDEX)


def test_collate_left_padding():
    b = collate(_features(), pad_token_id=0, padding_side="left")
    assert b["input_ids"][1].tolist() == [0, 0, 0, 9, 10, 11, 2]
    assert b["attention_mask"][1].tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert b["labels"][1].tolist() == [-100, -100, -100, -100, 10, 11, 2]
    assert b["response_mask"][1].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert b["input_ids"][:, -1].tolist() == [2, 2, 2]


def test_collate_generation_features_are_left_padded_prompts():
    b = collate([{"prompt_ids": [5, 6, 7], "response_ids": []}, {"prompt_ids": [9]}], pad_token_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [0, 0, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert (b["labels"] == IGNORE_INDEX).all() and (b["response_mask"] == 0).all()
    with pytest.raises(ValueError, match="padding_side"):
        collate(_features(), 0, padding_side="middle")
    with pytest.raises(ValueError):
        collate([], 0)


def test_dataset_lazy_and_upfront_and_dataloader(tokenizer):
    exs = [ex(PROFILE, id=f"e{i}", output=f"Output number {i}.") for i in range(3)]
    cfg = DataConfig(k=1)
    lazy = PersonalizedDataset(exs, tokenizer, cfg)
    eager = PersonalizedDataset(exs, tokenizer, cfg, lazy=False)
    assert len(lazy) == 3 and lazy[1] == eager[1] and lazy[-1]["id"] == "e2"
    assert lazy[0]["prompt_ids"] == encode_example(exs[0], tokenizer, cfg)["prompt_ids"]
    loader = torch.utils.data.DataLoader(lazy, batch_size=3, collate_fn=lazy.collate_fn())
    (batch,) = list(loader)
    assert batch["input_ids"].shape[0] == 3 and (batch["attention_mask"][:, 0] == 1).all()     # right-padded
    gen = PersonalizedDataset(exs, tokenizer, cfg, with_response=False)
    gb = gen.collate_fn()([gen[i] for i in range(3)])
    assert (gb["attention_mask"][:, -1] == 1).all() and (gb["labels"] == IGNORE_INDEX).all()


def test_batches_feed_the_model(tokenizer, gen_reasoner):
    from flythinker import FlyThinker

    model = FlyThinker(*gen_reasoner, tokenizer=tokenizer)
    cfg = DataConfig(k=1, profile_tokens=40, query_tokens=20, target_tokens=20)
    ds = PersonalizedDataset([ex(PROFILE, id=f"e{i}") for i in range(2)], tokenizer, cfg)
    for side in ("right", "left"):
        batch = ds.collate_fn(side)([ds[0], ds[1]])
        with torch.no_grad():
            out = model(**batch)
        assert torch.isfinite(out.loss) and int(out.n_tokens) == int(batch["response_mask"].sum())


def test_retrieval_reads_profiles_through_a_store(tokenizer):
    """A ProfileStore replaces the inline profile (what a service with a database of users' histories plugs in);
    without one, the example's own profile is used."""
    from flythinker.data import DataConfig, Example, build_prompt
    from flythinker.data.retrieval import select_profile
    from flythinker.data.store import InlineProfiles, MemoryProfiles, ProfileStore

    ex = Example(id="e", user_id="u1", input="Write about the album.", output="",
                 profile=[{"text": "Inline item about drums."}])
    store = MemoryProfiles({"u1": [{"text": "Older stored item."}]})
    store.add("u1", {"text": "Newest stored item about guitars."})
    assert isinstance(store, ProfileStore) and isinstance(InlineProfiles(), ProfileStore)
    assert select_profile(ex, "generic", "recency", k=1) == [{"text": "Inline item about drums."}]
    assert select_profile(ex, "generic", "recency", k=1, store=store) == [{"text": "Newest stored item about guitars."}]
    cfg = DataConfig(retrieval="recency", k=2)
    with_store = build_prompt(ex, tokenizer, cfg, store=store)
    assert "guitars" in with_store and "Older stored" in with_store and "drums" not in with_store
    assert "drums" in build_prompt(ex, tokenizer, cfg)
    assert select_profile(ex, "generic", "recency", k=1, store=MemoryProfiles()) == []
