"""Every path runs with the model on a device other than the CPU: IV extraction (exact and attribution
mediation, the dev sweep and the check), a guided training step (forward and backward of
train.LossModule, with a frozen reference and with LoRA adapters off) and a stage evaluation (every
metric, k-shot too). Without a GPU the device is a stand-in (tests/ondevice.py): the model reports
the meta device and computes on the CPU underneath, and any op that mixes a model tensor with a
CPU tensor is recorded with the line that made it. Each test also checks that the numbers equal the
plain CPU run's, so the stand-in changes nothing but where tensors say they live."""
import copy

import pytest
import torch

import evaluate as E
import extract_iv as X
import ondevice
import train
from ivft import checkpoint as ckpt
from ivft import lora
from ivft.data import Item, collate
from ivft.ivcheck import check_iv
from ivft.tasks import Example, Task
from toys import SMALL, TOK, byte_tokenizer, char_model, make_task, standin_task, tiny_model


def on_device(model):
    return ondevice.move(copy.deepcopy(model))


def assert_no_strays(strays):
    assert not strays, f"{len(strays)} ops mixed a CPU tensor with the model's device:\n" + \
        "\n".join(dict.fromkeys(strays))


def assert_close(a, b, what, atol=1e-5):
    a, b = ondevice.plain(a), ondevice.plain(b)
    diff = (a.float() - b.float()).abs().max().item()
    assert diff <= atol, f"{what}: max |device - cpu| = {diff:.2e}"


def test_the_stand_in_finds_a_stray_and_only_a_stray():
    # the test must be able to fail: a CPU tensor added to a device tensor is recorded, one made
    # with device= is not, and results computed underneath are the CPU's
    lin = ondevice.move(torch.nn.Linear(3, 2))
    with ondevice.on_device() as strays:
        x = torch.ones(1, 3, device=lin.weight.device)
        y = lin(x)
        assert not strays and y.device == ondevice.DEVICE
        lin(torch.ones(1, 3))
        assert len(strays) == 1 and "test_device.py" in strays[0]
        assert isinstance(y.sum().item(), float) and len(y.tolist()[0]) == 2


@pytest.mark.parametrize("method", ["exact", "attribution"])
def test_extraction_on_a_device(method):
    model, task = char_model(), standin_task()
    settings = dict(SMALL, method=method, layer=2, top_k=3, progress=False)
    want = X.extract_iv(model, TOK, task, **settings)
    dev = on_device(model)
    with ondevice.on_device() as strays:
        got = X.extract_iv(dev, TOK, task, **settings)
        res = check_iv(dev, TOK, task, got["iv"], got["layer"], n=3, settings=SMALL, progress=False)
    assert_no_strays(strays)
    assert got["heads"] == want["heads"]
    assert_close(got["iv"], want["iv"], "IV")
    assert_close(got["aie"], want["aie"], "AIE")
    assert res["iv"]["top1"] == check_iv(model, TOK, task, want["iv"], want["layer"], n=3, settings=SMALL,
                                         progress=False)["iv"]["top1"]


def test_layer_auto_sweep_on_a_device():
    # the sweep (_steered_logits) and choose_kind's resid IV run only with --layer auto, which needs
    # a dev split of >= 4 examples (a quarter of the training examples at most)
    words = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st", "uv", "wx", "yz", "ba", "dc", "fe"]
    task = Task(name="rev", kind="generate", metric="exact_match",
                train=[Example("Reverse it.", w, w[::-1]) for w in words], test=[Example("Reverse it.", "hi", "ih")])
    model = char_model()
    settings = dict(SMALL, layer="auto", n_dev=4, progress=False)
    want = X.extract_iv(model, TOK, task, **settings)
    with ondevice.on_device() as strays:
        got = X.extract_iv(on_device(model), TOK, task, **settings)
    assert_no_strays(strays)
    assert (got["layer"], got["heads"]) == (want["layer"], want["heads"])
    assert_close(got["iv"], want["iv"], "IV")


def test_get_iv_and_training_ivs_on_a_device(tmp_path):
    # what train.py calls: the cached IV with its dev advice and the hidden-state norms (state_norms),
    # then the IVs rescaled to a fraction of those norms
    model, task = char_model(), standin_task()
    settings = dict(SMALL, layer=2, top_k=3)
    want = X.training_ivs(model, TOK, [task], iv_dir=tmp_path / "cpu", model_id="tiny", norm_ratio=0.5,
                          progress=False, **settings)
    with ondevice.on_device() as strays:
        got = X.training_ivs(on_device(model), TOK, [task], iv_dir=tmp_path / "dev", model_id="tiny",
                             norm_ratio=0.5, progress=False, **settings)
    assert_no_strays(strays)
    (iv, layer, meta), (iv0, layer0, meta0) = got["opp"], want["opp"]
    assert layer == layer0 and meta["advice"] == meta0["advice"]
    assert meta["state_norms"] == pytest.approx(meta0["state_norms"], rel=1e-5)
    assert_close(iv, iv0, "IV scaled to the state norm")


def guided_batch(tok, device):
    items = [Item(tok.chat_prompt(f"say {w}") + tok.encode(w.upper()) + [258],
                  len(tok.chat_prompt(f"say {w}")), i % 2) for i, w in enumerate(["cat", "doggo", "owl"])]
    return collate(items, tok.pad_id, device)


def guided_step(model, device, use_lora, kl_positions):
    """One guided micro-batch: α·IV in the trained model, KL to the reference + IV, and the sibling
    terms (a KL over every position, the heads' MSE) -> (loss, parts, gradients)."""
    tok = byte_tokenizer()
    g = train.Guidance(ivs=torch.randn(2, 32, generator=torch.Generator().manual_seed(0)).to(device),
                       layers=torch.tensor([1, 2], device=device), alpha=0.5, train_iv=True, kl_iv=True,
                       kl_weight=1.0, kl_positions=kl_positions, kl_all_weight=0.1, head_mse_weight=1.0,
                       heads={0: torch.tensor([1, 3], device=device)})
    ref = train.Reference(model, "original") if use_lora else train.Reference(ckpt.frozen_copy(model))
    lm = train.LossModule(model, guidance=g, reference=ref)
    batch = guided_batch(tok, device)
    n_ans, n_rows = float((batch["targets"] != -100).sum()), float(len(batch["idx"]))
    norms = torch.tensor([n_ans, n_rows, float(batch["n_tokens"])], device=device)
    loss, parts = lm(batch, norms)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss, parts, grads


@pytest.mark.parametrize("kl_positions", ["last", "answer", "all"])
@pytest.mark.parametrize("use_lora", [False, True])
def test_training_step_on_a_device(use_lora, kl_positions):
    model = tiny_model(vocab=259, layers=3).train()
    if use_lora:
        lora.add_lora(model, r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj"))
        with torch.no_grad():       # adapters that do something, so that "adapters off" differs
            for m in lora.lora_layers(model).values():
                m.lora_B.normal_(std=0.1)
    dev = on_device(model)
    want = guided_step(model, "cpu", use_lora, kl_positions)
    with ondevice.on_device() as strays:
        got = guided_step(dev, dev.lm_head.weight.device, use_lora, kl_positions)
    assert_no_strays(strays)
    assert_close(got[0], want[0], "loss")
    assert got[1].keys() == want[1].keys()
    assert set(got[2]) == set(want[2]) and got[2]
    for n in want[2]:
        assert_close(got[2][n], want[2][n], f"grad of {n}")


def test_stage_evaluation_on_a_device():
    model = char_model()
    copy_ex = [Example("Copy.", w, w, choices=[w, w[::-1]]) for w in ("ab", "cd", "ef", "gh")]
    tasks = [make_task(copy_ex, copy_ex, name="copy", metric="exact_match"),
             make_task(copy_ex, copy_ex, name="pick", metric="choice")]
    general = [make_task(copy_ex, copy_ex, name="gen", metric="reply_contains")]
    ev = E.StageEval(n=3, k_shot=1, batch_size=2, metrics="all")
    want = E.evaluate_stage(model, TOK, tasks, general, ev, "cpu", None)
    with ondevice.on_device() as strays:
        got = E.evaluate_stage(on_device(model), TOK, tasks, general, ev, "cpu", None)
    assert_no_strays(strays)
    for name, scores in want["tasks"].items():
        for metric, v in scores.items():
            if isinstance(v, float):
                assert got["tasks"][name][metric] == pytest.approx(v, abs=1e-5), (name, metric)


# ---- the scripts' --device / --dtype / --model_dtype -------------------------------------------------

def test_resolve_device():
    from ivft.engine import resolve_device
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device gpu0: not a torch device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda:1: this machine .* has no CUDA GPU"):
            resolve_device("cuda:1")


@pytest.mark.parametrize("script", ["extract_iv.py", "evaluate.py", "sample.py"])
def test_scripts_refuse_a_device_in_one_line(script):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    extra = ["--task", "antonym"] if script == "extract_iv.py" else []
    r = subprocess.run([sys.executable, str(root / script), *extra, "--device", "gpu0"], capture_output=True,
                       text=True, cwd=root, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("--device gpu0: not a torch device (auto, cpu, cuda, "
                                                      "cuda:1, ...)"), r.stderr


def test_scripts_take_the_same_precision_flags():
    # one definition (engine.add_device_flags), so the scripts cannot drift apart
    import argparse
    import evaluate
    from ivft.engine import add_device_flags, resolve_precision
    ap = argparse.ArgumentParser()
    add_device_flags(ap)
    args = ap.parse_args(["--device", "cpu", "--dtype", "fp32", "--model_dtype", "bf16"])
    assert resolve_precision(args) == (torch.device("cpu"), None, torch.bfloat16)
    args = ap.parse_args(["--device", "cpu", "--dtype", "bf16"])
    assert resolve_precision(args)[1:] == (torch.bfloat16, torch.float32)
    ev = evaluate.build_parser().parse_args([])
    ex = X.parse_args(["--task", "antonym"])
    assert (ev.device, ev.dtype, ev.model_dtype) == (ex.device, ex.dtype, ex.model_dtype) == ("auto", "fp32", "fp32")


def test_one_output_layer():
    # every scorer, trainer and extractor reads logits through engine.lm_head_fp32 (fp32 under bf16
    # autocast, on any device); only model.py's own full forward calls the layer itself
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    calls = [f"{p.relative_to(root)}:{i}" for p in sorted(root.rglob("*.py")) if "tests" not in p.parts
             and p.relative_to(root).as_posix() not in ("model.py", "ivft/engine.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\.lm_head\(", line)]
    assert not calls, f"call engine.lm_head_fp32 instead: {calls}"
