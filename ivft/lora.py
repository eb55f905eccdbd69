"""
LoRA adapters for model.Transformer (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models", arXiv 2106.09685), written so that the wrapped model keeps working everywhere:

- A LoRA layer *is* an nn.Linear (subclass) that keeps its frozen `weight`/`bias` under the same
  names, so HF-layout checkpoints, `Attention.head_contributions` (which reads `o_proj.weight`) and
  every `model.layers.i.self_attn.q_proj.weight` lookup still work.
- The adapter adds  scale * B(A(dropout(x)))  with A [r, in] ~ Kaiming-uniform, B [out, r] = 0, so a
  fresh adapter changes nothing (scale = alpha / r).
- Finished tasks' adapters are kept, frozen, as extra low-rank terms (`finish_task`) instead of being
  folded into W: the base weights stay the original model's, held once, and the KL's frozen
  reference is the same module with some adapters switched off (`reference_view`): "original" = all
  off, "previous" = the current task's off. W + sum of the frozen B A is what merging after every
  task gives, without its rounding to W's dtype. Exports merge everything (`split_state_dict`).
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
# state-dict names of the finished tasks' adapters, stacked: A [k r, in], B [out, k r]
FROZEN_KEYS = (".lora_A_done", ".lora_B_done")


class LoRALinear(nn.Linear):
    """y = x W^T + b + scale * x A_done^T B_done^T + scale * dropout(x) A^T B^T, with W, b and the
    finished tasks' adapters (A_done, B_done) frozen; A, B the current task's (None between tasks)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                 bias: bool = True, device=None, dtype=None):
        # built on the meta device for W (the real W is assigned by `wrap`), so no throwaway copy of
        # a large matrix is ever allocated
        super().__init__(in_features, out_features, bias=bias, device="meta", dtype=dtype)
        self.r, self.alpha = r, alpha
        self.scale = alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.new_adapter(device)
        # the finished adapters (finish_task): None buffers until the first task ends
        self.register_buffer("lora_A_done", None)
        self.register_buffer("lora_B_done", None)
        self.enabled = True            # the current adapter takes part in the forward
        self.done_enabled = False      # the finished ones do (set by finish_task, toggled by views)

    def new_adapter(self, device):
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, device=device, dtype=torch.float32))
        # same init as the LoRA paper / PEFT: A like a default nn.Linear, B zero (adapter starts at 0)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

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
        # the adapters are kept in fp32 (what gets trained, and the finished ones unrounded) even when
        # the frozen base is bf16, so x is cast to them; under autocast the small matmuls still run in
        # the autocast dtype
        if self.done_enabled and self.lora_A_done is not None:
            done = F.linear(F.linear(x.to(self.lora_A_done.dtype), self.lora_A_done), self.lora_B_done)
            y = y + (done * self.scale).to(y.dtype)      # no dropout: merged weights would see none
        if self.enabled and self.lora_A is not None:
            a = self.lora_dropout(x.to(self.lora_A.dtype))
            y = y + (F.linear(F.linear(a, self.lora_A), self.lora_B) * self.scale).to(y.dtype)
        return y

    def delta_weight(self) -> torch.Tensor:
        """(out, in): the update the adapters stand for, the finished ones included when they are
        part of the model; summed in fp32 so that W is rounded once when they are merged."""
        delta = torch.zeros(self.out_features, self.in_features, device=self.weight.device)
        if self.done_enabled and self.lora_A_done is not None:
            delta += self.lora_B_done @ self.lora_A_done            # (out, k r) @ (k r, in)
        if self.lora_A is not None:
            delta += self.lora_B @ self.lora_A                      # (out, r) @ (r, in)
        return delta * self.scale

    @torch.no_grad()
    def finish(self, stack: bool):
        """The current adapter is done. stack=True (merge policy): it joins the frozen stack, which
        stays part of the model, and the layer waits for the next task's fresh adapter (add_lora).
        stack=False (one adapter for all tasks): a frozen snapshot replaces the previous one, used only
        by the "previous" reference view; the adapter itself goes on training."""
        A, B = self.lora_A.detach(), self.lora_B.detach()
        if hasattr(A, "full_tensor"):     # FSDP-sharded (one adapter for all tasks): every rank's whole copy
            A, B = A.full_tensor(), B.full_tensor()
        if stack:
            if self.lora_A_done is not None:
                A, B = torch.cat([self.lora_A_done, A], 0), torch.cat([self.lora_B_done, B], 1)
            self.lora_A = self.lora_B = None
        # persistent only when part of the model: then state dicts carry them (exports merge them, a
        # resume reads them back); a snapshot is the previous stage's saved adapter and is not saved
        self.register_buffer("lora_A_done", A.clone(), persistent=stack)
        self.register_buffer("lora_B_done", B.clone(), persistent=stack)
        self.done_enabled = stack

    def extra_repr(self):
        done = 0 if self.lora_A_done is None else self.lora_A_done.shape[0]
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, frozen rank={done}"


@dataclass(frozen=True)
class LoraSpec:
    """The adapters of a run: rank, scale numerator (scale = alpha / r), input dropout, the adapted
    linear layers, and whether each task's adapter is merged (stacked, see finish_task) after it."""
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
    `targets` by a LoRALinear, or give a LoRALinear between tasks its fresh adapter (the same random
    draws, in the same order, as wrapping a plain layer). Returns the adapted modules' names."""
    targets = check_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name not in targets:
                continue
            if type(child) is nn.Linear:
                setattr(module, child_name, LoRALinear.wrap(child, r, alpha, dropout))
            elif isinstance(child, LoRALinear) and child.lora_A is None:
                child.new_adapter(child.weight.device)
            else:
                continue
            wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"no linear layer named {', '.join(targets)} in the model")
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    """Whether the model has a current (trainable) adapter; between tasks of the merge policy it has
    only finished ones, and its checkpoint is then the merged weights alone."""
    return any(m.lora_A is not None for m in lora_layers(model).values())


@contextmanager
def reference_view(model: nn.Module, which: str):
    """Inside the block the model computes as a frozen reference, with no second copy of it:
    which="original": every adapter off (the base weights); "previous": the current task's adapter
    off, the finished ones on (the model as the previous task left it, see LoRALinear.finish)."""
    if which not in ("original", "previous"):
        raise ValueError(f"reference view {which!r}: expected 'original' or 'previous'")
    layers = list(lora_layers(model).values())
    before = [(m.enabled, m.done_enabled) for m in layers]
    for m in layers:
        m.enabled, m.done_enabled = False, which == "previous"
    try:
        yield model
    finally:
        for m, (e, d) in zip(layers, before):
            m.enabled, m.done_enabled = e, d


def adapters_off(model: nn.Module):
    """Inside the block the model computes with its base weights only (the original model)."""
    return reference_view(model, "original")


def finish_task(model: nn.Module, merge: bool) -> int:
    """The end of a task, instead of merging: merge=True stacks every current adapter onto the frozen
    ones (the next task's fresh adapters come from add_lora); merge=False keeps training the same
    adapters and snapshots them for the "previous" reference. Returns the number of layers."""
    layers = [m for m in lora_layers(model).values() if m.lora_A is not None]
    for m in layers:
        m.finish(stack=merge)
    return len(layers)


def drop_current(model: nn.Module):
    """Remove the current adapters (a resume at a task boundary of the merge policy)."""
    for m in lora_layers(model).values():
        m.lora_A = m.lora_B = None


@torch.no_grad()
def merge(model: nn.Module) -> int:
    """Fold every adapter of the model (the current one and the finished ones that are part of it)
    into its base weight (W += scale * sum of B @ A, rounded once to W's dtype) and put a plain
    nn.Linear back in its place. Returns the number of layers merged."""
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
    """A LoRA model's state dict -> (HF state dict with every adapter merged in, the current
    adapters in PEFT naming: base_model.model.<module>.lora_A.weight [r, in], lora_B.weight
    [out, r]). The finished adapters in `sd` (FROZEN_KEYS) are merged too. Works on plain dicts, so
    it also serves a state dict gathered from a sharded (FSDP) model. The merge is the same
    arithmetic as `merge` (deltas summed in fp32, W rounded once), so both give identical tensors."""
    merged, adapters = {}, {}
    for k, v in sd.items():
        if k.endswith(FROZEN_KEYS):
            continue
        if k.endswith((".lora_A", ".lora_B")):
            module, ab = k.rsplit(".", 1)
            adapters[f"base_model.model.{module}.{ab}.weight"] = v.detach().contiguous()
            continue
        module = k[:-len(".weight")] if k.endswith(".weight") else None
        pairs = [(f"{module}.lora_B_done", f"{module}.lora_A_done"), (f"{module}.lora_B", f"{module}.lora_A")]
        pairs = [(b, a) for b, a in pairs if module is not None and a in sd]
        if pairs:
            delta = torch.zeros(v.shape, device=v.device)
            for b, a in pairs:
                delta += sd[b].float() @ sd[a].float()                 # (out, r) @ (r, in)
            v = v + (delta * scale).to(v.dtype)
        merged[k] = v
    return merged, adapters


def frozen_state_dict(sd: dict) -> dict:
    """The finished adapters of a model's state dict (they go into the training state, for --resume)."""
    return {k: v for k, v in sd.items() if k.endswith(FROZEN_KEYS)}


@torch.no_grad()
def load_frozen(model: nn.Module, frozen: dict, stack: bool):
    """Put finished adapters back (a resume): `frozen` as frozen_state_dict gives it, or, for a
    snapshot (stack=False), {"<module>.lora_A_done": A, ...} read from the previous stage's adapter."""
    for n, m in lora_layers(model).items():
        A, B = frozen.get(f"{n}.lora_A_done"), frozen.get(f"{n}.lora_B_done")
        if A is None or B is None or A.shape[1] != m.in_features or B.shape[0] != m.out_features:
            raise ValueError(f"finished adapters of {n} missing or of the wrong shape")
        dev = m.weight.device
        m.register_buffer("lora_A_done", A.to(dev, torch.float32).clone(), persistent=stack)
        m.register_buffer("lora_B_done", B.to(dev, torch.float32).clone(), persistent=stack)
        m.done_enabled = stack


def scale_of(model: nn.Module) -> float:
    """alpha / r, shared by every adapter that add_lora made."""
    scales = {m.scale for m in lora_layers(model).values()}
    if len(scales) != 1:
        raise ValueError(f"adapters with different scales {sorted(scales)}")
    return scales.pop()


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
    layers = {n: m for n, m in lora_layers(model).items() if m.lora_A is not None}
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
