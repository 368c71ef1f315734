"""The personalized data layer: load examples (LongLaMP or the generic schema), select profile items, build
prompts under token budgets, encode and collate. Importing it loads no optional dependency (bm25s, datasets and
pyarrow are imported only when used).

    examples = load_examples("train.jsonl.gz")                      # list[Example]
    cfg = DataConfig(retrieval="bm25", k=2)
    prompt = build_prompt(examples[0], tokenizer, cfg)              # str
    feats = [encode_example(ex, tokenizer, cfg) for ex in examples] # {"prompt_ids", "response_ids"}
    batch = collate(feats[:8], tokenizer.pad_token_id)              # input_ids, attention_mask, labels, response_mask
"""

from .collate import IGNORE_INDEX, PersonalizedDataset, collate, encode_example, pad_token_id
from .config import DEFAULT_SYSTEM_PROMPT, RETRIEVALS, DataConfig
from .prompts import build_prompt, resolve_task
from .retrieval import query_text, select_profile
from .schema import TASKS, Example, item_text, item_title, load_examples
from .truncate import count_tokens, truncate_to_tokens

__all__ = [
    "DEFAULT_SYSTEM_PROMPT", "IGNORE_INDEX", "RETRIEVALS", "TASKS", "DataConfig", "Example", "PersonalizedDataset",
    "build_prompt", "collate", "count_tokens", "encode_example", "item_text", "item_title", "load_examples",
    "pad_token_id", "query_text", "resolve_task", "select_profile", "truncate_to_tokens",
]
