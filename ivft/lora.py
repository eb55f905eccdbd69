"""
LoRA adapters for model.Transformer (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models", arXiv 2106.09685), written so that the wrapped model keeps working everywhere:

- A LoRA layer *is* an nn.Linear (subclass) that keeps its frozen `weight`/`bias` under the same
  names, so HF-layout checkpoints, `Attention.head_contributions` (which reads `o_proj.weight`) and
  every `model.layers.i.self_attn.q_proj.weight` lookup still work.
- The adapter adds  scale * B(A(dropout(x)))  with A [r, in] ~ Kaiming-uniform, B [out, r] = 0, so a
  fresh adapter changes nothing (scale = alpha / r).
- `adapters_off(model)` turns every adapter off for one block of code: the base weights are then
  the frozen reference model, with no second copy (what IV-guided training needs for its KL).
- `merge(model)` folds W += scale * B @ A in place and turns the layers back into plain nn.Linear,
  reusing the same Parameter objects, so an optimizer or a tied weight elsewhere is not disturbed.
- The adapters can be written and read in PEFT's layout (adapter_model.safetensors with keys
  "base_model.model.<name>.lora_A.weight", adapter_config.json), so `peft` can open them.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# Linear layers of model.Transformer a LoRA target may name (the HF/PEFT module names).
KNOWN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Linear):
    """y = x W^T + b + scale * dropout(x) A^T B^T, with W and b frozen."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                 bias: bool = True, device=None, dtype=None):
        # built on the meta device for W (the real W is assigned by `wrap`), so no throwaway copy of
        # a large matrix is ever allocated
        super().__init__(in_features, out_features, bias=bias, device="meta", dtype=dtype)
        self.r, self.alpha = r, alpha
        self.scale = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=torch.float32))
        # same init as the LoRA paper / PEFT: A like a default nn.Linear, B zero (adapter starts at 0)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    @classmethod
    def wrap(cls, linear: nn.Linear, r: int, alpha: float, dropout: float) -> "LoRALinear":
        new = cls(linear.in_features, linear.out_features, r, alpha, dropout,
                  bias=linear.bias is not None, device=linear.weight.device)
        # the very same Parameter objects: nothing is copied, and the frozen base stays in its dtype
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        # the adapter is kept in fp32 (it is what gets trained) even when the frozen base is bf16, so
        # x is cast to it; under autocast the two small matmuls still run in the autocast dtype
        a = self.lora_dropout(x.to(self.lora_A.dtype))
        return y + (F.linear(F.linear(a, self.lora_A), self.lora_B) * self.scale).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        # (out, r) @ (r, in) -> (out, in), the update the adapter stands for
        return (self.lora_B @ self.lora_A) * self.scale

    def extra_repr(self):
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}"


@dataclass(frozen=True)
class LoraSpec:
    """The adapters of a run: rank, scale numerator (scale = alpha / r), input dropout, the adapted
    linear layers, and whether they are merged into the weights after every task."""
    r: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    merge: bool = True


def parse_targets(spec) -> tuple[str, ...]:
    names = tuple(t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip())
    bad = [t for t in names if t not in KNOWN_TARGETS]
    if not names or bad:
        raise ValueError(f"LoRA targets {bad or spec!r} not understood; choose from {', '.join(KNOWN_TARGETS)}")
    return names


def check_targets(model: nn.Module, targets) -> tuple[str, ...]:
    """Every target must name linear layers of this model's family (GPT-2 has no gate_proj): one
    that names none would otherwise be skipped without a word."""
    targets = parse_targets(targets)
    have = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)} - {"lm_head"}
    missing = [t for t in targets if t not in have]
    if missing:
        family = getattr(getattr(model, "config", None), "architecture", "this")
        raise ValueError(f"--lora_targets {','.join(missing)}: a {family} model has no such linear layer "
                         f"(its linear layers: {','.join(t for t in KNOWN_TARGETS if t in have)})")
    return targets


def add_lora(model: nn.Module, r: int, alpha: float, dropout: float, targets=("q_proj", "v_proj")) -> list[str]:
    """Freeze every parameter of `model`, then replace each nn.Linear whose name ends in one of
    `targets` by a LoRALinear. Returns the wrapped modules' names."""
    targets = check_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(module, child_name, LoRALinear.wrap(child, r, alpha, dropout))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"no linear layer named {', '.join(targets)} in the model")
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


@contextmanager
def adapters_off(model: nn.Module):
    """Inside the block the model computes with its base weights only (the frozen reference)."""
    layers = list(lora_layers(model).values())
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(layers, before):
            m.enabled = e


@torch.no_grad()
def merge(model: nn.Module) -> int:
    """Fold every adapter into its base weight (W += scale * B @ A, rounded to W's dtype) and put a
    plain nn.Linear back in its place. Returns the number of layers merged."""
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.weight.add_(child.delta_weight().to(child.weight.dtype))
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                  device="meta")
                plain.weight, plain.bias = child.weight, child.bias
                setattr(module, child_name, plain)
                count += 1
    return count


@torch.no_grad()
def split_state_dict(sd: dict, scale: float) -> tuple[dict, dict]:
    """A LoRA model's state dict -> (HF state dict with every adapter merged in, adapters in PEFT
    naming: base_model.model.<module>.lora_A.weight [r, in], lora_B.weight [out, r]). Works on plain
    dicts, so it also serves a state dict gathered from a sharded (FSDP) model. The merge is the
    same arithmetic as `merge`, so exporting and merging give identical tensors."""
    merged, adapters = {}, {}
    for k, v in sd.items():
        if k.endswith((".lora_A", ".lora_B")):
            module, ab = k.rsplit(".", 1)
            adapters[f"base_model.model.{module}.{ab}.weight"] = v.detach().contiguous()
            continue
        module = k[:-len(".weight")] if k.endswith(".weight") else None
        if module is not None and f"{module}.lora_A" in sd:
            delta = (sd[f"{module}.lora_B"] @ sd[f"{module}.lora_A"]) * scale      # (out, r) @ (r, in)
            v = v + delta.to(v.dtype)
        merged[k] = v
    return merged, adapters


def scale_of(model: nn.Module) -> float:
    """alpha / r, shared by every adapter that add_lora made."""
    scales = {m.scale for m in lora_layers(model).values()}
    if len(scales) != 1:
        raise ValueError(f"adapters with different scales {sorted(scales)}")
    return scales.pop()


def merged_state_dict(model: nn.Module) -> dict:
    """The model's state dict as if merged (HF names, no adapter keys), without touching the model."""
    return split_state_dict(model.state_dict(), scale_of(model))[0]


def adapter_state_dict(model: nn.Module) -> dict:
    return split_state_dict(model.state_dict(), scale_of(model))[1]


def adapter_config(model: nn.Module, base_model: str | None) -> dict:
    layers = list(lora_layers(model).items())
    first = layers[0][1]
    targets = sorted({n.rsplit(".", 1)[-1] for n, _ in layers})
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.r, "lora_alpha": first.alpha,
            "lora_dropout": dropout, "target_modules": targets, "bias": "none",
            "base_model_name_or_path": base_model, "fan_in_fan_out": False, "inference_mode": True}


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, sd: dict):
    layers = lora_layers(model)
    expected = {f"base_model.model.{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    if set(sd) != expected:
        missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
        raise ValueError(f"adapter tensors do not match the model's LoRA layers: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    for n, m in layers.items():
        for ab, p in (("A", m.lora_A), ("B", m.lora_B)):
            t = sd[f"base_model.model.{n}.lora_{ab}.weight"]
            if t.shape != p.shape:
                raise ValueError(f"adapter tensor {n}.lora_{ab} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            p.copy_(t)
