"""model.py + load.py against HF transformers (the independent reference) and the model's invariants."""
import json
import struct

import pytest
import torch

from ivft.errors import LoadError
from ivft.load import load_model, save_hf
from model import Intervention, KVCache, ModelConfig, Transformer

transformers = pytest.importorskip("transformers")


def assert_close(a, b, tol, what):
    diff = (a.float() - b.float()).abs()
    assert diff.max().item() <= tol, f"{what}: max abs diff {diff.max().item():.3g}, mean {diff.mean().item():.3g}"


def randomize(module, std=0.1, seed=0):
    # HF initialises biases to 0 and norm weights to 1, which would leave those code paths untested
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_weight = name.endswith("weight") and p.ndim == 1   # RMSNorm / LayerNorm scales
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if is_norm_weight else 0.0))


def tiny_hf(family):
    if family == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rope_theta=500000.0, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16})
        return transformers.LlamaForCausalLM(cfg)
    if family == "qwen2":
        cfg = transformers.Qwen2Config(
            vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
        return transformers.Qwen2ForCausalLM(cfg)
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.fixture(params=["llama", "qwen2", "gpt2"])
def tiny_pair(request, tmp_path):
    hf = tiny_hf(request.param).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path / "hf")
    ours, tok = load_model(tmp_path / "hf")
    assert tok is None  # no tokenizer files were written
    return request.param, hf, ours, tmp_path


def test_parity_tiny_families(tiny_pair):
    family, hf, ours, _ = tiny_pair
    idx = torch.randint(0, 128, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(idx), hf(idx).logits, 1e-4, f"{family} logits")
        # left padding: HF takes attention_mask, we take pad_mask; compare real positions only
        mask = torch.ones(3, 37, dtype=torch.bool)
        mask[0, :9] = False
        mask[2, :1] = False
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        ref = hf(idx, attention_mask=mask.long(), position_ids=pos).logits
        assert_close(ours(idx, pad_mask=mask)[mask], ref[mask], 1e-4, f"{family} left-padded logits")


def test_export_roundtrip_and_transformers_reload(tiny_pair):
    family, hf, ours, tmp = tiny_pair
    save_hf(ours, None, tmp / "export")
    again, _ = load_model(tmp / "export")
    idx = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = ours(idx)
        assert torch.equal(a, again(idx)), "export -> load is not exact"
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp / "export").eval()
        assert_close(a, reloaded(idx).logits, 1e-4, f"{family} exported, loaded by transformers")


def test_sharded_safetensors(tmp_path):
    hf = tiny_hf("llama").eval()
    randomize(hf)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours, _ = load_model(tmp_path)
    idx = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        assert_close(ours(idx), hf(idx).logits, 1e-4, "sharded llama")


# ---------------------------------------------------------------------------------------------
# the real embedded model

def test_embedded_model_matches_transformers_gguf(smollm):
    from ivft.load import default_gguf_path
    model, tok = smollm
    path = default_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    ids = tok.chat_prompt("What is the capital of Japan? Answer in one word.")
    idx = torch.tensor([ids, ids[::-1]])
    with torch.no_grad():
        assert_close(model(idx), hf(idx).logits, 1e-4, "SmolLM2 GGUF logits")


def test_embedded_model_answers_paris(smollm):
    model, tok = smollm
    ids = torch.tensor([tok.chat_prompt("What is the capital of France?")])
    out = model.generate(ids, 20, stop_ids=tok.stop_ids())
    assert "Paris" in tok.decode(out[0].tolist())


# ---------------------------------------------------------------------------------------------
# invariants on a tiny random model (GQA + biases so every path is exercised)

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, attention_bias=True, bias=True,
                      max_position_embeddings=128)
    return Transformer(cfg).init_weights(std=0.2).eval()


def test_head_contributions_sum_to_attention_output(tiny):
    idx = torch.randint(0, 97, (2, 11))
    iv = Intervention(record_z=(1,))
    with torch.no_grad():
        tiny(idx, intervention=iv)
        z = iv.z[1]                                                    # (B, T, H, D)
        attn = tiny.model.layers[1].self_attn
        per_head = tiny.head_contributions(1, z)                       # (B, T, H, C)
        assert per_head.shape == (2, 11, 6, 48)
        assert_close(per_head.sum(-2) + attn.o_proj.bias, attn.o_proj(z.flatten(-2)), 1e-5, "sum of heads")
        # and each head alone equals o_proj applied to z with every other head zeroed
        only = torch.zeros_like(z)
        only[:, :, 4] = z[:, :, 4]
        assert_close(per_head[:, :, 4], attn.o_proj(only.flatten(-2)) - attn.o_proj.bias, 1e-5, "head 4")


def test_empty_and_zero_interventions_are_bit_identical(tiny):
    idx = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        ref = tiny(idx)
        assert torch.equal(ref, tiny(idx, intervention=Intervention()))
        zero = Intervention(pos=torch.tensor([3, 8]), add_resid={1: torch.zeros(48)},
                            add_z={0: (torch.tensor([2]), torch.zeros(1, 8))})
        assert torch.equal(ref, tiny(idx, intervention=zero))
        rec = Intervention(record_z=(0, 2), record_resid=(1,))
        assert torch.equal(ref, tiny(idx, intervention=rec))
        # replacing a head's z by its own recorded value changes nothing either
        pos = torch.tensor([5, 2])
        read = Intervention(pos=pos, record_z=(2,))
        tiny(idx, intervention=read)
        z = read.z[2][:, 0]                                             # (B, H, D)
        same = Intervention(pos=pos, set_z={2: (torch.tensor([1, 4]), z[:, [1, 4]])})
        assert_close(tiny(idx, intervention=same), ref, 1e-6, "set_z to own value")


def naive_forward(model, idx, layer, pos, vec, scale=1.0):
    """Reference for add_resid: run the blocks by hand and add vec after `layer` at pos[b]."""
    B, T = idx.shape
    x = model.model.embed_tokens(idx)
    freqs = torch.arange(T)[None, :, None].float() * model.inv_freq
    emb = torch.cat([freqs, freqs], -1).expand(B, T, -1)
    rope = {"full_attention": (emb.cos()[:, None], emb.sin()[:, None])}
    for i, block in enumerate(model.model.layers):
        x = block(x, rope, {"full_attention": None}, None, i, None, 0)
        if i == layer:
            x = x.clone()
            for b in range(B):
                x[b, pos[b]] += scale * vec
    return model.lm_head(model.model.norm(x))


def test_add_resid_per_row_positions_match_naive(tiny):
    idx = torch.randint(0, 97, (3, 10))
    vec = torch.randn(48)
    pos = torch.tensor([9, 4, 0])
    with torch.no_grad():
        got = tiny(idx, intervention=Intervention(pos=pos, add_resid={1: vec}, scale=0.7))
        assert_close(got, naive_forward(tiny, idx, 1, pos, vec, 0.7), 1e-5, "add_resid vs naive")
        # positions before the edit are untouched (causal attention)
        ref = tiny(idx)
        assert torch.equal(got[1, :4], ref[1, :4])
        assert not torch.allclose(got[1, 4:], ref[1, 4:])


def test_set_z_changes_only_that_head(tiny):
    idx = torch.randint(0, 97, (1, 6))
    pos = torch.tensor([5])
    iv = Intervention(pos=pos, set_z={1: (torch.tensor([3]), torch.ones(1, 8))}, record_z=(1,))
    with torch.no_grad():
        tiny(idx, intervention=iv)
        base = Intervention(pos=pos, record_z=(1,))
        tiny(idx, intervention=base)
    z, z0 = iv.z[1][0, 0], base.z[1][0, 0]                             # (H, D)
    assert torch.equal(z[3], torch.ones(8))
    others = [h for h in range(6) if h != 3]
    assert torch.equal(z[others], z0[others])


@pytest.mark.parametrize("headroom", [0, 2, 16])   # cat; in place with reallocation; in place throughout
def test_kv_cache_decoding_equals_full_forward(tiny, headroom):
    idx = torch.randint(0, 97, (2, 14))
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[1, :3] = False                                                # left padding in row 1
    with torch.no_grad():
        full = tiny(idx, pad_mask=mask)
        cache = KVCache(tiny.n_layers, headroom=headroom)
        parts = [tiny(idx[:, :8], pad_mask=mask[:, :8], cache=cache)]
        parts.append(tiny(idx[:, 8:11], pad_mask=mask[:, :11], cache=cache))   # a multi-token chunk
        for t in range(11, 14):
            parts.append(tiny(idx[:, t:t + 1], pad_mask=mask[:, :t + 1], cache=cache))
        inc = torch.cat(parts, 1)
    assert_close(inc[mask], full[mask], 1e-5, "KV cache vs full forward")


def test_kv_cache_never_writes_into_tensors_it_did_not_allocate(tiny):
    # ivft/engine.py shares one prompt cache between many forks (an expanded prefix, copies of rows):
    # growing in place must not change what another cache or a caller still holds
    idx = torch.randint(0, 97, (3, 9))
    with torch.no_grad():
        base = KVCache(tiny.n_layers, headroom=8)
        tiny(idx[:, :4], cache=base)
        tiny(idx[:, 4:5], cache=base)                # base now has a buffer with room to spare
        held = [k.clone() for k in base.k]
        fork = KVCache(tiny.n_layers, headroom=8)
        fork.k, fork.v = list(base.k), list(base.v)  # shares base's views, as engine._cache_rows does
        a = tiny(idx[:, 5:7], cache=fork)[:, -1]
        b = tiny(idx[:, 5:6], cache=base)[:, -1]     # base grows in place into its own room
        assert all(torch.equal(k[:, :, :5], h) for k, h in zip(base.k, held))
        assert torch.equal(fork.k[0][:, :, :5], held[0])
        full = tiny(idx[:, :7])
        assert_close(a, full[:, 6], 1e-5, "fork after base grew")
        assert_close(b, full[:, 5], 1e-5, "base after the fork grew")


def test_generate_greedy_equals_uncached_argmax(tiny):
    idx = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        out = tiny.generate(idx, 6)
        seq = idx
        for _ in range(6):
            seq = torch.cat([seq, tiny(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq[:, 5:])


def test_generate_sampling_is_seeded_and_respects_top_k(tiny):
    idx = torch.randint(0, 97, (2, 5))
    a = tiny.generate(idx, 8, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, tiny.generate(idx, 8))                      # top-1 sampling = greedy
    b = tiny.generate(idx, 8, temperature=1.5, generator=torch.Generator().manual_seed(3))
    c = tiny.generate(idx, 8, temperature=1.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(b, c)


def test_loss_ignores_masked_targets(tiny):
    idx = torch.randint(0, 97, (2, 7))
    targets = torch.full_like(idx, -100)
    targets[0, 3], targets[1, 6] = 5, 11
    logits, loss = tiny(idx, targets)
    lp = torch.log_softmax(logits, -1)
    assert_close(loss, -(lp[0, 3, 5] + lp[1, 6, 11]) / 2, 1e-5, "answer-only loss")


# ---------------------------------------------------------------------------------------------
# bad input: one clear error naming the file

def write_tiny_dir(tmp_path, **override):
    cfg = ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=32)
    save_hf(Transformer(cfg).init_weights(), None, tmp_path / "m")
    if override:
        c = json.loads((tmp_path / "m" / "config.json").read_text())
        c.update(override)
        (tmp_path / "m" / "config.json").write_text(json.dumps(c))
    return tmp_path / "m"


def test_missing_path(tmp_path):
    with pytest.raises(LoadError, match="no such file"):
        load_model(tmp_path / "nope.gguf")


def test_unknown_architecture(tmp_path):
    d = write_tiny_dir(tmp_path, model_type="bert")
    with pytest.raises(LoadError, match=r"config\.json.*unknown architecture.*bert"):
        load_model(d)


def test_config_tensor_shape_mismatch(tmp_path):
    d = write_tiny_dir(tmp_path, intermediate_size=48)
    with pytest.raises(LoadError, match=r"model\.safetensors.*mlp\.gate_proj\.weight.*shape"):
        load_model(d)


def test_missing_config_field(tmp_path):
    d = write_tiny_dir(tmp_path)
    c = json.loads((d / "config.json").read_text())
    del c["hidden_size"]
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(LoadError, match="hidden_size"):
        load_model(d)


def test_corrupt_safetensors(tmp_path):
    d = write_tiny_dir(tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match=r"model\.safetensors.*not a readable safetensors"):
        load_model(d)


def test_truncated_and_garbage_gguf(tmp_path):
    from ivft.load import default_gguf_path
    with open(default_gguf_path(), "rb") as f:
        head = f.read(1 << 20)
    (tmp_path / "cut.gguf").write_bytes(head)                         # header + part of the vocab
    with pytest.raises(LoadError, match=r"cut\.gguf"):
        load_model(tmp_path / "cut.gguf", use_cache=False)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\xff" * 64)
    with pytest.raises(LoadError, match=r"junk\.gguf"):
        load_model(tmp_path / "junk.gguf", use_cache=False)


def test_unknown_file_type(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(LoadError, match=r"w\.bin.*unknown checkpoint type"):
        load_model(tmp_path / "w.bin")
