"""The Predictor shared by the generate verb, the experiments and the server: batch predictions, chunk seeding, and
streaming text that adds up to the batch prediction."""

import torch

from flythinker import FlyThinker
from flythinker.data import DataConfig, Example
from flythinker.decoding import DecodeConfig
from flythinker.inference import Predictor
from flythinker.testing import tiny_lm, tiny_tokenizer


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
