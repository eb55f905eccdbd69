"""AdamW for weights stored in bf16 (full fine-tuning with --model_dtype bf16): the optimizer keeps
fp32 master copies of the weights and fp32 moments, and writes the rounded result back into the bf16
weights after every step (mixed-precision training, Micikevicius et al. 2018, arXiv 1710.03740).

Why not torch.optim.AdamW on the bf16 weights directly: its moments would be bf16 too, and an
update smaller than half a bf16 step of the weight (8 significant bits: a weight of 0.02 moves in
steps of ~1.2e-4, while lr 1e-5 moves it by ~1e-5 per step) is rounded away, every step, so a
fine-tuning run at a small learning rate barely moves. The master copy accumulates such updates
until they show in the bf16 weight.

Memory per trained parameter: 2 (bf16 weight) + 2 (bf16 gradient) + 4 (fp32 master) + 8 (two fp32
moments) = 16 bytes, the same as fp32 training (4 + 4 + 8); what bf16 weights save is elsewhere:
the frozen reference copy (2 bytes a parameter instead of 4), no autocast copies of the weights, and
bf16 activations (ivft/memplan.py counts them). fp32 parameters are optimized in place (no copy).
"""
from __future__ import annotations

import torch


class MasterAdamW:
    """torch.optim.AdamW over fp32 masters of `params`; the same interface train.py uses
    (param_groups for the lr, step, zero_grad, state_dict, load_state_dict)."""

    def __init__(self, params, **adamw_kwargs):
        self.params = [p for p in params]
        # an fp32 parameter is its own master; a bf16 one gets an fp32 copy
        self.masters = [p if p.dtype == torch.float32 else p.detach().float() for p in self.params]
        self.inner = torch.optim.AdamW(self.masters, **adamw_kwargs)
        self.param_groups = self.inner.param_groups

    @torch.no_grad()
    def step(self):
        for p, m in zip(self.params, self.masters):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
        self.inner.step()
        for p, m in zip(self.params, self.masters):
            if m is not p:
                p.copy_(m)              # rounded to the weight's dtype (round to nearest even)
                m.grad = None

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self) -> dict:
        # the masters are part of the state: the bf16 weights alone lose their low bits, and a
        # resumed run would not continue the same numbers
        return {"adamw": self.inner.state_dict(),
                "masters": [m.detach().clone() if m is not p else None for p, m in zip(self.params, self.masters)]}

    @torch.no_grad()
    def load_state_dict(self, sd: dict):
        if set(sd) != {"adamw", "masters"} or len(sd["masters"]) != len(self.masters):
            raise ValueError("not a MasterAdamW state for these parameters")
        self.inner.load_state_dict(sd["adamw"])
        for m, saved in zip(self.masters, sd["masters"]):
            if saved is not None:
                m.copy_(saved)


def make_adamw(params, **adamw_kwargs):
    """torch.optim.AdamW when every trained parameter is fp32 (LoRA adapters, fp32 full fine-tuning),
    else MasterAdamW."""
    params = list(params)
    if all(p.dtype == torch.float32 for p in params):
        return torch.optim.AdamW(params, **adamw_kwargs)
    return MasterAdamW(params, **adamw_kwargs)
