"""ivft/memplan.py: the arithmetic of the memory plan, on Llama-2-7B's config.json (no weights) and
against peaks measured on the CPU for small random models (a fresh process each, peak resident
memory from /proc/self/status)."""
import json
import subprocess
import sys

import pytest
import torch

from ivft import memplan
from ivft.runtime import TrainError
from tests.conftest import ROOT

LLAMA2_7B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
             "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False,
             "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
GB80 = 80 * 10 ** 9


def test_llama2_7b_parameter_count():
    counts = memplan.count_params(LLAMA2_7B, memplan.RunShape())
    assert counts["all"] == 6_738_415_616          # Llama-2-7b-hf's published count
    lora = memplan.count_params(LLAMA2_7B, memplan.RunShape(lora_r=8))
    assert lora["trained"] == 32 * 2 * (8 * 4096 + 4096 * 8) and lora["all"] == counts["all"]


def test_llama2_7b_lora_guided_bf16_fits_80gb(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    run = memplan.RunShape(lora_r=8, model_dtype="bf16", amp="bf16", reference=True, n_tasks=4)
    text = memplan.dry_run(tmp_path, run, GB80)
    print(text)
    p = memplan.plan(LLAMA2_7B, run, GB80)
    assert p.rows["reference copy"] == 0 and p.rows["weights"] == 6_738_415_616 * 2
    assert p.total < 40 * 2 ** 30 and "fits" in text       # with room: under half the card
    # gradient checkpointing cuts the activations by more than 10x
    ck = memplan.plan(LLAMA2_7B, memplan.RunShape(lora_r=8, model_dtype="bf16", reference=True,
                                                  grad_checkpointing=True))
    assert ck.rows["activations"] * 10 < p.rows["activations"]


def test_llama2_7b_fp32_full_finetuning_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    with pytest.raises(TrainError) as e:
        memplan.dry_run(tmp_path, memplan.RunShape(model_dtype="fp32", amp="bf16"), GB80)
    msg = str(e.value)
    assert "\n" not in msg and "does NOT fit" in capsys.readouterr().out
    assert "optimizer" in msg and "train.py --fsdp" in msg and "--regime lora" in msg, msg
    # bf16 weights do not save it either (the fp32 masters and moments stay): FSDP
    with pytest.raises(TrainError, match=r"FSDP over \d GPUs \(torchrun --nproc_per_node \d train.py --fsdp\)"):
        memplan.check_fits(LLAMA2_7B, memplan.RunShape(model_dtype="bf16", lora_r=0), GB80 // 2)


def test_device_memory_on_cpu_reads_meminfo():
    total = memplan.device_memory("cpu")
    kib = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal:"))
    assert total == kib * 1024 > 2 ** 30


def test_missing_config_is_one_line(tmp_path):
    with pytest.raises(TrainError, match="no config.json"):
        memplan.read_config(tmp_path)


# ---- measured peaks ---------------------------------------------------------------------------------

SMALL = {"model_type": "llama", "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 4,
         "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 4096, "tie_word_embeddings": False,
         "max_position_embeddings": 512}

# MALLOC_MMAP_THRESHOLD_: glibc otherwise raises its mmap threshold to the largest freed block (up to
# 32 MiB) and serves later tensors from its heap, whose freed memory stays resident: the peak RSS
# would then count dead tensors (measured: +25-60%). With a fixed 64 KiB threshold every tensor is its
# own mapping, returned on free, so the resident peak is the peak of live memory.
# Builds the model and its data, warms the kernels up on a tiny batch, resets the peak, then runs
# two AdamW steps of two micro-batches each (accumulated, so that one micro-batch's activations and
# the other's gradients are held together, as the plan counts) and prints peak minus baseline.
MEASURE = r"""
import json, sys, torch
import torch.nn.functional as F
from ivft import lora
from ivft.engine import lm_head_fp32
from ivft.load import config_from_hf
from model import Transformer
cfg, r, ckpt, B, T, dtype, amp = json.loads(sys.argv[1])
torch.set_num_threads(1)
torch.manual_seed(0)
model = Transformer(config_from_hf(cfg, "test")).init_weights().to(getattr(torch, dtype))
if r:
    lora.add_lora(model, r, 2 * r, 0.1, ("q_proj", "v_proj"))
model.grad_checkpointing = ckpt
model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
idx = torch.randint(0, cfg["vocab_size"], (2, B, T))
def backward(x):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        h = model(x, return_hidden=True)                           # (B, T, C)
        # the LM head as train.py runs it: fp32, autocast off, on the scored positions (all here)
        loss = F.cross_entropy(lm_head_fp32(model, h.flatten(0, 1)), x.flatten())
    loss.backward()
backward(idx[0, :1, :8])                                           # warm-up: kernels, thread pools
for p in params:
    p.grad = None
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
try:
    open("/proc/self/clear_refs", "w").write("5")            # reset the peak (VmHWM) to now
except OSError:
    pass
base = status("VmRSS:")
for step in range(2):
    for m in range(2):
        backward(idx[m])
    opt.step()
    opt.zero_grad(set_to_none=True)
print(json.dumps(status("VmHWM:") - base))
"""


def native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


BF16 = pytest.mark.skipif(not native_bf16(), reason="bf16 matmuls are emulated (slow) on this CPU")


@pytest.mark.parametrize("r,ckpt,B,dtype,amp", [
    (0, False, 4, "fp32", False), (8, False, 8, "fp32", False), (0, True, 4, "fp32", False),
    pytest.param(8, False, 8, "bf16", True, marks=BF16), pytest.param(0, False, 4, "fp32", True, marks=BF16)],
    ids=["full", "lora", "full-checkpointing", "lora-bf16-base", "full-autocast"])
def test_plan_matches_measured_peak(r, ckpt, B, dtype, amp):
    T = 128
    args = [SMALL, r, ckpt, B, T, {"fp32": "float32", "bf16": "bfloat16"}[dtype], amp]
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(args)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "", "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    run = memplan.RunShape(lora_r=r, lora_targets=("q_proj", "v_proj"), lora_dropout=0.1, model_dtype=dtype,
                           amp="bf16" if amp else None, micro_batch=B, max_len=T, grad_checkpointing=ckpt)
    p = memplan.plan(SMALL, run)
    # what the process held before the baseline: the weights (and the fresh adapters)
    before = p.rows["weights"] + p.rows.get("adapters (fp32, finished ones stacked)", 0)
    predicted = p.total - before
    print(f"{run}: predicted {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB")
    assert abs(measured - predicted) <= 0.2 * measured, memplan.format_plan(p)


def test_train_dry_run_reads_config_json_only(tmp_path, capsys):
    # train.py --dry_run on a Llama-2-7B config.json with no weights: the LoRA guided regime fits in
    # 80 GB; plain fp32 full fine-tuning is refused in one line naming the flag; nothing is written
    import train
    model = tmp_path / "llama2-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}))
    out = tmp_path / "run"
    flags = ["--model", str(model), "--out_dir", str(out), "--dtype", "bf16", "--dry_run", "80"]
    assert train.main([*flags, "--regime", "lora", "--guided", "--model_dtype", "bf16"]) == {}
    text = capsys.readouterr().out
    assert "6.74 B parameters" in text and "80.00 GiB: fits" in text
    with pytest.raises(SystemExit) as e:
        train.main(flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--fsdp" in err[0] and "--regime lora" in err[0], err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["llama2-7b"]
    # --dry_run alone plans against this device's memory (here the CPU's: 126 GiB is more than it has)
    with pytest.raises(SystemExit) as e:
        train.main([*flags[:-2], "--dry_run"])
    assert e.value.code == 2 and "memory plan: 6.74 B parameters" in capsys.readouterr().out
