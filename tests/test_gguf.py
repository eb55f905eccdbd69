"""The GGUF loader (load.read_gguf / gguf_to_ours) on tiny GGUF files written here, one per
architecture × quantization type, against transformers' own GGUF loader reading the same file.

The one real GGUF we have (the embedded SmolLM2) covers llama with Q4_1 / Q8_0 / F32 only. Here a tiny
random HF model is written out the way llama.cpp's convert_hf_to_gguf.py writes it (tensor names,
[in, out] shape order, llama's q/k row permutation, GPT-2's fused and transposed Conv1D weights) with
the real SmolLM2 tokenizer metadata, then loaded twice: by our loader and by
transformers.AutoModelForCausalLM.from_pretrained(gguf_file=...), which maps names and shapes, splits
GPT-2's fused qkv and un-permutes on its own. Logits must agree to 1e-4. (For these three architectures
transformers dequantizes with the same gguf.quants as we do, so the blocks' decoding itself is
gguf's; what is checked is everything around it.) Where transformers cannot read a file correctly,
the reference is the HF model with its weights set to the dequantized values, as noted there.
"""
import numpy as np
import pytest
import torch

from ivft import load
from ivft.load import default_gguf_path, gguf_cache_path, load_model

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it to load a GGUF

from gguf import GGMLQuantizationType as Q  # noqa: E402

C, F, L, H, G = 64, 256, 2, 4, 2  # hidden, MLP width, layers, query heads, kv heads (GQA for llama/qwen2)
QK_K = 256                        # K-quant super-block: only rows of F (ffn_down's input) are long enough


def assert_close(a, b, tol, what):
    diff = (a.float() - b.float()).abs()
    assert diff.max().item() <= tol, f"{what}: max abs diff {diff.max().item():.3g}, mean {diff.mean().item():.3g}"


# ---------------------------------------------------------------------------------------------
# K-quant writers: gguf.quants only dequantizes Q4_K / Q6_K, so the blocks are packed by hand here,
# in the byte layout that gguf.quants.Q4_K/Q6_K.dequantize_blocks (and ggml's block_q*_K) read.

def _safe(x):
    return np.where(x == 0, 1, x)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 210) bytes: ql[128] qh[64] scales[16] (int8) d (f16);
    value = d * scale[group of 16] * (q - 32), q a 6-bit code split into 4 low and 2 high bits."""
    n = x.shape[0]
    g = x.reshape(n, 16, 16)                                              # 16 groups of 16 values
    amax = np.abs(g).max(-1)                                              # (n, 16)
    d = (amax.max(-1, keepdims=True) / (31 * 127)).astype(np.float16)     # (n, 1)
    sc = np.clip(np.round(amax / 31 / _safe(d.astype(np.float32))), 0, 127).astype(np.int8)
    step = (d.astype(np.float32) * sc)[..., None]                         # (n, 16, 1)
    q = np.clip(np.round(g / _safe(step)), -32, 31).astype(np.int16) + 32
    q = q.astype(np.uint8).reshape(n, 2, 128)                             # two halves of 128
    lo, hi = q & 0xF, q >> 4
    ql = lo[:, :, :64] | (lo[:, :, 64:] << 4)                             # (n, 2, 64): element j and j+64
    hi = hi.reshape(n, 2, 4, 32)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)   # (n, 2, 32)
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8),
                           d.view(np.uint8).reshape(n, 2)], axis=1)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 144) bytes: d (f16) dmin (f16) scales[12] qs[128];
    value = d * sc[j] * q - dmin * m[j] for sub-block j of 32, with 6-bit sc, m and a 4-bit q."""
    n = x.shape[0]
    g = x.reshape(n, 8, 32)                                               # 8 sub-blocks of 32
    low = np.minimum(g.min(-1), 0)                                        # (n, 8), <= 0 so q >= 0
    scale = (g.max(-1) - low) / 15
    d = (scale.max(-1, keepdims=True) / 63).astype(np.float16)
    dmin = (-low.min(-1, keepdims=True) / 63).astype(np.float16)
    sc = np.clip(np.round(scale / _safe(d.astype(np.float32))), 0, 63).astype(np.uint8)
    m = np.clip(np.round(-low / _safe(dmin.astype(np.float32))), 0, 63).astype(np.uint8)
    step, off = d.astype(np.float32) * sc, dmin.astype(np.float32) * m
    q = np.clip(np.round((g + off[..., None]) / _safe(step)[..., None]), 0, 15).astype(np.uint8)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, 128)                 # sub-blocks 2i, 2i+1 share bytes
    # 8 six-bit scales and 8 six-bit mins in 12 bytes: the top two bits of entries 4..7 ride in
    # the spare top bits of bytes 0..7
    scales = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)], axis=1)
    return np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), scales, qs], axis=1)


K_QUANTS = {Q.Q4_K: quantize_q4_k, Q.Q6_K: quantize_q6_k}


def encode(a: np.ndarray, qtype: Q):
    """A float32 tensor in torch layout [out, in] -> (array, type used) for GGUFWriter.add_tensor.
    Like llama.cpp, 1-D tensors (norms, biases) stay F32, and a row too short for the type's block
    falls back to Q8_0 (llama.cpp also falls back for K-quants on narrow tensors)."""
    if a.ndim == 1 or qtype == Q.F32:
        return a.astype(np.float32), Q.F32
    if qtype == Q.F16:
        return a.astype(np.float16), Q.F16
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if a.shape[-1] % block:
        qtype = Q.Q8_0
    if qtype in K_QUANTS:
        blocks = K_QUANTS[qtype](a.reshape(-1, QK_K))
        return blocks.reshape(a.shape[0], -1), qtype
    return gguf.quants.quantize(a, qtype), qtype


def test_k_quant_writers_roundtrip():
    # the hand-packed blocks must decode (with gguf's own dequantizer) to close to what went in,
    # or the K-quant parity tests below would compare two readings of noise
    x = np.random.default_rng(0).standard_normal((3, 2 * QK_K)).astype(np.float32)
    x[1, :QK_K] = 0.0                                                     # an all-zero block
    # tolerances: about half a quantization step of the coarsest block (Q4_0 here: 0.26), while a
    # wrong bit layout is off by the data's own scale (~1)
    for qtype, tol in ((Q.Q4_K, 0.25), (Q.Q6_K, 0.08)):
        y = gguf.quants.dequantize(encode(x, qtype)[0], qtype)
        assert y.shape == x.shape
        err = np.abs(y - x).max()
        assert err <= tol, f"{qtype.name}: max abs round-trip error {err:.3g}"
        assert np.all(y[1, :QK_K] == 0)


# ---------------------------------------------------------------------------------------------
# tiny HF models and their GGUF files

def tiny_hf(arch: str, vocab_size: int, **overrides):
    ids = dict(bos_token_id=1, eos_token_id=2)  # SmolLM2's; GPT2Config's default 50256 is out of range
    if arch == "llama":
        cfg = transformers.LlamaConfig(**{
            **dict(vocab_size=vocab_size, hidden_size=C, intermediate_size=F, num_hidden_layers=L,
                   num_attention_heads=H, num_key_value_heads=G, max_position_embeddings=256,
                   rope_theta=50000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, **ids), **overrides})
        model = transformers.LlamaForCausalLM(cfg)
        if cfg.attention_bias:
            # llama.cpp's llama graph takes optional q/k/v biases (and the converter permutes q/k's);
            # HF's attention_bias also adds an o_proj bias, which our ModelConfig has no switch for
            for layer in model.model.layers:
                layer.self_attn.o_proj.bias = None
        return model
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**{
            **dict(vocab_size=vocab_size, hidden_size=C, intermediate_size=F, num_hidden_layers=L,
                   num_attention_heads=H, num_key_value_heads=G, max_position_embeddings=256,
                   tie_word_embeddings=True, **ids), **overrides})
        return transformers.Qwen2ForCausalLM(cfg)
    # transformers reads GPT-2's GGUF context_length into n_ctx, not n_positions: keep the
    # default n_positions=1024 so the position table it builds has the size the file holds
    cfg = transformers.GPT2Config(**{**dict(vocab_size=vocab_size, n_embd=C, n_layer=L, n_head=H, n_inner=F, **ids),
                                     **overrides})
    return transformers.GPT2LMHeadModel(cfg)


def randomize(module, std=0.1, seed=0):
    # HF initialises biases to 0 and norm weights to 1, which would leave those code paths untested
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_weight = name.endswith("weight") and p.ndim == 1
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if is_norm_weight else 0.0))
    return module


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py, LlamaModel.permute: within each head, HF's rotate_half rows
    # (i, i + D/2) become adjacent rows (2i, 2i + 1) for ggml's interleaved RoPE. Also applied to biases.
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(arch: str, hf) -> dict:
    """HF state dict -> {GGUF name: float32 array in torch layout [out, in]} as convert_hf_to_gguf.py
    names them; GGUFWriter stores the reversed shape ([in, out]) itself."""
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    out = {}
    if arch == "gpt2":
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        out.update({"token_embd.weight": sd["wte.weight"], "position_embd.weight": sd["wpe.weight"],
                    "output_norm.weight": sd["ln_f.weight"], "output_norm.bias": sd["ln_f.bias"]})
        if not hf.config.tie_word_embeddings:
            out["output.weight"] = sd["lm_head.weight"]
        for i in range(L):
            p, b = f"h.{i}.", f"blk.{i}."
            # Conv1D keeps [in, out]; the converter transposes to [out, in] (q, k, v stay fused)
            for src, dst in (("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"),
                             ("mlp.c_fc", "ffn_up"), ("mlp.c_proj", "ffn_down")):
                out[b + dst + ".weight"] = sd[p + src + ".weight"].T.copy()
                out[b + dst + ".bias"] = sd[p + src + ".bias"]
            for src, dst in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm")):
                out[b + dst + ".weight"], out[b + dst + ".bias"] = sd[p + src + ".weight"], sd[p + src + ".bias"]
        return out
    out.update({"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]})
    if not hf.config.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(L):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        for src, dst in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                         ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                         ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"),
                         ("post_attention_layernorm", "ffn_norm")):
            for kind in ("weight", "bias"):
                if f"{p}{src}.{kind}" in sd:
                    out[f"{b}{dst}.{kind}"] = sd[f"{p}{src}.{kind}"]
        if arch == "llama":  # only the llama converter permutes (qwen2 uses NeoX-style RoPE in ggml)
            for kind in ("weight", "bias"):
                if f"{b}attn_q.{kind}" in out:
                    out[f"{b}attn_q.{kind}"] = permute_rope(out[f"{b}attn_q.{kind}"], H)
                    out[f"{b}attn_k.{kind}"] = permute_rope(out[f"{b}attn_k.{kind}"], G)
    return out


def write_gguf(path, arch: str, hf, qtype: Q, tok: dict) -> set:
    """Write hf as a GGUF of architecture arch; -> the set of tensor types used."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)  # writes general.architecture
    w.add_name(f"tiny-{arch}")
    w.add_block_count(L)
    w.add_embedding_length(C)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    if arch == "gpt2":
        w.add_context_length(c.n_positions)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
    else:
        w.add_context_length(c.max_position_embeddings)
        w.add_head_count_kv(G)
        w.add_rope_dimension_count(C // H)
        w.add_rope_freq_base(c.rope_parameters["rope_theta"])
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_vocab_size(len(tok["tokens"]))
    # the real SmolLM2 tokenizer, field by field as the converter writes it
    w.add_tokenizer_model(tok["model"])
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["token_type"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(tok["bos"])
    w.add_eos_token_id(tok["eos"])
    w.add_pad_token_id(tok["pad"])
    w.add_add_bos_token(False)
    w.add_chat_template(tok["chat_template"])
    used = set()
    for name, a in gguf_tensors(arch, hf).items():
        data, used_type = encode(a, qtype)
        w.add_tensor(name, data, raw_dtype=used_type)
        used.add(used_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return used


@pytest.fixture(scope="module")
def smollm_tokenizer_fields():
    reader = gguf.GGUFReader(str(default_gguf_path()))
    f = lambda key: reader.fields[key].contents()  # noqa: E731
    return {"model": f("tokenizer.ggml.model"), "pre": f("tokenizer.ggml.pre"), "tokens": f("tokenizer.ggml.tokens"),
            "token_type": f("tokenizer.ggml.token_type"), "merges": f("tokenizer.ggml.merges"),
            "bos": f("tokenizer.ggml.bos_token_id"), "eos": f("tokenizer.ggml.eos_token_id"),
            "pad": f("tokenizer.ggml.padding_token_id"), "chat_template": f("tokenizer.chat_template")}


def first_ids(tokf: dict, n: int) -> dict:
    """The real tokenizer cut to its first n ids: specials, bytes and the first merges (merge order is
    id order in SmolLM2, so the merges that build those ids are a prefix). gguf's reader parses every
    vocabulary entry in Python (~3 s idle, several times that on a busy machine, for 49k tokens + 49k
    merges), and a parity case reads its file four times (ours, the tensor-type check, transformers'
    config and weight passes): with the full vocabulary the matrix alone would take minutes. Weight
    loading does not depend on the vocabulary size; test_gguf_cache_conversion uses all 49,152."""
    vocab = set(tokf["tokens"][:n])
    merges = [m for m in tokf["merges"] if m.replace(" ", "") in vocab]
    return {**tokf, "tokens": tokf["tokens"][:n], "token_type": tokf["token_type"][:n], "merges": merges}


def transformers_from_gguf(path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return hf.eval()


def dequantized_copy(hf, qtype: Q):
    """Fallback reference where transformers cannot read a file correctly: the HF model itself with
    every weight replaced by its quantize -> dequantize round trip. ggml quantizes along rows and
    the llama permutation moves whole rows, so the two commute: no permutation is needed here."""
    with torch.no_grad():
        for p in hf.parameters():
            data, used = encode(p.numpy(), qtype)
            p.copy_(torch.from_numpy(gguf.quants.dequantize(data, used).reshape(p.shape)))
    return hf


def sample_ids(tok, n_vocab):
    text = "What is 12 + 30?"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.chat_prompt(text)
    assert max(ids) < n_vocab
    return torch.tensor([ids, ids[::-1]])                               # (2, T), real SmolLM2 ids


# ---------------------------------------------------------------------------------------------
# parity: every architecture, every quantization type somewhere

N_VOCAB = 1024
BIAS = {"attention_bias": True}      # llama with q/k/v biases: the converter permutes q/k biases too
UNTIED = {"tie_word_embeddings": False}  # GPT-2 with its own output.weight
CASES = [("llama", Q.F32, {}), ("llama", Q.Q4_0, {}), ("llama", Q.Q4_K, {}), ("llama", Q.Q8_0, BIAS),
         ("qwen2", Q.F16, {}), ("qwen2", Q.Q8_0, {}), ("qwen2", Q.Q6_K, {}),
         ("gpt2", Q.Q8_0, {}), ("gpt2", Q.Q4_K, {}), ("gpt2", Q.F16, UNTIED)]
CASE_IDS = [f"{a}{'+bias' if o == BIAS else '+output' if o == UNTIED else ''}-{q.name}" for a, q, o in CASES]


@pytest.mark.parametrize("arch,qtype,overrides", CASES, ids=CASE_IDS)
def test_gguf_matches_reference(arch, qtype, overrides, smollm_tokenizer_fields, tmp_path):
    tokf = first_ids(smollm_tokenizer_fields, N_VOCAB)
    hf = randomize(tiny_hf(arch, N_VOCAB, **overrides)).eval()
    path = tmp_path / f"tiny-{arch}-{qtype.name}.gguf"
    used = write_gguf(path, arch, hf, qtype, tokf)
    assert used == {t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert qtype in used, f"{qtype.name} not used in {path.name}: {sorted(t.name for t in used)}"

    ours, tok = load_model(path, use_cache=False)
    assert ours.config.architecture == arch and ours.config.vocab_size == N_VOCAB
    assert tok is not None and tok.bos_id == 1 and tok.eos_id == 2
    idx = sample_ids(tok, N_VOCAB)
    if overrides == BIAS:
        # transformers' GGUF config for llama has no attention_bias (it is not in the metadata, and
        # it does not look at the tensors), so it silently drops attn_q/k/v.bias
        ref, what = dequantized_copy(hf, qtype), "the HF model with dequantized weights"
    else:
        ref, what = transformers_from_gguf(path), "transformers reading the GGUF"
    with torch.no_grad():
        a, b = ours(idx), ref(idx).logits
    assert a.abs().max() > 0.1  # not a degenerate model, where a wrong permutation would pass unseen
    assert_close(a, b, 1e-4, f"{arch} {overrides} {qtype.name} GGUF logits vs {what}")


def test_wrong_rope_permutation_is_caught(smollm_tokenizer_fields, tmp_path, monkeypatch):
    # the parity tests above must be able to see a missing un-permute: loading the llama file with
    # unpermute_rope switched off has to move the logits far beyond the 1e-4 tolerance
    tokf = first_ids(smollm_tokenizer_fields, N_VOCAB)
    hf = randomize(tiny_hf("llama", N_VOCAB)).eval()
    write_gguf(tmp_path / "tiny.gguf", "llama", hf, Q.F32, tokf)
    monkeypatch.setattr(load, "unpermute_rope", lambda w, n_heads: w)
    ours, tok = load_model(tmp_path / "tiny.gguf", use_cache=False)
    idx = sample_ids(tok, N_VOCAB)
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff > 1e-2, f"logits without the un-permute differ by only {diff:.3g}"


# ---------------------------------------------------------------------------------------------
# the cache: a GGUF is converted once into an HF directory, later loads read that

def test_gguf_cache_conversion(smollm_tokenizer_fields, tmp_path, monkeypatch):
    # the full 49,152-token SmolLM2 vocabulary here, so the tokenizer goes GGUF -> tokenizer.json -> back
    monkeypatch.setenv("IVFT_CACHE", str(tmp_path / "cache"))
    n_vocab = len(smollm_tokenizer_fields["tokens"])
    hf = randomize(tiny_hf("llama", n_vocab))
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", hf, Q.Q4_0, smollm_tokenizer_fields)
    cached = gguf_cache_path(path)
    assert cached.is_relative_to(tmp_path / "cache") and not cached.exists()

    first, tok1 = load_model(path)
    assert first.config.vocab_size == n_vocab == 49152
    assert (cached / "config.json").is_file() and (cached / "model.safetensors").is_file()

    def no_gguf(*args, **kwargs):
        raise AssertionError("the second load read the GGUF instead of the cached HF directory")
    monkeypatch.setattr(load, "read_gguf", no_gguf)
    second, tok2 = load_model(path)

    text = "a   1 b\n\n22 <|im_end|> héllo"
    assert tok2.encode(text) == tok1.encode(text)
    assert tok2.chat_prompt(text) == tok1.chat_prompt(text)
    idx = sample_ids(tok1, n_vocab)
    with torch.no_grad():
        a, b = first(idx), second(idx)
    assert torch.equal(a, b), f"cached load differs: max abs diff {(a - b).abs().max().item():.3g}"


def test_gguf_cache_keeps_gpt2_output_weight(smollm_tokenizer_fields, tmp_path, monkeypatch):
    # llama.cpp's gpt2 graph uses output.weight when the file has one (llama-quantize then gives it
    # its own type, e.g. Q6_K in a Q4_K_M file), so it can differ from token_embd
    monkeypatch.setenv("IVFT_CACHE", str(tmp_path / "cache"))
    hf = randomize(tiny_hf("gpt2", N_VOCAB, tie_word_embeddings=False)).eval()
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "gpt2", hf, Q.Q8_0, first_ids(smollm_tokenizer_fields, N_VOCAB))
    direct, tok = load_model(path, use_cache=False)
    load_model(path)                                                    # converts into the cache
    cached, _ = load_model(path)                                        # reads it
    idx = sample_ids(tok, N_VOCAB)
    with torch.no_grad():
        a, b = direct(idx), cached(idx)
    assert torch.equal(a, b), f"cached GPT-2 differs: max abs diff {(a - b).abs().max().item():.3g}"
