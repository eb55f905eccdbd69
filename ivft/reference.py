"""Method, not plumbing: which frozen model the KL term keeps the trained one close to (--kl_ref),
and when that model is the trained one with its LoRA adapters switched off, so that no second copy
is held. train.py calls these once per task; the loss itself is in train.py."""
from __future__ import annotations

from pathlib import Path

import torch

from ivft import lora
from ivft.checkpoint import frozen_copy
from ivft.load import LoadError, load_model
from ivft.runtime import TrainError



def lora_base(j: int, spec: lora.LoraSpec | None) -> set:
    """What the LoRA base weights (adapters off) are during stage j: {"original"} and/or {"previous"}."""
    if spec is None:
        return set()
    out = set()
    if not spec.merge or j == 0:
        out.add("original")       # never merged, or nothing merged yet
    if spec.merge or j == 0:
        out.add("previous")       # merged after every task: the base is the previous stage's model
    return out


def needs_original_copy(kl_ref: str, spec: lora.LoraSpec | None, n_tasks: int) -> bool:
    """Whether some stage's reference is the original model that the LoRA base cannot stand in for."""
    if kl_ref == "original":
        return any("original" not in lora_base(j, spec) for j in range(n_tasks))
    return "previous" not in lora_base(0, spec)   # stage 0's "previous" is the original


def pick_reference(j: int, original, kl_ref: str, spec: lora.LoraSpec | None, out_dir: Path, like: torch.Tensor):
    """The frozen reference of stage j. None = the trained model itself with its LoRA adapters off
    (no second copy). The previous stage's model is read back from its checkpoint, which is the same
    tensors whether or not this run was resumed."""
    if kl_ref in lora_base(j, spec):
        return None
    if kl_ref == "original" or j == 0:
        return original
    try:
        ref, _ = load_model(out_dir / f"stage-{j}", dtype=like.dtype, device=like.device)
    except LoadError as e:
        raise TrainError(f"--kl_ref previous needs the checkpoint of task {j}: {e}") from None
    return frozen_copy(ref)
