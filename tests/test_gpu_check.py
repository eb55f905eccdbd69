"""bench/gpu_check.py in its smoke mode (tiny shapes on the CPU, every part), so that the prepared GPU
check cannot rot between runs on a GPU machine; and, where there is a GPU, its parity part for real."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("parity", "train_guided", "throughput_1b", "build_7b", "mediation_7b", "lora_7b")


def run_check(tmp_path, *flags) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "check.json"
    # this checkout's modules first, whatever copy of the project is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(out), "--threads", "1",
                        "--commit", "abc123", *flags], capture_output=True, text=True, timeout=900, env=env)
    return r, (json.loads(out.read_text()) if out.is_file() else {})


def test_smoke_mode_runs_every_part(tmp_path):
    r, rep = run_check(tmp_path, "--smoke", "--device", "cpu")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert rep["mode"] == "smoke" and rep["all_ok"] is True
    assert rep["code"]["commit"] == "abc123" and rep["torch"] == torch.__version__ and rep["device"] == "cpu"
    parts = rep["parts"]
    assert tuple(parts) == PARTS
    for name, part in parts.items():
        assert part["ok"] is True, f"{name}: {part.get('error')}\n{part.get('traceback')}"
        assert part["seconds"] >= 0
    # a. the same weights on the same device: fp32 identical; bf16 autocast close, not identical
    assert parts["parity"]["fp32_max_abs_diff"] == 0.0
    assert 0 < parts["parity"]["bf16_autocast_max_abs_diff"] < 0.1
    # b. train.py --guided end to end: IVs, training, evaluation of every stage, the exported models
    tg = parts["train_guided"]
    assert tg["exit_status"] == 0 and "--guided" in tg["command"]
    assert tg["exported_stages"] == ["stage-1", "stage-2"] and tg["exported_config_json"]
    assert tg["n_stage_reports"] == 3 and set(tg["metrics"]) >= {"AP", "BWT", "GP_drop"}
    # c. ours and transformers on the same weights: the same loss, both timed
    tp = parts["throughput_1b"]
    assert tp["hf_missing_keys"] == [] and tp["hf_unexpected_keys"] == []
    assert tp["loss_ours"] == pytest.approx(tp["loss_transformers"], abs=1e-4)
    assert tp["ours"]["tokens_per_s"] > 0 and tp["transformers"]["tokens_per_s"] > 0
    assert tp["ours"]["mfu"] is None            # no peak FLOPs known for a CPU
    # e. mediation: every head of the tiny model measured, extrapolated to 25 prompts
    md = parts["mediation_7b"]
    assert md["heads_measured"] == md["heads_total"] == 8
    assert md["s_all_heads_x25_prompts"] == pytest.approx(25 * md["s_per_prompt_all_heads"])
    # d. one guided LoRA step: CE and the KL to the adapters-off reference, adapters only trained
    lr = parts["lora_7b"]
    assert set(lr["loss_parts"]) == {"ce", "kl"} and lr["trained_params"] < lr["params"] / 10
    assert lr["step_s"] > 0 and "available" in lr["memory_plan"]


def test_a_failing_part_is_recorded_and_the_rest_run(tmp_path, monkeypatch):
    # a part's exception is a result: recorded with its error, the exit status says so
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(gpu_check, "part_parity", lambda *a: 1 / 0)
    rep = gpu_check.main(["--smoke", "--device", "cpu", "--out", str(tmp_path / "c.json"),
                          "--parts", "parity,throughput_1b"])
    assert rep["parts"]["parity"]["ok"] is False and "ZeroDivisionError" in rep["parts"]["parity"]["error"]
    assert rep["parts"]["throughput_1b"]["ok"] is True and rep["all_ok"] is False
    assert json.loads((tmp_path / "c.json").read_text())["all_ok"] is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_parity_on_the_gpu(tmp_path):
    r, rep = run_check(tmp_path, "--parts", "parity")
    assert rep["mode"] == "gpu", r.stderr
    p = rep["parts"]["parity"]
    assert p["ok"], p.get("error")
    assert p["fp32_max_abs_diff"] < 1e-3 * max(1.0, p["max_abs_logit"])
    assert p["bf16_autocast_top1_agreement"] > 0.9
