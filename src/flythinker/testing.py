"""Random models and a tiny tokenizer built in-process, for tests, benchmarks (`--model tiny|medium`) and quick runs.

No network and no files: the tokenizer is a byte-level BPE trained on a fixed built-in corpus (deterministic),
with a ChatML template like SmolLM2's, and the models are built from config with seeded random weights.
"""

from __future__ import annotations

import torch

_CORPUS = (
    "The user writes long reviews about music, albums, songs and artists. "
    "I loved this album because the melodies are warm and the lyrics are honest. "
    "This commit fixes a bug in the parser; the previous code did not handle empty input. "
    "Write the body of the commit message for a commit titled refactor the cache. "
    "Generate the review text written by a reviewer who has given an overall rating of 5. "
    "Abstract: we propose a method for personalized long-form generation with latent reasoning. "
    "Overall, the sound is great, the vocals are clear, and I would recommend it to anyone. "
    "0123456789 .,;:!?'\"()[]{}-_/\\ \n"
)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 384):
    """A PreTrainedTokenizerFast (byte-level BPE) with <pad>, <|im_start|>, <|im_end|> (also EOS) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str = "llama", vocab_size: int = 384, hidden_size: int = 32, num_layers: int = 2,
                num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 64, max_positions: int = 512,
                tie: bool = True):
    from transformers import LlamaConfig, Qwen2Config

    kw = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
              num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
              max_position_embeddings=max_positions, tie_word_embeddings=tie, pad_token_id=0, eos_token_id=2,
              bos_token_id=1)
    if arch == "llama":
        return LlamaConfig(**kw)
    if arch == "qwen2":
        return Qwen2Config(**kw)
    raise ValueError(f"unknown tiny arch {arch!r}; valid: llama, qwen2")


def random_features(n: int, seed: int = 0, vocab: int = 384) -> list[dict[str, list[int]]]:
    """`n` random encoded training examples (prompt 4-8 tokens, response 3-7 + EOS id 2), seeded."""
    g = torch.Generator().manual_seed(seed)
    feats = []
    for _ in range(n):
        p, r = int(torch.randint(4, 9, (1,), generator=g)), int(torch.randint(3, 8, (1,), generator=g))
        ids = torch.randint(3, vocab, (p + r,), generator=g).tolist()
        feats.append({"prompt_ids": ids[:p], "response_ids": ids[p:] + [2]})
    return feats


def tiny_lm(arch: str = "llama", seed: int = 0, **kw):
    """A seeded random causal LM from `tiny_config` (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, **kw)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def medium_models(seed: int = 0):
    """Random Llama models at realistic sizes: a ~200M-parameter Generator (SmolLM2-like vocabulary of 49152,
    width 768, 26 layers) and a ~57M Reasoner (width 512, 10 layers; different width, so the projection runs)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    common = {"vocab_size": 49152, "max_position_embeddings": 8192, "tie_word_embeddings": True, "rope_theta": 100000.0,
                  "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    g_cfg = LlamaConfig(hidden_size=768, num_hidden_layers=26, num_attention_heads=12, num_key_value_heads=4,
                        intermediate_size=2048, **common)
    r_cfg = LlamaConfig(hidden_size=512, num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=4,
                        intermediate_size=1536, **common)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        g = AutoModelForCausalLM.from_config(g_cfg)
        r = AutoModelForCausalLM.from_config(r_cfg)
    return g.eval(), r.eval(), None


def study_yaml(path, data_root, out, generator, **sections) -> str:
    """Write a tiny `flythinker study` config to `path` and return its path as a string: one split, no BERTScore,
    no ablations, 2 train / 2 reported examples, a 1-step training and 2-token decoding on `generator` (a saved
    tiny model) without a Reasoner. `sections` replace whole top-level keys (methods=["sft"],
    decode={"max_new_tokens": 4, "batch_size": 2}, ...); the tests that run studies share this one shape."""
    from pathlib import Path

    import yaml

    cfg = {"data_root": str(data_root), "out": str(out), "splits": ["user"], "methods": ["sft"],
           "train_examples": 2, "eval_examples": 2, "bertscore": False,
           "model": {"generator": str(generator), "reasoner": "none"},
           "data": {"k": 1, "profile_tokens": 32, "query_tokens": 16, "target_tokens": 8},
           "train": {"batch_size": 2, "grad_accum": 1, "max_steps": 1, "progress": False},
           "decode": {"max_new_tokens": 2, "batch_size": 2},
           "ablation": {"lams": [], "reasoner_layers": []}}
    cfg.update(sections)
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)
