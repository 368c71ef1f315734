"""The FlyThinker model: exactness of the no-reasoner path, the fusion against a slow reference, causality,
scopes, width handling, vocabulary checks, save/load and the truncated Reasoner."""

import pytest
import torch
import torch.nn.functional as F

from flythinker import FlyThinker, FlyThinkerConfig, truncated_reasoner
from flythinker.testing import tiny_lm


def _batch(B=2, T=12, V=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    labels = ids.clone()
    labels[:, : T // 2] = -100
    return ids, mask, labels


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_no_reasoner_and_lam0_equal_plain_generator(arch):
    gen, rea = tiny_lm(arch, seed=1), tiny_lm(arch, seed=2)
    ids, mask, _ = _batch()
    mask[1, -3:] = 0  # right padding
    ref = gen(input_ids=ids, attention_mask=mask).logits
    for model in (FlyThinker(gen, None), FlyThinker(gen, rea, FlyThinkerConfig(lam=0.0))):
        with torch.no_grad():
            out = model(ids, attention_mask=mask)
        assert torch.equal(out.logits, ref)


def test_lam_nonzero_changes_logits(gen_reasoner):
    gen, rea = gen_reasoner
    ids, mask, _ = _batch()
    with torch.no_grad():
        a = FlyThinker(gen, None)(ids, mask).logits
        b = FlyThinker(gen, rea, FlyThinkerConfig(lam=0.5))(ids, mask).logits
    assert torch.equal(a[:, 0], b[:, 0])  # position 0 is unfused and causal attention sees nothing else
    assert not torch.allclose(a[:, 1:], b[:, 1:])


def _slow_reference_embeddings(model, ids, mask, response_mask=None):
    """Per-position loop written straight from Eq. 6 / Algorithm 1, independent of fuse()/shift_states()."""
    gen, rea, cfg = model.generator, model.reasoner, model.config
    emb_table = gen.get_input_embeddings().weight
    B, T = ids.shape
    target = emb_table.norm(dim=-1).mean()
    pos = (torch.arange(T)[None] - mask.argmax(-1, keepdim=True)).clamp(min=0)
    h = rea.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    out = emb_table[ids].clone()
    for b in range(B):
        for i in range(1, T):
            if not (mask[b, i] and mask[b, i - 1]):
                continue
            resp = bool(response_mask[b, i]) if response_mask is not None else None
            if cfg.scope == "input" and resp:
                continue
            if cfg.scope == "output" and not resp:
                continue
            r = h[b, i - 1]
            if model.projection is not None:
                r = model.projection.weight @ r
            elif r.shape[0] < out.shape[-1]:
                r = torch.cat([r, r.new_zeros(out.shape[-1] - r.shape[0])])
            out[b, i] = out[b, i] + cfg.lam * r * (target / r.norm())
    return out


@pytest.mark.parametrize("scope", ["global", "input", "output"])
def test_fused_embeddings_match_slow_reference(gen_reasoner, scope):
    gen, rea = gen_reasoner
    model = FlyThinker(gen, rea, FlyThinkerConfig(lam=0.7, scope=scope))
    ids, mask, labels = _batch()
    mask[0, :3] = 0  # left padding in row 0
    resp = labels != -100
    with torch.no_grad():
        fast, _ = model.fused_embeddings(ids, mask, resp)
        slow = _slow_reference_embeddings(model, ids, mask, resp)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def test_scope_touches_only_its_positions(gen_reasoner):
    gen, rea = gen_reasoner
    ids, mask, labels = _batch(T=10)
    resp = labels != -100
    plain = gen.get_input_embeddings()(ids)
    with torch.no_grad():
        changed = {}
        for scope in ("global", "input", "output"):
            emb, _ = FlyThinker(gen, rea, FlyThinkerConfig(scope=scope)).fused_embeddings(ids, mask, resp)
            changed[scope] = (emb != plain).any(-1)
    assert not changed["global"][:, 0].any() and changed["global"][:, 1:].all()
    assert torch.equal(changed["input"], changed["global"] & ~resp)
    assert torch.equal(changed["output"], changed["global"] & resp)
    with pytest.raises(ValueError, match="response"):
        FlyThinker(gen, rea, FlyThinkerConfig(scope="output"))(ids, mask)


def test_causality_changing_token_j_leaves_earlier_logits(gen_reasoner):
    gen, rea = gen_reasoner
    model = FlyThinker(gen, rea, FlyThinkerConfig(lam=1.0)).eval()
    ids, mask, _ = _batch(B=1, T=16)
    j = 9
    ids2 = ids.clone()
    ids2[0, j] = (ids[0, j] + 7) % 380 + 3
    with torch.no_grad():
        a, b = model(ids, mask), model(ids2, mask)
    torch.testing.assert_close(a.logits[:, :j], b.logits[:, :j], rtol=0, atol=1e-6)
    # the reasoner state at j feeds position j+1 only: logits at j differ through the token, j+1 through both
    assert not torch.allclose(a.logits[:, j:], b.logits[:, j:])
    assert torch.equal(a.reasoner_states[:, :j], b.reasoner_states[:, :j])


def test_left_padding_row_equals_unpadded(gen_reasoner):
    gen, rea = gen_reasoner
    model = FlyThinker(gen, rea, FlyThinkerConfig(lam=0.5)).eval()
    ids, _, _ = _batch(B=1, T=10)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    pmask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], 1)
    with torch.no_grad():
        a = model(ids, torch.ones_like(ids)).logits
        b = model(padded, pmask).logits[:, 4:]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_loss_is_mean_nll_over_response_tokens(gen_reasoner):
    gen, rea = gen_reasoner
    model = FlyThinker(gen, rea)
    ids, mask, labels = _batch()
    out = model(ids, mask, labels=labels)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)
    assert int(out.n_tokens) == int((labels[:, 1:] != -100).sum())


@pytest.mark.parametrize("mode", ["project", "pad"])
def test_width_mismatch(mode):
    gen = tiny_lm("llama", seed=1, hidden_size=32)
    rea = tiny_lm("qwen2", seed=2, hidden_size=16, num_heads=2, num_kv_heads=1)
    model = FlyThinker(gen, rea, FlyThinkerConfig(width_mode=mode))
    assert (model.projection is not None) == (mode == "project")
    ids, mask, labels = _batch()
    with torch.no_grad():
        fast, _ = model.fused_embeddings(ids, mask)
        slow = _slow_reference_embeddings(model, ids, mask)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    if mode == "project":  # initialised to the official zero-padded add
        pad = FlyThinker(gen, rea, FlyThinkerConfig(width_mode="pad"))
        with torch.no_grad():
            torch.testing.assert_close(fast, pad.fused_embeddings(ids, mask)[0])
    big = tiny_lm("llama", seed=3, hidden_size=64)
    with pytest.raises(ValueError, match="width_mode"):
        FlyThinker(gen, big, FlyThinkerConfig(width_mode="pad"))
    assert FlyThinker(gen, big, FlyThinkerConfig(width_mode="project")).projection.weight.shape == (32, 64)


def test_vocabulary_checks(tokenizer):
    gen = tiny_lm("llama", seed=1, vocab_size=384)
    small = tiny_lm("llama", seed=2, vocab_size=300)
    with pytest.raises(ValueError, match=r"Reasoner vocabulary size 300 .* 384"):
        FlyThinker(gen, small)
    # padded tables of different sizes are accepted when the real vocabulary fits both (Qwen2.5 style)
    padded_gen = tiny_lm("llama", seed=1, vocab_size=448)
    padded_rea = tiny_lm("llama", seed=2, vocab_size=400)
    FlyThinker(padded_gen, padded_rea, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"Reasoner vocabulary size 400 .* 448"):
        FlyThinker(padded_gen, padded_rea)  # without a tokenizer every Generator row could be an id
    other = type(tokenizer).from_pretrained  # noqa: F841 (just to be explicit the objects are HF tokenizers)
    from flythinker.testing import tiny_tokenizer

    with pytest.raises(ValueError, match="tokenizers differ"):
        FlyThinker(gen, tiny_lm("llama", seed=2), tokenizer=tokenizer, reasoner_tokenizer=tiny_tokenizer(300))


def test_save_load_identical_logits(tmp_path, gen_reasoner, tokenizer):
    gen, rea = gen_reasoner
    model = FlyThinker(gen, rea, FlyThinkerConfig(lam=0.3, scope="input"), tokenizer=tokenizer).eval()
    ids, mask, labels = _batch()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = FlyThinker.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == model.config and loaded.tokenizer is not None
    with torch.no_grad():
        assert torch.equal(model(ids, mask, labels).logits, loaded(ids, mask, labels).logits)


def test_save_load_projection(tmp_path):
    gen = tiny_lm("llama", seed=1, hidden_size=32)
    rea = tiny_lm("llama", seed=2, hidden_size=16, num_heads=2, num_kv_heads=1)
    model = FlyThinker(gen, rea).eval()
    with torch.no_grad():
        model.projection.weight.add_(0.01)
    model.save_pretrained(tmp_path)
    loaded = FlyThinker.from_pretrained(tmp_path)
    assert torch.equal(model.projection.weight, loaded.projection.weight)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a FlyThinker directory"):
        FlyThinker.from_pretrained(tmp_path)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_truncated_reasoner_is_an_independent_prefix(arch):
    gen = tiny_lm(arch, seed=1, num_layers=3)
    rea = truncated_reasoner(gen, 2)
    assert rea.config.num_hidden_layers == 2 and gen.config.num_hidden_layers == 3
    g_sd, r_sd = gen.state_dict(), rea.state_dict()
    for k, v in r_sd.items():
        assert torch.equal(v, g_sd[k]), k
        assert v.data_ptr() != g_sd[k].data_ptr(), f"{k} shares storage"
    # R's final state = the shared final norm applied to the Generator's state after its first two layers
    ids, mask, _ = _batch()
    with torch.no_grad():
        hs = gen.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
        rs = rea.model(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(gen.model.norm(hs), rs)
    with pytest.raises(ValueError, match="num_layers"):
        truncated_reasoner(gen, 4)


def test_config_validation():
    from flythinker.config import ConfigError

    with pytest.raises(ConfigError, match="scope"):
        FlyThinkerConfig(scope="everywhere")
    with pytest.raises(ConfigError, match="unknown key"):
        FlyThinkerConfig.from_dict({"lam": 0.5, "lamda": 1})


def _calibrated(model, seed=5):
    ids, mask, _ = _batch(B=3, T=9, seed=seed)
    mask[1, :4] = 0  # padding must not enter the statistics
    n = model.calibrate([(ids, mask)])
    return ids, mask, n


@pytest.mark.parametrize("mode", ["center", "standardize"])
def test_normalize_statistics_and_fusion_match_the_formula(gen_reasoner, mode):
    gen, rea = gen_reasoner
    model = FlyThinker(gen, rea, FlyThinkerConfig(lam=0.7, normalize=mode)).eval()
    assert not model.calibrated
    ids, mask, n = _calibrated(model)
    with torch.no_grad():
        h = rea.model(input_ids=ids, attention_mask=mask,
                      position_ids=(torch.arange(9)[None] - mask.argmax(-1, keepdim=True)).clamp(min=0)
                      ).last_hidden_state
    real = h[mask.bool()]                                                               # (N, H)
    assert n == int(mask.sum()) and model.calibrated
    torch.testing.assert_close(model.r_mean, real.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.r_std, real.std(0, unbiased=False), rtol=1e-4, atol=1e-5)
    # fusion = e(x_i) + λ · rescale(normalized r_{i-1}), checked at one position by hand
    x_ids, x_mask, _ = _batch(B=1, T=6, seed=9)
    with torch.no_grad():
        fused, states = model.fused_embeddings(x_ids, x_mask)
    r = states[0, 2] - model.r_mean
    if mode == "standardize":
        r = r / model.r_std
    target = gen.get_input_embeddings().weight.norm(dim=-1).mean()
    expect = gen.get_input_embeddings().weight[x_ids[0, 3]] + 0.7 * r * target / r.norm()
    torch.testing.assert_close(fused[0, 3], expect, rtol=1e-5, atol=1e-6)


def test_normalize_without_calibration_is_a_clear_error(gen_reasoner):
    model = FlyThinker(*gen_reasoner, FlyThinkerConfig(normalize="center"))
    ids, mask, labels = _batch()
    with pytest.raises(ValueError, match="calibrate"):
        model(ids, mask, labels)
    with pytest.raises(ValueError, match="normalize"):
        FlyThinkerConfig(normalize="whiten")


def test_normalize_changes_the_shock_not_the_no_fusion_path(gen_reasoner):
    """normalize only acts through fusion: with λ = 0 it leaves the Generator's logits exactly as they were."""
    gen, rea = gen_reasoner
    plain = FlyThinker(gen, rea, FlyThinkerConfig(lam=0.0)).eval()
    norm = FlyThinker(gen, rea, FlyThinkerConfig(lam=0.0, normalize="standardize")).eval()
    _calibrated(norm)
    ids, mask, labels = _batch()
    with torch.no_grad():
        assert torch.equal(plain(ids, mask, labels).logits, norm(ids, mask, labels).logits)


def test_save_load_keeps_calibration(tmp_path, gen_reasoner):
    gen, rea = gen_reasoner
    model = FlyThinker(gen, rea, FlyThinkerConfig(lam=0.5, normalize="standardize")).eval()
    _calibrated(model)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = FlyThinker.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.calibrated and loaded.config.normalize == "standardize"
    for k in ("r_mean", "r_std", "r_count"):
        assert torch.equal(getattr(model, k), getattr(loaded, k))
    ids, mask, labels = _batch()
    with torch.no_grad():
        assert torch.equal(model(ids, mask, labels).logits, loaded(ids, mask, labels).logits)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cache_keyword_follows_the_forward_signature(arch):
    """transformers 5.24 renamed the KV-cache keyword (`past_key_values` -> `cache`, the old one removed in 5.40):
    the keyword is read from each class's signature, so both kinds of model get the one they accept."""
    from types import SimpleNamespace

    from flythinker.hf import cache_kwargs, output_cache

    class OldLM(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return input_ids

    class NewLM(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None):
            return input_ids

    sentinel = object()
    assert cache_kwargs(OldLM(), sentinel) == {"past_key_values": sentinel}
    assert cache_kwargs(NewLM(), sentinel) == {"cache": sentinel}
    assert output_cache(SimpleNamespace(cache=sentinel)) is sentinel
    assert output_cache(SimpleNamespace(past_key_values=sentinel)) is sentinel
    # the installed transformers: whichever keyword it takes, a real cache goes through and comes back filled
    from transformers import DynamicCache

    lm = tiny_lm(arch)
    cache = DynamicCache(config=lm.config)
    out = lm(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True, **cache_kwargs(lm, cache))
    assert output_cache(out) is cache and cache.get_seq_length() == 3
