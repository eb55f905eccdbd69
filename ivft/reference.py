"""Method, not plumbing: which frozen model the KL term keeps the trained one close to (--kl_ref).
With LoRA it is always the trained model itself seen with some adapters switched off
(lora.reference_view: finished tasks' adapters are kept apart from the base weights, so "original"
and "previous" are both views and no second copy of the weights is held). With full fine-tuning it
is a frozen copy. train.py calls these once per task; the loss itself is in train.py."""
from __future__ import annotations

import contextlib
from pathlib import Path


from ivft import lora
from ivft.checkpoint import frozen_copy
from ivft.errors import LoadError, TrainError
from ivft.load import load_model


class Reference:
    """The frozen reference of one stage. `with ref() as m:` runs the reference as m (no_grad is the
    caller's); `ref.model` is the module whose fp32 LM head scores the reference's hidden states.
    view=None: `model` is a frozen model of its own; else the trained model seen through
    lora.reference_view(model, view)."""

    def __init__(self, model, view: str | None = None):
        self.model, self.view = model, view

    def __call__(self):
        if self.view is None:
            return contextlib.nullcontext(self.model)
        return lora.reference_view(self.model, self.view)


def needs_original_copy(spec: lora.LoraSpec | None) -> bool:
    """Whether train.py must hold a frozen copy of the original model: only for full fine-tuning
    (LoRA's original is its base weights with every adapter off, under either merge policy)."""
    return spec is None


def pick_reference(j: int, model, original, kl_ref: str, spec: lora.LoraSpec | None, out_dir: Path) -> Reference:
    """The frozen reference of stage j (0-based): the original model, or the model after task j
    ("previous"; for j = 0 that is the original too). LoRA: a view of `model` (call it after
    lora.add_lora). Full fine-tuning: `original` (from frozen_copy), or the previous stage's model read
    back from its checkpoint, which is the same tensors whether or not this run was resumed."""
    which = "original" if kl_ref == "original" or j == 0 else "previous"
    if spec is not None:
        return Reference(model, which)
    if which == "original":
        return Reference(original)
    like = model.model.embed_tokens.weight
    try:
        ref, _ = load_model(out_dir / f"stage-{j}", dtype=like.dtype, device=like.device)
    except LoadError as e:
        raise TrainError(f"--kl_ref previous needs the checkpoint of task {j}: {e}") from None
    return Reference(frozen_copy(ref))
