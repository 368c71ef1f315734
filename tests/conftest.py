"""Shared fixtures: tiny random models and tokenizer (no network), deterministic seeds, one torch thread."""

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _determinism():
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


def pytest_configure(config):
    # Tests run many tiny models; one intra-op thread avoids oversubscription with the CI's 2 cores.
    torch.set_num_threads(int(os.environ.get("FLYTHINKER_TEST_THREADS", "1")))
    # fp32 everywhere by default: the exactness tests (decode == forward, resume, backends) compare bit for bit, and
    # "auto" would pick bf16 on a bf16-capable CPU or GPU. Tests of the bf16 path set it to 1 with monkeypatch.
    # Subprocesses (integration tests) inherit it.
    os.environ["FLYTHINKER_NATIVE_BF16"] = "0"
    # "auto" decodes follow the fixed backend rule (no timing, no cache file); tests of the calibration enable it.
    os.environ["FLYTHINKER_DECODE_CALIBRATE"] = "0"


@pytest.fixture(scope="session")
def tokenizer():
    from flythinker.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def gen_reasoner():
    """A Llama Generator (width 32) and a Llama Reasoner (width 32), both random, different seeds."""
    from flythinker.testing import tiny_lm

    return tiny_lm("llama", seed=1), tiny_lm("llama", seed=2, num_layers=1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny FlyThinker checkpoint (Llama Generator + 1-layer Reasoner, seeds 1 and 2) with its tokenizer;
    one per test module, read-only for the tests (copy it before damaging it)."""
    from flythinker import FlyThinker
    from flythinker.testing import tiny_lm, tiny_tokenizer

    d = tmp_path_factory.mktemp("ckpt") / "ckpt"
    FlyThinker(tiny_lm("llama", seed=1), tiny_lm("llama", seed=2, num_layers=1),
               tokenizer=tiny_tokenizer()).save_pretrained(d)
    return d


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA
