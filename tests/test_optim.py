"""ivft/optim.py MasterAdamW: bf16 weights with fp32 masters and moments track the fp32 run; plain
AdamW on bf16 weights loses small updates; the state (masters included) resumes exactly."""
import copy

import torch

from ivft.optim import MasterAdamW, make_adamw
from tests.toys import tiny_model


def run(model, make_opt, steps=20, lr=1e-3):
    model.train()
    params = list(model.parameters())
    opt = make_opt(params, lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, 80, (4, 12), generator=g)
        _, loss = model(idx, idx.roll(-1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def max_rel(model, ref):
    w = {n: p.detach() for n, p in model.named_parameters()}
    return max(float((w[n].float() - p.detach()).norm() / p.detach().norm()) for n, p in ref.named_parameters())


def test_bf16_weights_track_the_fp32_run():
    fp32 = tiny_model(layers=2)
    start = copy.deepcopy(fp32)
    run(fp32, lambda ps, lr: torch.optim.AdamW(ps, lr=lr))
    bf16 = copy.deepcopy(start).to(torch.bfloat16)
    assert isinstance(run(bf16, lambda ps, lr: make_adamw(ps, lr=lr)), MasterAdamW)
    moved, err = max_rel(start, fp32), max_rel(bf16, fp32)
    # the weights moved ~5% of their norm; bf16 weights follow to about bf16 rounding (2^-9 ~ 0.2%)
    # plus bf16 forward/backward noise
    print(f"moved {moved:.3e}, bf16 vs fp32 {err:.3e}")
    assert moved > 0.02 and err < 0.1 * moved


def test_small_updates_are_kept_by_the_masters():
    # lr 1e-6: most single updates are below half a bf16 step of their weight; plain AdamW on bf16
    # weights rounds them away, the masters add them up as the fp32 run does
    start = tiny_model(layers=1).to(torch.bfloat16)
    fp32, plain, master = copy.deepcopy(start).float(), copy.deepcopy(start), copy.deepcopy(start)
    run(fp32, lambda ps, lr: torch.optim.AdamW(ps, lr=lr), steps=30, lr=1e-6)
    run(plain, lambda ps, lr: torch.optim.AdamW(ps, lr=lr), steps=30, lr=1e-6)
    opt = run(master, lambda ps, lr: MasterAdamW(ps, lr=lr), steps=30, lr=1e-6)
    name = "model.layers.0.mlp.up_proj.weight"
    w0 = dict(start.named_parameters())[name].detach().float()
    moved = lambda w: float((w.detach().float() - w0).norm())
    want = moved(dict(fp32.named_parameters())[name])
    got_master = moved(opt.masters[[n for n, _ in master.named_parameters()].index(name)])
    got_plain = moved(dict(plain.named_parameters())[name])
    print(f"moved: fp32 {want:.3e}, masters {got_master:.3e}, plain bf16 AdamW {got_plain:.3e}")
    assert abs(got_master - want) < 0.05 * want and got_plain < 0.5 * want


def test_state_dict_resumes_exactly():
    a = tiny_model(layers=1).to(torch.bfloat16)
    opt = run(a, lambda ps, lr: MasterAdamW(ps, lr=lr), steps=3)
    b = copy.deepcopy(a)
    sd = copy.deepcopy(opt.state_dict())
    opt_b = MasterAdamW(list(b.parameters()), lr=1e-3)
    opt_b.load_state_dict(sd)
    for o, m in ((opt, a), (opt_b, b)):
        idx = torch.arange(24).view(2, 12) % 80
        _, loss = m(idx, idx.roll(-1, 1))
        loss.backward()
        o.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
