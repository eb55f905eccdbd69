"""
A from-scratch decoder-only transformer with explicit per-head attention outputs and an
intervention API, covering the Llama family (Llama-2/3, SmolLM2, Qwen2/3, Mistral), Gemma-3 (text)
and GPT-2 by a handful of config switches. Read it top to bottom: config, norms and RoPE, attention,
MLP, block, model, generation.

References:
1) Llama: https://github.com/meta-llama/llama/blob/main/llama/model.py (RMSNorm, RoPE, SwiGLU, GQA)
2) HF transformers modeling_llama.py / modeling_gpt2.py / modeling_qwen3.py / modeling_gemma3.py and
   modeling_rope_utils.py: parameter names, the rotate_half RoPE convention and the RoPE scalings, so
   that an HF checkpoint loads by plain copy (see load.py)
5) Gemma 3 technical report (arXiv 2503.19786): local sliding-window layers interleaved with global
   ones, q/k norms, pre- and post-norms around attention and MLP
3) nanoGPT (karpathy) for the overall shape of this file
4) Todd et al. 2023, "Function Vectors in Large Language Models" (arXiv 2310.15213), and
   TransformerLens for the vocabulary of interventions: z = per-head attention output before the
   output projection W_O, "resid" = the residual stream.

Shape legend (used in every comment):
    B batch, T sequence length (new tokens this call), S = past + T (keys), C d_model (hidden_size),
    H query heads, G key/value heads (GQA groups), D head dim, F MLP width, V vocab, L layers,
    P positions per row at which an intervention acts.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# Config. Field names are those of HF config.json files, so loading a config is a dict lookup.

@dataclass
class ModelConfig:
    vocab_size: int = 49152              # V
    hidden_size: int = 576               # C, the residual stream width
    intermediate_size: int = 1536        # F, the MLP width
    num_hidden_layers: int = 30          # L
    num_attention_heads: int = 9         # H, query heads
    num_key_value_heads: int | None = None  # G, kv heads (GQA); None = H (plain multi-head)
    head_dim: int | None = None          # D; None = C // H
    max_position_embeddings: int = 8192  # longest sequence (RoPE table / learned positions size)
    norm_eps: float = 1e-5               # epsilon of RMSNorm / LayerNorm
    rope_theta: float = 10000.0          # RoPE base
    rope_scaling: dict | None = None     # {"rope_type": "llama3" | "linear" | "yarn", "factor", ...} or None
    attention_bias: bool = False         # bias on q/k/v projections (Qwen2: True)
    tie_word_embeddings: bool = False    # lm_head shares embed_tokens' weight (SmolLM2, GPT-2, Gemma)
    # family switches: Llama-style defaults, GPT-2 sets the first four
    norm: str = "rmsnorm"                # "rmsnorm" | "layernorm" (LayerNorm has a bias)
    position: str = "rope"               # "rope" | "learned" (absolute position embeddings, GPT-2)
    mlp: str = "swiglu"                  # "swiglu" (gate/up/down, SiLU) | "geglu" (gate/up/down, tanh GELU:
                                         # Gemma) | "gelu" (up/down, tanh GELU: GPT-2)
    bias: bool = False                   # bias on o_proj and the MLP linears (GPT-2: True)
    qk_norm: bool = False                # RMSNorm over each head's q and k before RoPE (Qwen3, Gemma-3)
    norm_plus_one: bool = False          # RMSNorm scales by 1 + weight (Gemma: weights centred on 0)
    sandwich_norm: bool = False          # also normalise the attention and MLP outputs (Gemma-2/3)
    scale_embeddings: bool = False       # embeddings times sqrt(C) (Gemma)
    query_pre_attn_scalar: float | None = None    # scores times this**-0.5; None = D**-0.5 (Gemma-3)
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap) when set
    # sliding-window attention: a "sliding_attention" layer sees only the keys less than
    # sliding_window positions back (itself included); "full_attention" layers see all of the past
    sliding_window: int | None = None
    layer_types: list | None = None      # per layer; None = all "full_attention", or all
                                         # "sliding_attention" when sliding_window is set (Mistral)
    rope_local_theta: float | None = None  # RoPE base of sliding layers, unscaled (Gemma-3's
                                           # rope_local_base_freq); None = the global RoPE
    architecture: str = "llama"          # the HF family name, kept for export ("llama", "qwen2", "qwen3",
                                         # "mistral", "gemma3_text", "gpt2")

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        for name, allowed in (("norm", ("rmsnorm", "layernorm")), ("position", ("rope", "learned")),
                              ("mlp", ("swiglu", "geglu", "gelu"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"config field {name}={getattr(self, name)!r}, expected one of {allowed}")
        if self.layer_types is None:
            kind = "full_attention" if self.sliding_window is None else "sliding_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        self.layer_types = list(self.layer_types)
        bad = set(self.layer_types) - {"full_attention", "sliding_attention"}
        if len(self.layer_types) != self.num_hidden_layers or bad:
            raise ValueError(f"layer_types must name one of full_attention / sliding_attention for each "
                             f"of the {self.num_hidden_layers} layers, got {self.layer_types}")
        if "sliding_attention" in self.layer_types and not (self.sliding_window or 0) >= 1:
            raise ValueError(f"sliding_window={self.sliding_window!r}: sliding layers need a window >= 1")
        if self.position == "rope":
            rope_init(self.head_dim, self.rope_theta, self.rope_scaling)   # an unknown rope type fails here


# ---------------------------------------------------------------------------------------------
# Norms and rotary position embeddings

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.eps = eps
        self.plus_one = plus_one
        # Gemma stores w - 1 (so its weights start at 0): its scale is 1 + weight
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 even under bf16 autocast, as HF and Meta do: the mean of squares of a
        # 576-wide bf16 vector loses enough precision to change logits visibly
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:
            # Gemma scales in fp32 and rounds once; Llama rounds, then scales (HF does each its way)
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps, cfg.norm_plus_one)
    return nn.LayerNorm(dim, eps=cfg.norm_eps)


ROPE_TYPES = ("default", "linear", "llama3", "yarn")   # "dynamic" and "longrope" depend on the sequence length


def rope_type(scaling: dict | None) -> str:
    return "default" if not scaling else scaling.get("rope_type", scaling.get("type")) or "default"


def rope_init(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Per-pair rotation frequencies [D/2] and the factor that cos and sin are multiplied by (YaRN's
    attention scaling, else 1), for the RoPE types of HF modeling_rope_utils.py that do not depend
    on the sequence length."""
    d = head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    kind, sc = rope_type(scaling), scaling
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type={kind!r} is not supported "
                         f"(supported: {', '.join(ROPE_TYPES)})")
    if kind == "default":
        return inv_freq.float(), 1.0
    if kind == "linear":   # positions divided by `factor` (Chen et al. 2023, position interpolation)
        return (inv_freq / sc["factor"]).float(), 1.0
    if kind == "yarn":
        return yarn_inv_freq(inv_freq, d, theta, sc)
    # Llama-3.1: wavelengths longer than old_ctx/low_freq_factor are slowed down by `factor`, those
    # shorter than old_ctx/high_freq_factor are kept, and the band between is interpolated smoothly.
    factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_ctx = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
    out = torch.where(mid, interpolated, out)
    return out.float(), 1.0


def yarn_inv_freq(inv_freq, d: int, theta: float, sc: dict) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023, arXiv 2309.00071): pairs that turn fewer than beta_slow times over the
    original context are interpolated (divided by `factor`), those turning more than beta_fast times
    are kept, with a linear ramp between; cos and sin are scaled by 0.1 ln(factor) + 1."""
    factor, old_ctx = sc["factor"], sc["original_max_position_embeddings"]

    def mscale(m=1.0):
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    attn = sc.get("attention_factor")
    if attn is None:
        m, m_all = sc.get("mscale"), sc.get("mscale_all_dim")
        attn = mscale(m) / mscale(m_all) if m and m_all else mscale()

    def pair_index(turns):   # the (fractional) pair that turns `turns` times over old_ctx positions
        return d * math.log(old_ctx / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_index(sc.get("beta_fast") or 32), pair_index(sc.get("beta_slow") or 1)
    if sc.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    high = high + 0.001 if low == high else high          # as HF: no division by zero
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp                                        # 1: extrapolate (keep), 0: interpolate
    return (inv_freq / factor * (1 - keep) + inv_freq * keep).float(), float(attn)


def rotate_half(x):
    # HF convention: the head dim is split into two halves [x1, x2] that rotate as pairs (x1_i, x2_i).
    # (GGUF files store q/k permuted for the interleaved convention; load.py undoes that.)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # x: (B, nh, T, D), cos/sin: (B, 1, T, D)
    return x * cos + rotate_half(x) * sin


# ---------------------------------------------------------------------------------------------
# Interventions: an explicit forward argument instead of hooks.

@dataclass
class Intervention:
    """What to read or edit during one forward pass.

    `pos` selects, per batch row, the absolute token positions (column indices of the full sequence,
    past tokens included) where everything below acts: a LongTensor [B] (one position per row, e.g.
    the last prompt token) or [B, P]; None means every position. Layers are 0-indexed blocks.

    Reads (filled in during the forward; tensors stay in the autograd graph, detach them if needed):
      record_z:      layers whose per-head z is stored in .z[layer]          [B, P, H, D]
      record_resid:  layers whose residual stream *after* the block is stored in .resid[layer] [B, P, C]
    Edits (applied at `pos`):
      set_z / add_z: {layer: (heads LongTensor [k], values [k, D] or [B, k, D])} replace / add to z of
                     those heads before the output projection W_O
      add_resid:     {layer: vector [C] or [B, C]} added, times `scale`, to the residual stream after
                     the block. `scale` is a float or a per-row tensor [B] (e.g. the guidance alpha).
    An Intervention with nothing set leaves the forward bit-identical to passing None.
    """
    pos: torch.Tensor | None = None
    record_z: tuple = ()
    record_resid: tuple = ()
    set_z: dict = field(default_factory=dict)
    add_z: dict = field(default_factory=dict)
    add_resid: dict = field(default_factory=dict)
    scale: float | torch.Tensor = 1.0
    z: dict = field(default_factory=dict)
    resid: dict = field(default_factory=dict)

    def touches_z(self, layer: int) -> bool:
        return layer in self.set_z or layer in self.add_z or layer in self.record_z

    def touches_resid(self, layer: int) -> bool:
        return layer in self.add_resid or layer in self.record_resid

    def _select(self, start: int, T: int, B: int, device):
        """Rows and chunk-relative columns of `pos` that fall inside this call's tokens
        [start, start+T) (with a KV cache, a call covers only part of the sequence)."""
        if self.pos is None:
            return None
        pos = self.pos.to(device)
        pos = pos[:, None] if pos.dim() == 1 else pos                      # (B, P)
        rows = torch.arange(B, device=device)[:, None].expand_as(pos)      # (B, P)
        rel = pos - start
        keep = (rel >= 0) & (rel < T)
        return rows, rel, keep

    def _gather(self, x, sel):
        # x: (B, T, ...) -> (B, P, ...); positions outside this chunk read as zeros
        if sel is None:
            return x
        rows, rel, keep = sel
        out = x[rows, rel.clamp(0, x.shape[1] - 1)]
        mask = keep.view(*keep.shape, *([1] * (out.dim() - 2)))
        return torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=out.device))

    @staticmethod
    def _pairs(sel, B, T, device):
        """The (row, column) pairs to edit, flattened: two LongTensors [N]."""
        if sel is None:
            rows = torch.arange(B, device=device).repeat_interleave(T)
            return rows, torch.arange(T, device=device).repeat(B)
        rows, rel, keep = sel
        return rows[keep], rel[keep]

    def edit_z(self, layer: int, z, start: int):
        # z: (B, T, H, D)
        B, T, H, D = z.shape
        sel = self._select(start, T, B, z.device)
        for table, overwrite in ((self.set_z, True), (self.add_z, False)):
            if layer not in table:
                continue
            heads, values = table[layer]
            heads = torch.as_tensor(heads, device=z.device).view(-1)           # (k)
            values = values.to(z.device, z.dtype)
            values = values.expand(B, len(heads), D) if values.dim() == 2 else values   # (B, k, D)
            b, t = self._pairs(sel, B, T, z.device)                              # (N), (N)
            # out of place (clone + index_put) so autograd still sees the original z
            z = z.index_put((b[:, None], t[:, None], heads[None, :]), values[b],
                            accumulate=not overwrite)
        if layer in self.record_z:
            self.z[layer] = self._gather(z, sel)
        return z

    def edit_resid(self, layer: int, x, start: int):
        # x: (B, T, C)
        B, T, C = x.shape
        sel = self._select(start, T, B, x.device)
        if layer in self.add_resid:
            v = self.add_resid[layer].to(x.device, x.dtype)                 # (C) or (B, C)
            v = v.expand(B, C) if v.dim() == 1 else v
            s = torch.as_tensor(self.scale, dtype=x.dtype, device=x.device)
            v = v * (s.view(-1, 1) if s.dim() == 1 else s)                  # (B, C)
            b, t = self._pairs(sel, B, T, x.device)
            x = x.index_put((b, t), v[b], accumulate=True)
        if layer in self.record_resid:
            self.resid[layer] = self._gather(x, sel)
        return x


# ---------------------------------------------------------------------------------------------
# KV cache: per layer, keys and values of all tokens seen so far.

class KVCache:
    """Per layer, keys k[i] and values v[i] (B, G, S, D) of all tokens seen so far.

    Appending with torch.cat copies the whole cache at every decoding step (14% of a step on a CPU).
    Instead, when a layer's tensors must grow, they are copied once into a buffer with room for
    `headroom` more tokens, and k[i], v[i] become views of its first S positions; later updates
    write into that room in place. headroom = 0 (the default) allocates exactly what is needed,
    i.e. torch.cat. Callers may also assign k[i], v[i] directly (a shared prefix, a copy of some
    rows): a tensor the cache did not allocate is never written into; it is copied on first update."""

    def __init__(self, n_layers: int, headroom: int = 0):
        self.k = [None] * n_layers
        self.v = [None] * n_layers
        self.headroom = headroom
        self._buf = [None] * n_layers   # (k buffer, v buffer, the views handed out) or None

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, layer: int, k, v):
        old_k, old_v = self.k[layer], self.v[layer]
        if old_k is None:
            self.k[layer], self.v[layer] = k, v
            return k, v
        S, T = old_k.shape[2], k.shape[2]
        buf = self._buf[layer]
        # write in place only into our own buffer, and only if k[layer] is still the view we made
        # (not reassigned by a caller) and there is room
        if buf is None or buf[2] is not old_k or buf[0].shape[2] < S + T:
            B, G, _, D = old_k.shape
            kb = old_k.new_empty(B, G, S + T + self.headroom, D)
            vb = old_v.new_empty(B, G, S + T + self.headroom, D)
            kb[:, :, :S], vb[:, :, :S] = old_k, old_v
            buf = (kb, vb)
        kb, vb = buf[0], buf[1]
        kb[:, :, S:S + T], vb[:, :, S:S + T] = k, v
        self.k[layer], self.v[layer] = kb[:, :, :S + T], vb[:, :, :S + T]
        self._buf[layer] = (kb, vb, self.k[layer])
        return self.k[layer], self.v[layer]


# ---------------------------------------------------------------------------------------------
# Attention, MLP, block

class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, H, G, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.n_head, self.n_kv_head, self.head_dim = H, G, D
        # separate q/k/v (not one fused matrix) so that heads and GQA groups are visible
        self.q_proj = nn.Linear(C, H * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(C, G * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(C, G * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * D, C, bias=cfg.bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:  # one RMSNorm over D, shared by all heads (Qwen3, Gemma-3)
            self.q_norm = RMSNorm(D, cfg.norm_eps, cfg.norm_plus_one)
            self.k_norm = RMSNorm(D, cfg.norm_eps, cfg.norm_plus_one)
        # None: SDPA's default 1/sqrt(D); Gemma-3 scales by 1/sqrt(query_pre_attn_scalar)
        self.scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5

    def forward(self, x, rope, mask, cache, layer, edit, start):
        B, T, _ = x.shape
        H, G, D = self.n_head, self.n_kv_head, self.head_dim
        q = self.q_proj(x).view(B, T, H, D)                   # (B, T, H, D)
        k = self.k_proj(x).view(B, T, G, D)                   # (B, T, G, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)           # (B, H, T, D), (B, G, T, D)
        v = self.v_proj(x).view(B, T, G, D).transpose(1, 2)  # (B, G, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)                  # (B, G, S, D)
        # grouped-query attention (G < H): each kv head serves H/G consecutive query heads. SDPA's
        # enable_gqa does that without materialising repeated keys and values (repeat_interleave
        # copied the whole cache twice per layer and step: ~4x slower attention when decoding)
        gqa = G != H
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=self.scale,
                                               enable_gqa=gqa)                      # (B, H, T, D)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        z = y.transpose(1, 2)                                 # (B, T, H, D): per-head outputs
        if edit is not None and edit.touches_z(layer):
            z = edit.edit_z(layer, z, start)
        return self.o_proj(z.reshape(B, T, H * D))            # (B, T, C)

    def head_contributions(self, z):
        """Each head's write into the residual stream: z_h through its own D-column slice of W_O.
        z: (..., H, D) -> (..., H, C). A contraction over D: nothing of size H*D*C per token is
        materialised. Summed over heads, plus o_proj.bias, this is the attention output."""
        W = self.o_proj.weight.view(-1, self.n_head, self.head_dim)   # (C, H, D)
        return torch.einsum("...hd,chd->...hc", z.to(W.dtype), W)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, Fd = cfg.hidden_size, cfg.intermediate_size
        self.gated = cfg.mlp in ("swiglu", "geglu")
        if self.gated:
            self.gate_proj = nn.Linear(C, Fd, bias=cfg.bias)
        self.up_proj = nn.Linear(C, Fd, bias=cfg.bias)
        self.down_proj = nn.Linear(Fd, C, bias=cfg.bias)
        # tanh GELU: GPT-2's "gelu_new" and Gemma's "gelu_pytorch_tanh" are the same function
        self.act = F.silu if cfg.mlp == "swiglu" else functools.partial(F.gelu, approximate="tanh")

    def forward(self, x):
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)). With sandwich_norm (Gemma)
    the attention and MLP outputs are normalised too before they are added."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attention_type = cfg.layer_types[layer]   # picks this layer's RoPE table and mask
        self.input_layernorm = make_norm(cfg, cfg.hidden_size)
        self.self_attn = Attention(cfg)
        # HF names: in Llama post_attention_layernorm is the MLP's input norm; in Gemma it normalises
        # the attention output, and pre_feedforward_layernorm is the MLP's input norm
        self.post_attention_layernorm = make_norm(cfg, cfg.hidden_size)
        self.sandwich = cfg.sandwich_norm
        if cfg.sandwich_norm:
            self.pre_feedforward_layernorm = make_norm(cfg, cfg.hidden_size)
            self.post_feedforward_layernorm = make_norm(cfg, cfg.hidden_size)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, cache, layer, edit, start):
        # rope, mask: per attention type, as Transformer.embed returns them
        kind = self.attention_type
        a = self.self_attn(self.input_layernorm(x), rope[kind], mask[kind], cache, layer, edit, start)
        if self.sandwich:
            x = x + self.post_attention_layernorm(a)
            x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        else:
            x = x + a
            x = x + self.mlp(self.post_attention_layernorm(x))
        if edit is not None and edit.touches_resid(layer):
            x = edit.edit_resid(layer, x, start)
        return x


def checkpointed_block(block, x, rope, mask, layer, edit, start):
    """block(x) under torch.utils.checkpoint: the backward reruns it (LoRA dropout's RNG put back) instead
    of keeping its activations. A rerun records into fresh dicts: the same ops, the forward's records kept."""
    calls = []
    def run(x):
        e = edit if edit is None or not calls else replace(edit, z={}, resid={})
        calls.append(1)
        return block(x, rope, mask, None, layer, e, start)
    return torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)


# ---------------------------------------------------------------------------------------------
# The model. Parameter names equal HF LlamaForCausalLM's ("model.layers.3.self_attn.q_proj.weight",
# "lm_head.weight"), so a Llama-family safetensors file loads with load_state_dict as it is.

class SoftcappedHead(nn.Linear):
    """The output layer when final_logit_softcapping is set: logits = cap * tanh(logits / cap). It is
    part of lm_head so that every caller of model.lm_head (the engine's fp32 head, extract_iv.py)
    gets the same logits as forward."""

    def __init__(self, in_features: int, out_features: int, cap: float):
        super().__init__(in_features, out_features, bias=False)
        self.cap = cap

    def forward(self, x):
        return torch.tanh(super().forward(x) / self.cap) * self.cap


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.position == "learned":
            self.model.embed_positions = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.model.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.model.norm = make_norm(cfg, cfg.hidden_size)
        if cfg.final_logit_softcapping is None:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        else:
            self.lm_head = SoftcappedHead(cfg.hidden_size, cfg.vocab_size, cfg.final_logit_softcapping)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if cfg.position == "rope":
            self.init_rope()
        self.grad_checkpointing = False    # recompute blocks in the backward (checkpointed_block)

    def init_rope(self, device=None):
        """The RoPE frequencies: buffers, not saved with the weights (persistent=False), derived from
        the config. inv_freq serves full-attention layers (and sliding ones unless rope_local_theta
        is set: then inv_freq_local, unscaled, as Gemma-3's local layers)."""
        cfg = self.config
        inv_freq, self.rope_attention_factor = rope_init(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        if cfg.rope_local_theta is not None:
            local, _ = rope_init(cfg.head_dim, cfg.rope_local_theta, None)
            self.register_buffer("inv_freq_local", local.to(device), persistent=False)

    def init_weights(self, std: float = 0.02):
        """Random init for tests and from-scratch use (pretrained weights overwrite all of it):
        linear and embedding weights N(0, std), biases 0, norm scales 1 (LayerNorm bias 0)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (RMSNorm, nn.LayerNorm)):
                # scale 1: weight 1, or 0 where the scale is 1 + weight (Gemma)
                nn.init.zeros_(m.weight) if getattr(m, "plus_one", False) else nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        if self.config.position == "rope":
            self.init_rope(self.inv_freq.device)
        return self

    @property
    def n_layers(self):
        return self.config.num_hidden_layers

    def head_contributions(self, layer: int, z):
        """Per-head residual contributions of layer `layer`: z (..., H, D) -> (..., H, C)."""
        return self.model.layers[layer].self_attn.head_contributions(z)

    def _positions_and_masks(self, B, T, start, pad_mask, device):
        """Position ids (B, T) and, per attention type, the attention mask (B, 1, T, S) or None (plain
        causal, SDPA's fast path).

        pad_mask: bool (B, S), True at real tokens, covering past + new tokens. With left padding
        a row's first real token gets position 0, as if it were unpadded, so left- and right-padded
        batches give the same numbers. A sliding-window layer lets query i see key j when
        pos_i - pos_j < sliding_window: the window counts positions, not columns, so a padded row
        again computes what it computes alone (transformers counts columns: the same with left
        padding)."""
        cfg, S = self.config, start + T
        types = set(cfg.layer_types)
        masks = {t: None for t in types}
        if pad_mask is None:
            pos = torch.arange(start, S, device=device).expand(B, T)
            # several new tokens after a cached past: SDPA's is_causal would align the triangle to
            # the top-left corner, so the mask is spelled out (all tokens real); so is a window
            # that the sequence has outgrown
            need = {t for t in types if not (start == 0 or T == 1)
                    or (t == "sliding_attention" and S > cfg.sliding_window)}
            if not need:
                return pos, masks
            pad_mask = torch.ones(B, S, dtype=torch.bool, device=device)
        else:
            need = types
        pad_mask = pad_mask.to(device=device, dtype=torch.bool)
        if pad_mask.shape[1] != S:
            raise ValueError(f"pad_mask covers {pad_mask.shape[1]} tokens, but past + new = {start} + {T}")
        key_pos = (pad_mask.long().cumsum(-1) - 1).clamp(min=0)              # (B, S)
        pos = key_pos[:, start:]                                              # (B, T)
        q_idx = torch.arange(start, S, device=device)[:, None]
        k_idx = torch.arange(S, device=device)[None, :]
        full = (k_idx <= q_idx)[None] & pad_mask[:, None, :]                  # (B, T, S)
        # a padding query sees no real key; let it see itself so softmax has no empty row (its output
        # is never used, but a NaN there would leak through the backward pass)
        itself = (k_idx == q_idx)[None]                                       # (1, T, S)
        for t in need:
            m = full
            if t == "sliding_attention":
                m = full & (pos[:, :, None] - key_pos[:, None, :] < cfg.sliding_window)
            masks[t] = (m | itself)[:, None]                                  # (B, 1, T, S)
        return pos, masks

    def _rope_table(self, pos, inv_freq, dtype):
        freqs = pos[..., None].float() * inv_freq                             # (B, T, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)                               # (B, T, D)
        cos, sin = emb.cos(), emb.sin()
        if self.rope_attention_factor != 1.0:   # YaRN scales cos and sin (so q.k by its square)
            cos, sin = cos * self.rope_attention_factor, sin * self.rope_attention_factor
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]                 # (B, 1, T, D)

    def embed(self, idx, start: int = 0, pad_mask=None):
        """The inputs of block 0 for tokens idx (B, T) at absolute positions start.. (after `start`
        cached tokens): embeddings x (B, T, C), and per attention type ("full_attention",
        "sliding_attention") the RoPE tables (None for learned positions) and the attention mask.
        Public so that code running blocks one by one (extract_iv.py) shares it."""
        cfg = self.config
        B, T = idx.shape
        pos, masks = self._positions_and_masks(B, T, start, pad_mask, idx.device)
        x = self.model.embed_tokens(idx)                                      # (B, T, C)
        if cfg.scale_embeddings:   # Gemma: sqrt(C), rounded to the embedding's dtype as HF does
            x = x * torch.tensor(cfg.hidden_size ** 0.5).to(x.dtype)
        rope = dict.fromkeys(masks)
        if cfg.position == "learned":
            x = x + self.model.embed_positions(pos)
            return x, rope, masks
        table = self._rope_table(pos, self.inv_freq, x.dtype)
        for t in rope:
            local = t == "sliding_attention" and cfg.rope_local_theta is not None
            rope[t] = self._rope_table(pos, self.inv_freq_local, x.dtype) if local else table
        return x, rope, masks

    def forward(self, idx, targets=None, *, pad_mask=None, cache: KVCache | None = None,
                intervention: Intervention | None = None, return_hidden=False):
        """idx (B, T) token ids -> logits (B, T, V) at every position, and with targets (B, T)
        (targets[b, t] = the token after idx[b, t]; -100 = ignored, e.g. prompt tokens) also the
        mean cross-entropy over non-ignored targets."""
        start = cache.length if cache is not None else 0
        x, rope, masks = self.embed(idx, start, pad_mask)
        recompute = self.grad_checkpointing and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.model.layers):
            if recompute:    # only when a backward will follow
                x = checkpointed_block(block, x, rope, masks, i, intervention, start)
            else:
                x = block(x, rope, masks, cache, i, intervention, start)
        x = self.model.norm(x)
        if return_hidden:
            return x
        logits = self.lm_head(x)                                              # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                 stop_ids=(), pad_mask=None, intervention: Intervention | None = None,
                 generator: torch.Generator | None = None):
        """Batched KV-cache decoding. idx (B, T) prompts, left-padded when lengths differ (pass
        pad_mask). temperature 0 = greedy. Returns the new tokens (B, N); a row that hit a stop id
        is filled with its stop id afterwards. The intervention acts in the prefill only, at the
        absolute positions it names (prompt positions)."""
        B = idx.shape[0]
        cache = KVCache(self.n_layers, headroom=max_new_tokens)   # decoding then writes in place
        stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=idx.device)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        out = []
        logits = self(idx, pad_mask=pad_mask, cache=cache, intervention=intervention)[:, -1]
        for _ in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                logits = logits.float() / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=generator)[:, 0]
            if len(stop):
                prev = out[-1] if out else None
                nxt = torch.where(done, prev if prev is not None else nxt, nxt)
                done = done | torch.isin(nxt, stop)
            out.append(nxt)
            if done.all():
                break
            if pad_mask is not None:
                pad_mask = torch.cat([pad_mask, torch.ones(B, 1, dtype=torch.bool, device=idx.device)], 1)
            logits = self(nxt[:, None], pad_mask=pad_mask, cache=cache)[:, -1]
        return torch.stack(out, 1) if out else idx.new_zeros(B, 0)
