"""Gradient checkpointing (model.grad_checkpointing, model.checkpointed_block): the same loss and
gradients as without, with an IV added to the residual stream, heads' z recorded and used by the
loss, and LoRA dropout (whose random mask must be drawn again identically in the rerun)."""
import torch

from ivft import lora
from model import Intervention
from tests.toys import tiny_model


def loss_and_grads(checkpointing: bool):
    model = tiny_model(layers=3)
    lora.add_lora(model, r=4, alpha=8, dropout=0.3, targets=("q_proj", "v_proj", "down_proj"))
    with torch.no_grad():          # B = 0 would hide a wrong dropout mask in the rerun
        for m in lora.lora_layers(model).values():
            m.lora_B.normal_(std=0.3)
    model.train()
    model.grad_checkpointing = checkpointing
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 80, (2, 9), generator=g)                          # (B, T)
    targets = torch.randint(0, 80, (2, 9), generator=g)
    iv = torch.randn(32, generator=g)                                        # (C)
    edit = Intervention(pos=torch.tensor([5, 7]), add_resid={1: iv}, scale=torch.tensor([0.5, 1.0]),
                        record_z=(1, 2))
    torch.manual_seed(123)                                                   # the dropout masks
    _, ce = model(idx, targets, intervention=edit)
    recorded = dict(edit.z)
    loss = ce + edit.z[2].pow(2).mean()         # a term through the recorded z, as the heads' MSE
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, recorded, edit


def test_checkpointing_gives_the_same_loss_and_gradients():
    loss0, grads0, _, _ = loss_and_grads(False)
    loss1, grads1, _, _ = loss_and_grads(True)
    assert set(grads0) == set(grads1) and len(grads0) == 2 * 3 * 3
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=1e-6)
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")


def test_rerun_does_not_record_again():
    # the backward reruns blocks 1 and 2 with the intervention: what the forward recorded (and the
    # loss used) stays the intervention's, no new entries and no replaced tensors
    _, _, recorded, edit = loss_and_grads(True)
    assert set(edit.z) == {1, 2} and not edit.resid
    assert all(edit.z[k] is recorded[k] for k in recorded)


def test_no_checkpointing_without_grad():
    # evaluation and the frozen reference run under no_grad: the plain path, same numbers
    model = tiny_model()
    idx = torch.randint(0, 80, (2, 6))
    with torch.no_grad():
        plain = model(idx)
        model.grad_checkpointing = True
        assert torch.equal(model(idx), plain)


def guided_step(checkpointing: bool):
    """train.py's guided loss on a LoRA model (dropout on, reference = adapters off, IV in both,
    head MSE through recorded z), its gradients and the gradient shares (retain_graph: the blocks
    are rerun once per term)."""
    import train
    from ivft.data import Item, collate
    from ivft.dist import grad_shares
    from tests.toys import byte_tokenizer
    tok = byte_tokenizer()
    model = tiny_model(vocab=259, layers=3)
    lora.add_lora(model, r=4, alpha=8, dropout=0.2, targets=("q_proj", "v_proj"))
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.normal_(std=0.3, generator=torch.Generator().manual_seed(5))
    model.train()
    model.grad_checkpointing = checkpointing
    items = [Item(tok.chat_prompt(f"say {w}") + tok.encode(w.upper()) + [258], len(tok.chat_prompt(f"say {w}")),
                  i % 2) for i, w in enumerate(["cat", "doggo", "owl"])]
    batch = collate(items, tok.pad_id, "cpu")
    lm = train.LossModule(model, reference=train.Reference(model, "original"))   # every adapter off
    g = lm.guidance
    g.ivs, g.layers = torch.randn(2, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2])
    g.train_iv, g.kl_iv, g.kl_weight, g.alpha, g.kl_positions = True, True, 1.0, 0.7, "answer"
    g.head_mse_weight, g.heads = 0.1, {1: torch.tensor([0, 2])}
    norms = torch.tensor([float((batch["targets"] != -100).sum()), 3.0, float(batch["pad_mask"].sum())])
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(7)
    shares = grad_shares(lm, batch, norms, params)
    loss, parts = lm(batch, norms)
    loss.backward()
    return parts, shares, [p.grad.clone() for p in params]


def test_guided_loss_same_with_checkpointing():
    parts0, shares0, grads0 = guided_step(False)
    parts1, shares1, grads1 = guided_step(True)
    assert set(parts0) == {"ce", "kl", "mse"} and set(shares0) == {"kl", "mse"}
    for k in parts0:
        torch.testing.assert_close(parts1[k], parts0[k], rtol=1e-6, atol=1e-7)
    for k in shares0:
        assert abs(shares1[k] - shares0[k]) <= 1e-5 * abs(shares0[k]), k
    for a, b in zip(grads1, grads0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
