"""The LoRA KL reference without a second copy of the model (ivft/lora.py finish_task and
reference_view, ivft/reference.py pick_reference): after two "tasks" the model holds one copy of the
base weights, and its "original" / "previous" views give the logits of real frozen copies (the
original model; the model merged after task 1, as merging after every task made it)."""
import copy

import pytest
import torch

from ivft import checkpoint as ckpt
from ivft import lora
from ivft.reference import Reference, needs_original_copy, pick_reference
from tests.toys import byte_tokenizer, tiny_model

TARGETS = ("q_proj", "v_proj", "down_proj")
SPEC = lora.LoraSpec(r=4, alpha=8.0, dropout=0.0, targets=TARGETS, merge=True)


def train_a_task(model, seed):
    """What a task does to the adapters, without an optimizer: fresh ones, then B moved."""
    lora.add_lora(model, SPEC.r, SPEC.alpha, SPEC.dropout, TARGETS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)


def storage_bytes(model) -> int:
    """Bytes of the distinct storages behind the model's parameters and buffers."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def logits(model, idx):
    with torch.no_grad():
        return model(idx)


def two_tasks():
    """A model through task 1 (finished, merge policy) and into task 2, with the real copies the
    references stand for: the original, and the model merged after task 1 (what lora.merge made)."""
    model = tiny_model(layers=3)
    original = ckpt.frozen_copy(model)
    base_bytes = storage_bytes(model)
    train_a_task(model, seed=1)
    previous = copy.deepcopy(model)
    lora.merge(previous)
    assert lora.finish_task(model, merge=True) == 3 * 3 and not lora.has_lora(model)
    train_a_task(model, seed=2)
    return model, original, previous, base_bytes


def test_one_copy_of_the_base_weights():
    model, _, _, base_bytes = two_tasks()
    assert not needs_original_copy(SPEC) and needs_original_copy(None)
    refs = [pick_reference(1, model, None, kl_ref, SPEC, out_dir=None) for kl_ref in ("original", "previous")]
    assert all(r.model is model for r in refs)
    adapters = sum(p.numel() * 4 for n, p in model.named_parameters() if ".lora_" in n)
    frozen = sum(b.numel() * 4 for n, b in model.named_buffers() if "_done" in n)
    # base + the current adapters + the finished ones (rank 4 each); a copy would double base_bytes
    assert storage_bytes(model) == base_bytes + adapters + frozen
    assert frozen == adapters and adapters < base_bytes / 10


def test_views_equal_real_frozen_copies():
    model, original, previous, _ = two_tasks()
    idx = torch.randint(0, 80, (2, 10))
    for j, kl_ref, real in ((1, "original", original), (1, "previous", previous), (0, "previous", original)):
        with pick_reference(j, model, None, kl_ref, SPEC, None)() as ref:
            got = logits(ref, idx)
        # original: the same base weights, the same ops: bit-identical. previous: W + B1 A1 stacked
        # vs W rounded after adding B1 A1 (fp32): float rounding only
        tol = 0.0 if real is original else 1e-5
        diff = float((got - logits(real, idx)).abs().max())
        assert diff <= tol, f"stage {j} {kl_ref}: max |diff| {diff:.2e}"
    # the views are put back: the trained model is W + B1 A1 + B2 A2, as merging twice makes it
    merged_twice = copy.deepcopy(previous)
    lora.add_lora(merged_twice, SPEC.r, SPEC.alpha, 0.0, TARGETS)
    for (n, m), m2 in zip(lora.lora_layers(model).items(), lora.lora_layers(merged_twice).values()):
        with torch.no_grad():
            m2.lora_A.copy_(m.lora_A), m2.lora_B.copy_(m.lora_B)
    lora.merge(merged_twice)
    diff = float((logits(model, idx) - logits(merged_twice, idx)).abs().max())
    assert diff <= 1e-5 and float((logits(model, idx) - logits(previous, idx)).abs().max()) > 1e-3


def test_export_is_the_merged_model():
    # a stage folder holds merged weights: every adapter, finished and current, folded into W
    model, _, _, _ = two_tasks()
    merged, adapters = lora.split_state_dict(model.state_dict(), lora.scale_of(model))
    assert not any("lora" in k for k in merged) and len(adapters) == 2 * 9
    plain = copy.deepcopy(model)
    lora.merge(plain)
    for k, v in plain.state_dict().items():
        assert torch.equal(merged[k], v), k


def test_one_adapter_for_all_tasks_previous_is_a_snapshot():
    # --no-lora_merge: the adapters go on training; "previous" = them as task 1 left them
    spec = lora.LoraSpec(4, 8.0, 0.0, TARGETS, merge=False)
    model = tiny_model(layers=3)
    original = ckpt.frozen_copy(model)
    train_a_task(model, seed=1)
    previous = ckpt.frozen_copy(model)            # a real copy, adapters included
    lora.finish_task(model, merge=False)
    assert lora.has_lora(model) and not lora.frozen_state_dict(model.state_dict())   # not saved
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.add_(0.5)                    # task 2 trains the same adapters
    idx = torch.randint(0, 80, (2, 10))
    for kl_ref, real in (("original", original), ("previous", previous)):
        with pick_reference(1, model, None, kl_ref, spec, None)() as ref:
            diff = float((logits(ref, idx) - logits(real, idx)).abs().max())
        assert diff <= 1e-6, f"{kl_ref}: max |diff| {diff:.2e}"


def test_bf16_base_stacked_keeps_the_update_merging_rounds():
    # in a bf16 base, merging rounds W + scale B A to bf16 (relative error up to 2^-9 per element,
    # often larger than the update itself); the stacked adapter stays fp32 beside the untouched W
    model = tiny_model(layers=3).to(torch.bfloat16)
    train_a_task(model, seed=1)
    merged = copy.deepcopy(model)
    lora.merge(merged)
    base = {n: m.weight.clone() for n, m in lora.lora_layers(model).items()}
    lora.finish_task(model, merge=True)
    for n, m in lora.lora_layers(model).items():
        exact = base[n].float() + m.delta_weight()                          # (out, in)
        err = (merged.get_submodule(n).weight.float() - exact).abs()
        assert 0 < float(err.max()) <= 2 ** -8 * float(exact.abs().max()), n   # merging rounded
        assert torch.equal(m.weight, base[n]) and m.lora_A_done.dtype == torch.float32


@pytest.mark.parametrize("step", [0, 3])
def test_resume_puts_the_finished_adapters_back(tmp_path, step):
    # a checkpoint after task 1 (step 0) or 3 steps into task 2: a resumed model gives the same
    # logits and the same references as the one that wrote it
    model, _, _, _ = two_tasks()
    if step == 0:
        lora.drop_current(model)
    tok = byte_tokenizer()
    run = ckpt.RunFiles(tmp_path, {"x": 1}, None, False, SPEC)
    state = {"stage_done": 1, "step": step, "rng": [ckpt.rng_state()], "stages": [], "version": 1}
    if step:        # a mid-task state holds its optimizer's (ckpt.check_state asks for it)
        state["optimizer"] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]).state_dict()
    path = tmp_path / ("stage-1" if step == 0 else "last")
    ckpt.save_checkpoint(path, model, tok, run, state)
    assert (path / ckpt.ADAPTER_DIR / "adapter_model.safetensors").exists() == (step > 0)
    again = tiny_model(layers=3)
    ckpt.restore_model(again, path, ckpt.read_state(path), SPEC, tmp_path)
    assert lora.has_lora(again) == (step > 0)
    idx = torch.randint(0, 80, (2, 10))
    for view in (None, "original", "previous"):
        with (Reference(model, view) if view else Reference(model))() as a, \
                (Reference(again, view) if view else Reference(again))() as b:
            assert torch.equal(logits(a, idx), logits(b, idx)), view
