"""Tests of train.py and lora.py on a tiny random model (byte-level tokenizer, 3 layers, d_model 32)
and tiny tasks in the suite's file layout, so every run takes a second or two.

What is checked: the α and lr schedules; collation (loss on answer tokens only); the guided KL is
zero exactly when the trained model equals the reference with the IV at α = 1 (and not otherwise),
also with a LoRA reference (adapters off); guidance with λ = 0 and α0 = 0 is bit-identical to plain
training; a run interrupted (Ctrl-C in training or in evaluation, or a crash after a --save_every
checkpoint) and resumed ends with bit-identical weights and scores, for full fine-tuning and LoRA;
DDP and FSDP (LoRA) on 2 CPU processes equal 1 process with the same global batch; LoRA merge
equals the unmerged forward; bad input exits with status 2 and one line, touching nothing; a NaN
loss stops with status 3 and keeps the last good checkpoint.
"""
import hashlib
import json
import os
import random
import shutil
import signal
import time
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ivft import lora
import evaluate
import train
from ivft import checkpoint as ckpt
from ivft import files
from ivft.data import Item, collate
from ivft.load import load_model, read_safetensors, save_hf
from ivft.errors import TrainError
from model import ModelConfig, Transformer
from toys import byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]


# ---- fixtures: a tiny model directory, tiny tasks, IV files -------------------------------------

def tiny_model(hidden=32, seed=0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=259, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, rope_theta=10000.0)
    return Transformer(cfg).init_weights()


WORDS = ["cat", "dog", "sun", "red", "box", "hat", "pen", "cup", "map", "owl", "fig", "jam"]


def write_task(folder: Path, name: str, fn, seed: int, n_train=24, n_test=6) -> str:
    """A task in the suite's own layout, <name>.train.jsonl + <name>.test.jsonl (tasks.load_task)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_train + n_test):
        w = rng.choice(WORDS) + rng.choice(WORDS)[: rng.randint(0, 3)]   # varied lengths -> padding
        rows.append(json.dumps({"instruction": f"Task {name}: do it.", "input": w, "output": fn(w)}))
    (folder / f"{name}.train.jsonl").write_text("\n".join(rows[:n_train]) + "\n")
    (folder / f"{name}.test.jsonl").write_text("\n".join(rows[n_train:]) + "\n")
    return str(folder / f"{name}.train.jsonl")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    save_hf(tiny_model(), byte_tokenizer(), root / "tiny")
    tasks = [write_task(root, "a", str.upper, 1), write_task(root, "b", lambda w: w[::-1], 2)]
    general = write_task(root, "g", lambda w: w[0], 3)
    # IVs of the tiny model: real extraction, then scaled up to norm 1 (a random tiny model's IV is
    # tiny), so that adding it visibly changes the logits
    import extract_iv
    from ivft.ivfile import save_iv
    from ivft.tasks import load_task
    model, tok = load_model(root / "tiny")
    ivs = {}
    for name, path in zip("ab", tasks):
        r = extract_iv.extract_iv(model, tok, load_task(path), n_clean=4, n_corrupt=4,
                                  top_k=2, layer=1, progress=False)
        r["iv"] = r["iv"] / r["iv"].norm()
        ivs[name] = str(save_iv(r, root / "ivs" / f"{name}.safetensors"))
    # an IV of another model (d_model 48) for the bad-input test
    other = tiny_model(hidden=48)
    r = extract_iv.extract_iv(other, tok, load_task(tasks[0]), n_clean=4, n_corrupt=4,
                              top_k=2, layer=1, progress=False)
    foreign = str(save_iv(r, root / "ivs" / "foreign.safetensors"))
    return {"root": root, "model": str(root / "tiny"), "tasks": ",".join(tasks), "general": general,
            "ivs": ivs, "foreign_iv": foreign}


def base_args(env, out_dir, *extra):
    return ["--model", env["model"], "--tasks", env["tasks"], "--general", "none", "--out_dir", str(out_dir),
            "--max_steps", "4", "--batch_size", "4", "--micro_batch", "2", "--lr", "3e-3", "--warmup", "1",
            "--dtype", "fp32", "--eval_n", "0", "--log_every", "2", *extra]


def iv_args(env):
    return ["--iv_file", f"a={env['ivs']['a']}", "--iv_file", f"b={env['ivs']['b']}"]


def final_weights(out_dir) -> dict:
    return read_safetensors(Path(out_dir) / "stage-2" / "model.safetensors")


def assert_same_weights(a: dict, b: dict, exact=True, atol=0.0):
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    if exact:
        assert all(torch.equal(a[k], b[k]) for k in a), f"weights differ, max |diff| = {worst:.3e}"
    else:
        assert worst <= atol, f"max |diff| = {worst:.3e} > {atol}"
    return worst


def run_main(argv, callback=None):
    return train.main(argv, step_callback=callback)


# ---- schedules ------------------------------------------------------------------------------------

def test_alpha_schedule():
    total = 5
    a = [train.alpha_at(s, total, 1.0) for s in range(total)]
    assert a == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])          # linear, α0 first, exactly 0 last
    assert train.alpha_at(total - 1, total, 2.0) == 0.0
    assert [train.alpha_at(s, total, 0.7, "constant") for s in range(total)] == [0.7] * total
    assert train.alpha_at(0, 1, 0.5) == 0.5                          # a one-step task keeps α0


# ---- the guided loss ------------------------------------------------------------------------------

def guided_batch(tok):
    items = [Item(tok.chat_prompt(f"say {w}") + tok.encode(w.upper()) + [258],
                  len(tok.chat_prompt(f"say {w}")), i % 2) for i, w in enumerate(["cat", "doggo", "owl"])]
    return collate(items, tok.pad_id, "cpu")


def norms_of(batch):
    """(answer tokens, rows, real tokens) of a one-micro-batch step, as train.py passes them."""
    real = batch["pad_mask"].sum() if batch["pad_mask"] is not None else batch["idx"].numel()
    return (float((batch["targets"] != -100).sum()), float(len(batch["idx"])), float(real))


@pytest.mark.parametrize("positions", ["last", "answer", "all"])
def test_kl_zero_iff_model_equals_reference_with_iv(positions):
    tok = byte_tokenizer()
    model = tiny_model()
    batch = guided_batch(tok)
    lm = train.LossModule(model)
    lm.reference = train.Reference(ckpt.frozen_copy(model))
    g = lm.guidance
    g.ivs = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    g.ivs = g.ivs / g.ivs.norm(dim=1, keepdim=True)
    g.layers = torch.tensor([1, 1])
    g.train_iv, g.kl_iv, g.kl_weight, g.kl_positions = True, True, 1.0, positions
    n = norms_of(batch)

    def kl(alpha, ref_iv=True):
        g.alpha, g.kl_iv = alpha, ref_iv
        return float(lm(batch, n)[1]["kl"])

    assert abs(kl(1.0)) < 1e-6, "same weights, IV at α=1 on both sides: KL must vanish"
    # (with "all" positions the prompt before the IV's position dilutes the mean, hence the lower bar)
    assert kl(0.0) > 1e-5, "no IV in the trained model but IV in the reference: KL must be positive"
    assert kl(1.0, ref_iv=False) > 1e-5
    assert abs(kl(0.0, ref_iv=False)) < 1e-6


def test_kl_zero_with_lora_reference_adapters_off():
    # with LoRA the reference is the same module with its adapters off: fresh adapters (B = 0)
    # change nothing, so the KL is zero at α = 1; after B moves it is not
    tok = byte_tokenizer()
    model = tiny_model()
    lora.add_lora(model, r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj"))
    batch = guided_batch(tok)
    lm = train.LossModule(model, reference=train.Reference(model, "original"))
    g = lm.guidance
    g.ivs, g.layers = torch.ones(2, 32) / 32 ** 0.5, torch.tensor([2, 2])
    g.train_iv, g.kl_iv, g.kl_weight, g.alpha = True, True, 1.0, 1.0
    n = (float((batch["targets"] != -100).sum()), float(len(batch["idx"])))
    assert abs(float(lm(batch, n)[1]["kl"])) < 1e-6
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.normal_(std=0.5)
    assert float(lm(batch, n)[1]["kl"]) > 1e-4


def fvg_setup(kl_min=0.1, mse_min=0.01):
    """A trained model, a reference that differs from it, and Guidance as --preset fvg sets it."""
    tok = byte_tokenizer()
    def sharp(seed):   # larger weights than tiny_model's: peaked distributions, KLs above the thresholds
        cfg = tiny_model().config
        torch.manual_seed(seed)
        m = Transformer(cfg).init_weights(std=0.5)
        with torch.no_grad():
            m.model.embed_tokens.weight.mul_(3)        # tied: also the output layer's scale
        return m
    model, ref = sharp(0), sharp(1).eval()
    batch = guided_batch(tok)
    g = train.Guidance(ivs=torch.randn(2, 32, generator=torch.Generator().manual_seed(3)), layers=torch.tensor([1, 2]),
                       train_iv=False, kl_iv=True, kl_weight=20.0, kl_temp=2.0, kl_positions="last", kl_min=kl_min,
                       kl_gate="batch", kl_all_weight=0.1, head_mse_weight=1.0, head_mse_min=mse_min,
                       heads={0: torch.tensor([1, 3]), 2: torch.tensor([0])})
    lm = train.LossModule(model, guidance=g)
    lm.reference = train.Reference(ref)
    return tok, model, ref, batch, g, lm


def sibling_kd(new_logits, prev_logits, T=2.0):
    # the FvForgetting code's KD_loss, written as it has it: kl_div(log q, p) with batchmean
    import torch.nn.functional as F
    return F.kl_div(F.log_softmax(prev_logits / T, dim=-1), F.softmax(new_logits / T, dim=-1), reduction="batchmean")


def test_fvg_loss_terms_equal_the_sibling_code_by_hand():
    import torch.nn.functional as F
    from model import Intervention
    tok, model, ref, batch, g, lm = fvg_setup()
    B, last, real = len(batch["idx"]), batch["last"], batch["pad_mask"]
    n = (float((batch["targets"] != -100).sum()), float(B))
    loss, parts = lm(batch, n)
    with torch.no_grad():
        # the reference: full sequence, the row's IV added (scale 1) after its task's layer at the last prompt token
        add = {1: g.ivs[batch["task"]] * (batch["task"] == 0).float()[:, None],
               2: g.ivs[batch["task"]] * (batch["task"] == 1).float()[:, None]}
        ref_logits = ref(batch["idx"], pad_mask=real, intervention=Intervention(pos=last, add_resid=add))
        rec_ref = Intervention(pos=last, record_z=(0, 2))          # the heads' z: the reference WITHOUT the IV
        ref(batch["idx"], pad_mask=real, intervention=rec_ref)
    rec = Intervention(pos=last, record_z=(0, 2))
    logits = model(batch["idx"], pad_mask=real, intervention=rec)
    rows = torch.arange(B)
    kl1 = sibling_kd(logits[rows, last], ref_logits[rows, last])
    # over all positions: the sibling divides the sum by the batch size; we count real tokens only
    kl2 = sibling_kd(logits[real], ref_logits[real]) * real.sum() / B
    mses = [F.mse_loss(rec.z[l][:, 0, h], rec_ref.z[l][:, 0, h]).detach() for l, hs in g.heads.items() for h in hs.tolist()]
    ce = F.cross_entropy(logits[batch["targets"] != -100], batch["targets"][batch["targets"] != -100])
    assert kl1 > 0.1 and kl2 > 0.1 and all(m > 0.01 for m in mses), "the toy must exceed every threshold"
    # the parts come back as they enter the loss, weights included (20 and 0.1, the MSE's 1)
    torch.testing.assert_close(parts["kl"], 20 * kl1, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(parts["kl_all"], 0.1 * kl2, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(parts["mse"], sum(mses), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, ce + 20 * kl1 + 0.1 * kl2 + sum(mses), rtol=1e-4, atol=1e-5)
    # thresholds: a term at or below its threshold counts zero (and so gives no gradient)
    _, _, _, _, _, lm_hi = fvg_setup(kl_min=float(max(kl1, kl2).detach()) + 1, mse_min=float(max(mses)) + 1)
    loss_hi, parts_hi = lm_hi(batch, n)
    assert float(parts_hi["kl"]) == float(parts_hi["kl_all"]) == float(parts_hi["mse"]) == 0.0
    torch.testing.assert_close(loss_hi, ce, rtol=1e-5, atol=1e-6)
    # one head under its threshold drops out alone
    _, _, _, _, _, lm_mid = fvg_setup(mse_min=float(sorted(mses)[0]) + 1e-6)
    torch.testing.assert_close(lm_mid(batch, n)[1]["mse"], sum(sorted(mses)[1:]), rtol=1e-4, atol=1e-6)


def test_presets_set_defaults_and_flags_win():
    METHOD_PRESETS = train.PRESETS["method"]
    cfg = train.parse_flags(["--preset", "fvg"])
    assert {k: cfg[k] for k in METHOD_PRESETS["fvg"]} == METHOD_PRESETS["fvg"] and cfg["kl_ref"] == "previous"
    assert cfg["out_dir"] == str(Path("runs") / "fvg") and not cfg["guided"] and cfg["lora_r"] == 0
    cfg = train.parse_flags(["--preset", "fvg", "--kl_weight", "3", "--regime", "lora"])
    assert cfg["kl_weight"] == 3 and cfg["kl_all_weight"] == 0.1                 # a flag given wins over the preset
    assert (cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["lora_targets"], cfg["lora_merge"]) == \
        (8, 16.0, 0.1, "q_proj,v_proj", True)
    assert cfg["lr_schedule"] == "constant" and cfg["warmup"] == 0 and cfg["out_dir"] == str(Path("runs") / "fvg-lora")
    guided = train.parse_flags(["--guided"])
    assert guided["preset"] == "guided" and guided["guided"] and (guided["iv_alpha0"], guided["kl_weight"]) == (1, 1)
    plain = train.parse_flags([])
    assert plain["preset"] == "plain" and (plain["kl_weight"], plain["replay"], plain["lora_r"]) == (0, 0, 0)
    assert train.parse_flags(["--preset", "replay"])["replay"] == 0.25
    with pytest.raises(TrainError, match="--guided is --preset guided"):
        train.parse_flags(["--guided", "--preset", "fvg"])


def test_replay_mixes_a_fixed_sample_of_earlier_tasks_only():
    from ivft.data import stage_pool
    encoded = [[Item([i, t], 1, t) for i in range(10)] for t in range(3)]
    assert stage_pool(encoded, 0, 0.5, 0) == encoded[0]                  # nothing earlier to replay
    pool = stage_pool(encoded, 2, 0.5, 0)
    assert pool[:10] == encoded[2] and len(pool) == 15                    # the task + 0.5 x its size
    replayed = pool[10:]
    assert all(it.task in (0, 1) for it in replayed) and len({id(it) for it in replayed}) == 5
    assert stage_pool(encoded, 2, 0.5, 0) == pool                         # the same sample every time
    assert stage_pool(encoded, 2, 0.5, 1) != pool                         # ... for this seed
    assert len(stage_pool(encoded, 1, 2.0, 0)) == 30                      # more than there is: drawn with repeats


# ---- runs -------------------------------------------------------------------------------------------

def test_fvg_and_lora_regime_run_end_to_end(env, tmp_path):
    # the sibling code's loss in its LoRA regime: previous-stage reference, both KLs and the head MSE
    # all take part (the log shows each term), and the run ends with finite numbers
    out = tmp_path / "fvg"
    res = run_main(base_args(env, out, "--preset", "fvg", "--regime", "lora", "--lr", "3e-3", *iv_args(env)))
    assert res["config"]["kl_ref"] == "previous" and res["config"]["lora_r"] == 8
    steps = [line for line in (out / "log.txt").read_text().splitlines() if "| step" in line]
    assert steps and all(" kl " in line and " kl_all " in line and " mse " in line for line in steps)
    assert (out / "stage-2" / "model.safetensors").is_file()     # merged after every task: a plain HF checkpoint
    # the tiny model stays under the sibling's thresholds (every term counts 0 above): without them
    # each term is positive, so the run really computes all three
    out = tmp_path / "fvg0"
    run_main(base_args(env, out, "--preset", "fvg", "--regime", "lora", "--lr", "3e-3", "--kl_min", "0",
                       "--head_mse_min", "0", *iv_args(env)))
    last = [line for line in (out / "log.txt").read_text().splitlines() if "| step" in line][-1]
    terms = {k: float(last.split(f" {k} ")[1].split()[0]) for k in ("kl", "kl_all", "mse")}
    assert all(v > 0 for v in terms.values()), last


def test_guided_with_zero_weights_equals_plain(env, tmp_path):
    run_main(base_args(env, tmp_path / "plain"))
    run_main(base_args(env, tmp_path / "zero", "--guided", "--kl_weight", "0", "--iv_alpha0", "0", *iv_args(env)))
    assert_same_weights(final_weights(tmp_path / "plain"), final_weights(tmp_path / "zero"))
    # the comparison can fail: real guidance does change the weights
    run_main(base_args(env, tmp_path / "guided", "--guided", *iv_args(env)))
    with pytest.raises(AssertionError):
        assert_same_weights(final_weights(tmp_path / "plain"), final_weights(tmp_path / "guided"))


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("variant", ["full-guided", "lora-guided"])
def test_resume_is_bit_exact(env, tmp_path, variant, monkeypatch):
    extra = ["--guided", *iv_args(env), "--save_every", "3"]
    if variant.startswith("lora"):
        # dropout makes the RNG state part of what must be restored
        extra += ["--lora_r", "4", "--lora_dropout", "0.2", "--lora_targets", "q_proj,v_proj,down_proj",
                  "--kl_positions", "answer"]
    else:
        # the reference of task 2 is read back from task 1's checkpoint; replay and the head-MSE
        # term run too
        extra += ["--kl_ref", "previous", "--replay", "0.5", "--head_mse_weight", "0.1"]
    extra += ["--eval_n", "2", "--general", env["general"], "--eval_k_shot", "1"]
    ref = run_main(base_args(env, tmp_path / "ref", *extra))

    # 1) Ctrl-C in task 2 after step 1: a checkpoint is saved at that step boundary
    def ctrl_c(stage, step, model):
        if (stage, step) == (1, 1):
            raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        run_main(base_args(env, tmp_path / "int", *extra), ctrl_c)
    assert e.value.code == 130
    assert ckpt.read_state(tmp_path / "int" / "last")["step"] == 1
    # 2) a crash in task 1 at step 4: only the --save_every checkpoint of step 3 is there
    def crash(stage, step, model):
        if (stage, step) == (0, 4):
            raise Interrupt
    with pytest.raises(Interrupt):
        run_main(base_args(env, tmp_path / "crash", *extra), crash)
    assert ckpt.read_state(tmp_path / "crash" / "last")["step"] == 3

    # 3) Ctrl-C while evaluating task 1 (the 2nd evaluation): the trained task is saved before merging
    calls = []
    real_eval = evaluate.evaluate_stage
    def eval_ctrl_c(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_eval(*a, **kw)
    monkeypatch.setattr(evaluate, "evaluate_stage", eval_ctrl_c)
    with pytest.raises(SystemExit):
        run_main(base_args(env, tmp_path / "eval", *extra))
    monkeypatch.setattr(evaluate, "evaluate_stage", real_eval)
    st = ckpt.read_state(tmp_path / "eval" / "last")
    assert (st["stage_done"], st["step"]) == (0, 4)

    for name in ("int", "crash", "eval"):
        res = run_main(base_args(env, tmp_path / name, *extra, "--resume"))
        assert_same_weights(final_weights(tmp_path / "ref"), final_weights(tmp_path / name))
        # the same scores at every stage (the reports' "settings" hold wall-clock seconds)
        assert [r["tasks"] for r in res["stages"]] == [r["tasks"] for r in ref["stages"]]
        assert res["metrics"] == ref["metrics"]
    assert set(ref["metrics"]) == {"AP", "BWT", "FWT", "GP_drop", "IP_drop"}
    assert len(ref["stages"]) == 3 and set(ref["stages"][0]["tasks"]) == {"a", "b", "g"}
    saved = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert set(saved) >= {"config", "stages", "metrics"}
    if variant.startswith("lora"):
        # the checkpoint is a plain HF model (adapters merged) plus the adapter in PEFT layout
        assert (tmp_path / "ref" / "stage-2" / "adapter_config.json").exists() is False  # merged
        assert (tmp_path / "int" / "last").exists() is False   # superseded by the stage checkpoint


def test_ddp_and_fsdp_equal_one_process(env, tmp_path):
    """2 CPU processes (gloo) with the same global batch (4 = 2 ranks x 1 micro-batch of 2) as one
    process (2 micro-batches of 2). Both torchrun launches run while the 1-process references train
    in this process: interpreter start-up dominates, and overlapping it halves the wall time."""
    flags = {"ddp": ["--guided", *iv_args(env), "--max_steps", "3"],
             "fsdp": ["--guided", *iv_args(env), "--max_steps", "3", "--lora_r", "4", "--lora_dropout", "0",
                      "--no-lora_merge"]}
    environ = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    procs = {}
    for mode, extra in flags.items():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train.py"), *base_args(env, tmp_path / f"{mode}-2", *extra),
               *(["--fsdp"] if mode == "fsdp" else [])]
        procs[mode] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       env=environ, cwd=ROOT)
    for mode, extra in flags.items():
        run_main(base_args(env, tmp_path / f"{mode}-1", *extra))
    for mode, p in procs.items():
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
        worst = assert_same_weights(final_weights(tmp_path / f"{mode}-1"), final_weights(tmp_path / f"{mode}-2"),
                                    exact=False, atol=1e-6)
        print(f"{mode} (2 processes) vs 1 process: max |diff| {worst:.2e}")


def test_lora_merge_equals_unmerged_forward():
    torch.manual_seed(0)
    model = tiny_model()
    x = torch.randint(0, 259, (2, 11))
    base_out = model(x)
    lora.add_lora(model, r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj", "o_proj", "gate_proj"))
    # only the adapters train, and the unchanged Parameter objects keep the tied/HF names
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n in dict(model.named_parameters()) if ".lora_" in n}
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.normal_(std=0.3)
    unmerged = model(x)
    with lora.adapters_off(model):
        assert torch.equal(model(x), base_out)                      # adapters off = the base model
    assert lora.merge(model) == 4 * 3 and not lora.has_lora(model)
    merged = model(x)
    diff = float((merged - unmerged).detach().abs().max())
    assert diff < 1e-5, f"merged vs unmerged forward: max |diff| {diff:.2e}"
    assert float((merged - base_out).detach().abs().max()) > 1e-3, "the adapters must have changed the model"


# ---- bad input ----------------------------------------------------------------------------------------

def expect_exit(argv, capsys, code=2, callback=None):
    """Run, expect exit status `code`, and return the error line: the one line of stderr for bad
    input; after training has started, the last line (progress bars come before it)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(argv, callback)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == code, err[-5:]
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err[-5:]
    if code == 2:
        assert len(err) == 1, err
    return errors[0]


def tree_digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_bad_inputs(env, tmp_path, capsys):
    out = tmp_path / "bad"
    args = base_args(env, out)
    msg = expect_exit([*args[:2], "--tasks", "no_such_task", *args[4:]], capsys)
    assert "no_such_task" in msg
    expect_exit([*args[:2], "--tasks", " , ", *args[4:]], capsys)
    msg = expect_exit(args + ["--guided", *iv_args(env), "--iv_layer", "3"], capsys)
    assert "out of range" in msg
    msg = expect_exit(args + ["--guided", "--iv_file", f"a={env['foreign_iv']}", "--iv_file", f"b={env['ivs']['b']}"],
                      capsys)
    assert "foreign.safetensors" in msg
    assert not out.exists(), "a rejected run must not create its out_dir"

    # a finished run: no --resume or changed flags -> exit 2; --resume -> nothing to do, nothing changed
    run_main(args)
    before = tree_digest(out)
    assert "--resume" in expect_exit(args, capsys)
    assert "lr" in expect_exit([*args, "--resume", "--lr", "1e-4"], capsys)
    capsys.readouterr()
    res = run_main([*args, "--resume"])
    assert "finished" in capsys.readouterr().err and tree_digest(out) == before
    assert res == json.loads((out / "results.json").read_text()) and "cl" in res or res["metrics"] == {}
    # one unreadable training state: resume falls back to the checkpoint before it, says so, and
    # redoes the lost stage bit-exactly
    final = final_weights(out)
    (out / "finished").unlink(missing_ok=True)     # as if cut before its end: resumable, not final
    state = out / "stage-2" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    run_main([*args, "--resume"])
    assert f"skipped {out / 'stage-2'}" in capsys.readouterr().err
    assert_same_weights(final_weights(out), final)
    # unreadable weights in the checkpoint to resume from: exit 2 naming the file, nothing changed
    shutil.rmtree(out / "stage-2")
    (out / "finished").unlink(missing_ok=True)
    weights = out / "stage-1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    before = tree_digest(out)
    assert "model.safetensors" in expect_exit([*args, "--resume"], capsys)
    assert tree_digest(out) == before


def test_nan_loss_stops_and_keeps_last_good_checkpoint(env, tmp_path, capsys):
    def poison(stage, step, model):
        if (stage, step) == (1, 3):
            with torch.no_grad():
                model.model.layers[0].mlp.up_proj.weight.fill_(float("nan"))
    out = tmp_path / "nan"
    msg = expect_exit(base_args(env, out, "--save_every", "2"), capsys, code=3, callback=poison)
    assert "nan" in msg and str(out / "last") in msg
    st = ckpt.read_state(out / "last")
    assert (st["stage_done"], st["step"]) == (1, 2)
    w = read_safetensors(out / "last" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in w.values())
    assert not (out / "stage-2").exists()


def test_stage0_cache_reused_only_when_settings_match(env, tmp_path, monkeypatch):
    # a study's runs share the original model's evaluation: the first run writes it, a run with the
    # same model/tasks/eval flags reads it back (no evaluation), one with other eval flags recomputes
    cache = tmp_path / "stage0.json"
    args = ["--general", env["general"], "--eval_n", "3", "--eval_k_shot", "0", "--stage0_cache", str(cache)]
    first = run_main([*base_args(env, tmp_path / "r1"), *args])
    assert cache.is_file()
    calls = []
    real = evaluate.evaluate_suite     # what evaluates (evaluate_stage reads the cache first)
    monkeypatch.setattr(evaluate, "evaluate_suite", lambda *a, **k: calls.append(k["model_name"]) or real(*a, **k))
    second = run_main([*base_args(env, tmp_path / "r2", "--seed", "5"), *args])
    assert not any(label.startswith("stage 0") for label in calls) and len(set(calls)) == 2
    assert second["stages"][0] == first["stages"][0]
    calls.clear()
    run_main([*base_args(env, tmp_path / "r3"), *args[:-2], "--stage0_cache", str(cache), "--eval_n", "2"])
    assert calls[0].startswith("stage 0")       # --eval_n changed: the cached report does not apply


# ---- users' files and real failures --------------------------------------------------------------

def test_finished_run_results_survive_resume(env, tmp_path, capsys):
    # with evaluation: results.json holds metrics and cl, and --resume must not rewrite it
    out = tmp_path / "fin"
    args = base_args(env, out, "--eval_n", "2", "--general", env["general"], "--eval_k_shot", "0")
    ref = run_main(args)
    before = tree_digest(out)
    again = run_main([*args, "--resume"])
    assert tree_digest(out) == before and again["metrics"] == ref["metrics"] and "cl" in again


def test_leftovers_of_crashed_writers_are_cleaned(env, tmp_path, capsys):
    out = tmp_path / "left"
    args = base_args(env, out, "--save_every", "2")
    def crash(stage, step, model):
        if (stage, step) == (1, 3):
            raise Interrupt
    with pytest.raises(Interrupt):
        run_main(args, crash)
    dead = "999999999-Sdeadbeef"            # no such process (pid and start token: files.owner_tag)
    (out / f".last.tmp-{dead}-abc").mkdir()
    (out / f".last.tmp-{dead}-abc" / "model.safetensors").write_bytes(b"half")
    (out / f".results.json.tmp-{dead}-x1y2z3").write_text("{")
    live = out / f".last.tmp-{files.owner_tag()}-xyz"      # a live writer's: kept
    live.mkdir()
    # a swap cut between its two renames: the only complete copy of `last` is the .old one
    os.replace(out / "last", out / f".last.old-{dead}")
    capsys.readouterr()
    run_main([*args, "--resume"])
    err = capsys.readouterr().err
    assert "restored" in err and "removed stale" in err
    names = {p.name for p in out.iterdir()} - {"finished"}         # the marker, once train.py writes it
    assert names == {"stage-1", "stage-2", "results.json", "log.txt", "train_config.json", live.name}, names
    ref = run_main(base_args(env, tmp_path / "ref", "--save_every", "2"))
    assert_same_weights(final_weights(out), final_weights(tmp_path / "ref"))
    assert ref is not None


def test_moved_run_resumes(env, tmp_path):
    a, b = tmp_path / "a", tmp_path / "moved"
    def ctrl_c(stage, step, model):
        if (stage, step) == (1, 1):
            raise KeyboardInterrupt
    with pytest.raises(SystemExit):
        run_main(base_args(env, a), ctrl_c)
    shutil.copytree(a, b)
    run_main(base_args(env, b, "--resume"))
    run_main(base_args(env, tmp_path / "ref"))
    assert_same_weights(final_weights(b), final_weights(tmp_path / "ref"))


def test_early_death_leaves_a_folder_a_rerun_can_use(env, tmp_path, capsys):
    out = tmp_path / "early"
    out.mkdir()
    started = json.dumps({"preset": "plain", "tasks": "a,b", "out_dir": str(out)})
    (out / "train_config.json").write_text(started)         # what a run killed before its first
    (out / "log.txt").write_text("config: ...\n")          # checkpoint leaves
    run_main(base_args(env, out))                           # a plain rerun starts over
    assert (out / "stage-2").is_dir() and "config: ..." not in (out / "log.txt").read_text()
    assert not (out / "run.lock").exists()                  # the lock is gone with the run
    shutil.rmtree(out)
    out.mkdir()
    (out / "train_config.json").write_text(started)
    capsys.readouterr()
    run_main(base_args(env, out, "--resume"))               # so does --resume, and says so
    assert "starting from the beginning" in capsys.readouterr().err and (out / "stage-2").is_dir()
    # a folder with someone else's files is never taken over, --overwrite or not, and the message
    # says what is there; files named like a run's (results.json, log.txt) without a run's
    # train_config.json are someone else's too
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"], ["--resume"]):
        msg = expect_exit(base_args(env, other, *extra), capsys)
        assert "not a run's (notes.txt)" in msg, msg
    assert (other / "notes.txt").read_text() == "mine" and len(list(other.iterdir())) == 1
    (other / "notes.txt").unlink()
    for name in ("results.json", "log.txt", "paper.tex"):
        (other / name).write_text("mine")
    before = tree_digest(other)
    assert "log.txt, paper.tex, results.json" in expect_exit(base_args(env, other, "--overwrite"), capsys)
    (other / "paper.tex").unlink()
    assert "log.txt, results.json" in expect_exit(base_args(env, other, "--overwrite"), capsys)
    assert {k: v for k, v in tree_digest(other).items()} == {k: v for k, v in before.items() if k != "paper.tex"}


def test_sigterm_saves_a_resumable_checkpoint(env, tmp_path):
    # a real process, a real SIGTERM (what a job scheduler sends before it kills)
    out = tmp_path / "term"
    flag = tmp_path / "started"
    code = (f"import time; import train\n"  # train is pip-installed (setup.sh), importable from anywhere
            f"def cb(stage, step, model):\n"
            f"    open({str(flag)!r}, 'w').close()\n"
            f"    time.sleep(0.2)\n"
            f"train.main({base_args(env, out, '--max_steps', '40')!r}, step_callback=cb)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        if flag.exists():
            break
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-500:]
    assert "SIGTERM: stopping after this step" in err and "terminated" in err
    st = ckpt.read_state(out / "last")
    assert st["step"] >= 1
    run_main(base_args(env, out, "--max_steps", "40", "--resume"))
    run_main(base_args(env, tmp_path / "ref", "--max_steps", "40"))
    assert_same_weights(final_weights(out), final_weights(tmp_path / "ref"))


def test_unwritable_out_dir_and_full_disk(env, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    import tempfile as tf
    real = tf.TemporaryFile
    def refuse(*a, dir=None, **k):
        if dir is not None and Path(dir) == ro:
            raise PermissionError(13, "Permission denied")
        return real(*a, dir=dir, **k)
    monkeypatch.setattr(tf, "TemporaryFile", refuse)
    msg = expect_exit(base_args(env, ro / "run"), capsys)
    assert "cannot write in" in msg and str(ro) in msg and not (ro / "run").exists()
    monkeypatch.setattr(tf, "TemporaryFile", real)
    # a full disk while a checkpoint is written: one line naming the checkpoint, no temporaries left.
    # The disk fills as an OSError, or as safetensors' own SafetensorError (not an OSError: it gave a
    # traceback); in the second case after `last` (--save_every 2) fitted, which must stay intact.
    import safetensors
    import safetensors.torch as st
    from ivft import load as L
    real_save = st.save_file
    for error, saves_that_fit, extra in [
            (OSError(28, "No space left on device"), 0, []),
            (safetensors.SafetensorError("No space left on device"), 1, ["--save_every", "2"])]:
        fitted = []
        def full(*a, **k):
            if len(fitted) < saves_that_fit:
                fitted.append(1)
                return real_save(*a, **k)
            raise error
        monkeypatch.setattr(L, "save_file", full, raising=False)
        monkeypatch.setattr(st, "save_file", full)
        out = tmp_path / f"full-{type(error).__name__}"
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run_main(base_args(env, out, *extra))
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and last.startswith("error: ") and str(out / "stage-1") in last, last
        assert "No space left on device" in last and "Traceback" not in last
        assert not [p for p in out.iterdir() if p.name.startswith(".")]
        assert not (out / "stage-1").exists()
        if saves_that_fit:          # the checkpoint before the failed one is whole and resumable
            assert ckpt.read_state(out / "last")["step"] == 2
            assert read_safetensors(out / "last" / "model.safetensors")


def test_checkpoints_have_ordinary_permissions(env, tmp_path):
    out = tmp_path / "perm"
    run_main(base_args(env, out))
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "stage-1").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / "stage-1" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("flag,value,what", [
    ("--num_threads", "-1", "--num_threads"), ("--eval_n", "-1", "--eval_n"),
    ("--save_every", "-1", "--save_every"), ("--lr", "inf", "finite"), ("--kl_temp", "nan", "finite"),
    ("--log_every", "0", "--log_every"),
])
def test_flags_are_validated_at_parse_time(env, tmp_path, capsys, flag, value, what):
    out = tmp_path / "flags"
    assert what in expect_exit(base_args(env, out, flag, value), capsys)
    assert not out.exists()


def test_sample_flags_are_validated(capsys):
    for flag, value in (("--num_samples", "0"), ("--temperature", "-1"), ("--max_new_tokens", "0")):
        r = subprocess.run([sys.executable, str(ROOT / "sample.py"), flag, value], capture_output=True, text=True)
        assert r.returncode == 2 and f"{flag} " in r.stderr.strip().splitlines()[-1], r.stderr


# ---- caches, IV files and run folders: nothing silently wrong, nothing lost ----------------------

def test_stage0_cache_is_keyed_by_task_content(env, tmp_path, monkeypatch):
    # a general task file with the same name but other data must not get the cached stage-0 report
    gdir = tmp_path / "g2"
    gdir.mkdir()
    general = write_task(gdir, "g", lambda w: w[-1], 9)          # same name "g", other answers
    cache = tmp_path / "stage0.json"
    ev = ["--eval_n", "3", "--eval_k_shot", "0", "--stage0_cache", str(cache)]
    run_main([*base_args(env, tmp_path / "r1"), *ev, "--general", env["general"]])
    calls = []
    real = evaluate.evaluate_suite
    monkeypatch.setattr(evaluate, "evaluate_suite", lambda *a, **k: calls.append(k["model_name"]) or real(*a, **k))
    run_main([*base_args(env, tmp_path / "r2"), *ev, "--general", general])
    assert calls and calls[0].startswith("stage 0"), "the cached report of other task data was reused"


@pytest.mark.parametrize("content", ["garbage", "dir", "json"])
def test_bad_stage0_cache_is_one_line_before_anything_is_written(env, tmp_path, capsys, content):
    cache = tmp_path / "cache.json"
    if content == "dir":
        cache.mkdir()
    else:
        cache.write_bytes(b"\xff\xfe\x00garbage" if content == "garbage" else b'["not", "a cache"]')
    out = tmp_path / "run"
    msg = expect_exit(base_args(env, out, "--eval_n", "2", "--stage0_cache", str(cache)), capsys)
    assert msg.startswith(f"error: --stage0_cache {cache}") and not out.exists()


def test_iv_file_of_another_task_is_refused(env, tmp_path, capsys):
    out = tmp_path / "swapped"
    msg = expect_exit(base_args(env, out, "--guided", "--iv_file", f"a={env['ivs']['b']}",
                                "--iv_file", f"b={env['ivs']['b']}"), capsys)
    assert "extracted for task 'b'" in msg and env["ivs"]["b"] in msg and not out.exists()


def test_a_second_writer_is_refused(env, tmp_path, capsys):
    from ivft.files import RunLock
    out = tmp_path / "busy"
    with RunLock(out, what=f"--out_dir {out}"):               # another live train.py holds the folder
        msg = expect_exit(base_args(env, out), capsys)
    assert f"--out_dir {out} is in use by PID {os.getpid()}" in msg
    assert not out.exists()                                   # the holder's lock was its only file
    run_main(base_args(env, out))                             # once it is gone the folder is free
    assert (out / "stage-2").is_dir() and not (out / "run.lock").exists()


def test_resume_warns_when_the_code_changed(env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "code"
    monkeypatch.setattr(train, "code_version", lambda: {"commit": "aaa", "diff": ""})
    run_main(base_args(env, out, "--max_steps", "2", "--save_every", "1"))
    shutil.rmtree(out / "stage-2")
    (out / "finished").unlink(missing_ok=True)     # as if cut before its end: resumable, not final
    monkeypatch.setattr(train, "code_version", lambda: {"commit": "bbb", "diff": "123"})
    capsys.readouterr()
    run_main([*base_args(env, out, "--max_steps", "2", "--save_every", "1"), "--resume"])
    err = capsys.readouterr().err
    assert "the code changed" in err and "aaa" in err and "bbb" in err
    assert json.loads((out / "train_config.json").read_text())["code"]["commit"] == "bbb"


def without(args, flag):
    i = args.index(flag)
    return args[:i] + args[i + 2:]


def test_micro_batch_follows_the_batch_size(env, tmp_path, capsys):
    # --micro_batch defaults to what the batch allows: a flag the user did not set is never the
    # one an error names
    res = run_main(without(base_args(env, tmp_path / "b3", "--max_steps", "1"), "--micro_batch") + ["--batch_size", "3"])
    assert res["config"]["micro_batch"] == 3
    res = run_main(without(base_args(env, tmp_path / "b12", "--max_steps", "1"), "--micro_batch") + ["--batch_size", "12"])
    assert res["config"]["micro_batch"] == 6                   # the largest divisor <= 8
    msg = expect_exit(base_args(env, tmp_path / "b5", "--batch_size", "5"), capsys)
    assert "--micro_batch 2" in msg                            # the user's own micro_batch is named


def help_text(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        train.parse_flags([*argv, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_shows_the_real_default_and_each_presets_value(capsys):
    # each flag's default is set where the flag is; --help shows it as the presets given leave it
    plain, guided = help_text([], capsys), help_text(["--guided"], capsys)
    lora_quick = help_text(["--regime", "lora", "--quick"], capsys)
    kl = "λ of the KL term; without an IV: the lwf baseline (presets: lwf 1.0, guided 1.0, fvg 20.0)"
    assert f"{kl} (default: 0.0)" in plain and f"{kl} (default: 1.0)" in guided
    assert "(presets: --regime lora 16.0) (default: 1.0)" in plain               # --epochs
    assert "(presets: --regime lora 16.0) (default: 16.0)" in lora_quick
    assert "(presets: --quick 24) (default: 24)" in lora_quick                   # --max_steps
    for dest in ("kl_weight", "iv_alpha0", "lora_r", "max_train", "eval_n"):     # no None left to fill later
        assert train.build_parser().get_default(dest) is not None, dest
    assert "(default: None)" not in plain


def test_a_changed_injection_layer_reuses_the_cached_iv(env, tmp_path):
    import extract_iv
    from ivft.tasks import load_task
    model, tok = load_model(env["model"])
    task = load_task(env["tasks"].split(",")[0])
    path = tmp_path / "iv.safetensors"
    kw = dict(n_clean=4, n_corrupt=4, top_k=2, progress=False)
    first = extract_iv.get_iv(model, tok, task, path, layer=1, **kw)
    stamp = path.stat().st_mtime_ns
    again = extract_iv.get_iv(model, tok, task, path, layer=2, **kw)
    assert again.get("reused") and again["layer"] == 2 and path.stat().st_mtime_ns == stamp
    assert torch.equal(again["iv"], first["iv"].float())
    got = extract_iv.training_ivs(model, tok, [task], iv_dir=tmp_path / "cache", model_id="tiny", layer=0, **kw)
    assert got[task.name][1] == 0
    with pytest.raises(extract_iv.ExtractError, match="IV layer 7 is out of range"):
        extract_iv.training_ivs(model, tok, [task], iv_dir=tmp_path / "cache", model_id="tiny", layer=7, **kw)


def test_a_damaged_iv_cache_file_is_rebuilt_with_a_note(env, tmp_path, capsys):
    import extract_iv
    from ivft.tasks import load_task
    model, tok = load_model(env["model"])
    task = load_task(env["tasks"].split(",")[0])
    path = tmp_path / "iv.safetensors"
    kw = dict(n_clean=4, n_corrupt=4, top_k=2, layer=1, progress=False)
    extract_iv.get_iv(model, tok, task, path, **kw)
    path.write_bytes(path.read_bytes()[:200])
    capsys.readouterr()
    r = extract_iv.get_iv(model, tok, task, path, **kw)
    assert not r.get("reused") and "extracting it again" in capsys.readouterr().err
    assert extract_iv.get_iv(model, tok, task, path, **kw).get("reused")


# ---- beyond the paper: the KL on prompts without the instruction; the loss's gradient shares ----

def free_batch(tok):
    from ivft.data import encode_task
    from ivft.tasks import Example, Task
    ex = [Example("Answer in capitals.", w, w.upper()) for w in ["cat", "doggo", "owl"]]
    task = Task(name="caps", kind="generate", metric="exact_match", train=ex, test=[])
    return collate(encode_task(tok, task, 0, 256, free=True), tok.pad_id, "cpu")


def check_prompt_kl(batch, term):
    """A prompt KL term (free_kl, other_kl): 0 at the original, > 0 once the model moves, its weight
    applied once, and declared as needing the frozen reference (never compared with itself)."""
    model = tiny_model()
    lm = train.LossModule(model, guidance=train.Guidance(**{f"{term}_weight": 2.0}))
    lm.reference = train.Reference(ckpt.frozen_copy(model))
    assert abs(float(lm(batch, norms_of(batch))[1][term])) < 1e-6    # the model is the original
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.5)
    kl = float(lm(batch, norms_of(batch))[1][term])
    assert kl > 1e-4
    setattr(lm.guidance, f"{term}_weight", 1.0)
    assert float(lm(batch, norms_of(batch))[1][term]) == pytest.approx(kl / 2)   # the weight, once
    assert train.Guidance(**{f"{term}_weight": 1.0}).needs_reference()


def test_other_instruction_kl_reads_other_tasks_prompts_and_vanishes_at_the_original():
    from ivft.data import encode_task, other_prompts
    from ivft.tasks import Example, Task
    tok = byte_tokenizer()
    ex = [Example("Answer in capitals.", w, w.upper()) for w in ["cat", "doggo", "owl", "emu"]]
    task = Task(name="caps", kind="generate", metric="exact_match", train=ex, test=[])
    others = [Task(name=n, kind="generate", metric="exact_match", test=[],
                   train=[Example(f"Do {n} now.", w, w) for w in ["x", "yy", "zzz"]]) for n in ("o1", "o2")]
    pool = other_prompts(tok, others, 256)
    assert len(pool) == 6
    items = encode_task(tok, task, 0, 256, other=pool, seed=3)
    assert [it.other for it in items] == [it.other for it in encode_task(tok, task, 0, 256, other=pool, seed=3)]
    assert [it.other for it in items] != [it.other for it in encode_task(tok, task, 0, 256, other=pool, seed=4)]
    batch = collate(items, tok.pad_id, "cpu")
    for row, last in zip(batch["other"], batch["other_last"]):
        text = tok.decode(row[: last + 1].tolist())
        assert ("Do o1 now." in text or "Do o2 now." in text) and "capitals" not in text
        assert text.rstrip().endswith("assistant")
    check_prompt_kl(batch, "other_kl")


def test_other_instruction_kl_refuses_a_trained_or_evaluated_task(env, tmp_path, capsys):
    out = tmp_path / "other"
    a = env["tasks"].split(",")[0]
    msg = expect_exit(base_args(env, out, "--other_kl_weight", "1", "--other_kl_tasks", a), capsys)
    assert "--other_kl_tasks" in msg and "also trained or evaluated" in msg
    msg = expect_exit(base_args(env, out, "--other_kl_weight", "-1"), capsys)
    assert "--other_kl_weight" in msg
    assert not out.exists()
    res = run_main(base_args(env, out, "--other_kl_weight", "0.5", "--other_kl_tasks", env["general"]))
    assert all(set(t["terms"]) == {"ce", "other_kl"} and t["terms"]["other_kl"] > 0 for t in res["training"])


def test_instruction_free_kl_prompts_carry_no_instruction_and_vanish_at_the_original():
    tok = byte_tokenizer()
    batch = free_batch(tok)
    for row, mask, last in zip(batch["free"], batch["free_mask"] if batch["free_mask"] is not None
                               else [None] * 3, batch["free_last"]):
        text = tok.decode(row[: last + 1].tolist())
        assert "Answer in capitals" not in text and text.rstrip().endswith("assistant")
    assert "Answer in capitals" in tok.decode(batch["idx"][0].tolist())
    check_prompt_kl(batch, "free_kl")


def test_grad_shares_equal_a_hand_computation():
    from ivft.dist import grad_shares
    tok = byte_tokenizer()
    model = tiny_model()
    batch = free_batch(tok)
    g = train.Guidance(ivs=torch.randn(1, 32, generator=torch.Generator().manual_seed(0)), layers=torch.tensor([1]),
                       train_iv=True, kl_iv=True, kl_weight=3.0, alpha=0.5, free_kl_weight=1.0)
    lm = train.LossModule(model, guidance=g)
    ref = tiny_model(seed=1)
    lm.reference = train.Reference(ref)
    params = [p for p in model.parameters() if p.requires_grad]
    shares = grad_shares(lm, batch, norms_of(batch), params)
    # by hand: each term's own backward, the gradient's norm over all trainable parameters
    def grad_norm(term):
        model.zero_grad(set_to_none=True)
        lm(batch, norms_of(batch), keep_graph=True)[1][term].backward()
        return torch.sqrt(sum((p.grad ** 2).sum() for p in params if p.grad is not None))
    ce = grad_norm("ce")
    assert set(shares) == {"kl", "free_kl"}
    for term in ("kl", "free_kl"):
        assert shares[term] == pytest.approx(float(grad_norm(term) / ce), rel=1e-4)
    model.zero_grad(set_to_none=True)
    state = torch.get_rng_state()
    grad_shares(lm, batch, norms_of(batch), params)
    assert torch.equal(torch.get_rng_state(), state) and all(p.grad is None for p in params)


def test_a_guided_run_records_its_terms_and_gradient_shares(env, tmp_path):
    res = run_main(base_args(env, tmp_path / "g", "--guided", "--free_kl_weight", "0.5", *iv_args(env)))
    assert [t["task"] for t in res["training"]] == ["a", "b"]
    for t in res["training"]:
        assert set(t["terms"]) == {"ce", "kl", "free_kl"} and set(t["grad_share"]) == {"kl", "free_kl"}
        assert t["log_steps"] == 2 and all(v > 0 for v in t["grad_share"].values())
    steps = [line for line in (tmp_path / "g" / "log.txt").read_text().splitlines() if "| step" in line]
    assert all("| grad share kl " in line and " free_kl " in line for line in steps)



def naive_state_norms(model, tok, task, n=32) -> list[float]:
    """The residual stream after each block at the last prompt token, one unpadded prompt at a time,
    read by forward hooks on the blocks (not through the Intervention that ivprompts.state_norms uses)."""
    from ivft.prompts import render_prompt
    seen = {}
    hooks = [blk.register_forward_hook(lambda m, i, out, l=l: seen.__setitem__(l, out[0] if isinstance(out, tuple)
                                                                                else out))
             for l, blk in enumerate(model.model.layers)]
    sums = torch.zeros(len(hooks))
    try:
        for ex in list(task.train)[:n]:
            with torch.no_grad():
                model(torch.tensor([render_prompt(tok, ex)]))
            sums += torch.stack([seen[l][0, -1].norm() for l in range(len(hooks))])
    finally:
        for h in hooks:
            h.remove()
    return (sums / min(n, len(task.train))).tolist()


def test_scaled_iv_has_the_asked_norm_the_same_in_model_and_reference(env, tmp_path):
    import extract_iv
    from ivft.tasks import load_task
    model, tok = load_model(env["model"])
    task = load_task(env["tasks"].split(",")[0])
    want = naive_state_norms(model, tok, task)
    # an --iv_file without stored norms gets them measured; a fresh extraction stores them in its file
    got = extract_iv.training_ivs(model, tok, [task], iv_dir=tmp_path, model_id="tiny", layer=2, norm_ratio=0.5,
                                  files={"a": env["ivs"]["a"]})["a"]
    assert got[0].norm().item() == pytest.approx(0.5 * want[2], rel=1e-4)
    assert got[2]["state_norms"] == pytest.approx(want, rel=1e-4)
    fresh = extract_iv.get_iv(model, tok, task, tmp_path / "iv.safetensors", n_clean=4, n_corrupt=4, top_k=2,
                              layer=1, progress=False)
    from ivft.ivfile import read_iv
    assert read_iv(tmp_path / "iv.safetensors")["meta"]["state_norms"] == pytest.approx(want, rel=1e-4)
    assert fresh["iv"].norm() != pytest.approx(0.5 * want[1], rel=1e-2)       # extraction itself is unscaled
    # the run: the trained model (α_0 = 1, first step) and the reference add one and the same vector
    added = {"model": [], "ref": []}
    run_main(base_args(env, tmp_path / "run", "--guided", "--iv_norm_ratio", "0.5", "--max_steps", "1",
                       *iv_args(env)), callback=None)
    log = (tmp_path / "run" / "log.txt").read_text()
    norm_a = float(log.split("IV a: layer ")[1].split("norm ")[1].split()[0])
    assert norm_a == pytest.approx(0.5 * want[int(log.split("IV a: layer ")[1].split(",")[0])], abs=6e-4)  # 3 decimals
    lm = train.LossModule(model, guidance=train.Guidance(
        ivs=got[0][None].repeat(2, 1), layers=torch.tensor([2, 2]), alpha=1.0, train_iv=True, kl_iv=True,
        kl_weight=1.0))
    ref = ckpt.frozen_copy(model)
    lm.reference = train.Reference(ref)
    for who, m in (("model", model), ("ref", ref)):
        forward = m.forward
        m.forward = lambda *a, who=who, forward=forward, **k: (added[who].append(k["intervention"].add_resid[2]
                                                                               * k["intervention"].scale),
                                                               forward(*a, **k))[1]
    lm(guided_batch(tok), norms_of(guided_batch(tok)))
    assert torch.equal(added["model"][0], added["ref"][0])
    assert added["model"][0][0].norm().item() == pytest.approx(0.5 * want[2], rel=1e-4)


# ---- a fork's term that needs the reference, without the KL ---------------------------------------

def reference_fork(declared: bool, seen: list):
    """A fork as a researcher writes it: a new term, the MSE between the final hidden states of the
    trained model and of the frozen reference, weight 1, its weight declared with metadata=REF (or,
    the mistake, not declared)."""
    from dataclasses import dataclass, field

    @dataclass
    class ForkGuidance(train.Guidance):
        hidden_mse_weight: float = field(default=1.0, metadata=train.REF if declared else {})

    class ForkLoss(train.LossModule):
        def loss(self, batch, norms, keep_graph=False):
            total, parts = super().loss(batch, norms, keep_graph=True)
            h = self.model(batch["idx"], pad_mask=batch["pad_mask"], return_hidden=True)
            with self.frozen() as ref:
                ref_h = ref(batch["idx"], pad_mask=batch["pad_mask"], return_hidden=True)
            parts["hidden_mse"] = self.guidance.hidden_mse_weight * (h - ref_h).pow(2).mean()
            seen.append(float(parts["hidden_mse"].detach()))
            return total + parts["hidden_mse"] * self.world, parts if keep_graph else \
                {k: v.detach() for k, v in parts.items()}
    return ForkGuidance, ForkLoss


def test_a_term_that_needs_the_reference_gets_the_frozen_original_without_a_kl(env, tmp_path, monkeypatch, capsys):
    # plain training (--kl_weight 0): before, no reference was made and the term got the trained model
    # itself, so it read 0 at every step, silently; now the declared term gets the frozen original
    seen = []
    guidance, loss = reference_fork(True, seen)
    monkeypatch.setattr(train, "Guidance", guidance)
    monkeypatch.setattr(train, "LossModule", loss)
    res = run_main(base_args(env, tmp_path / "fork", "--max_steps", "3"))
    assert res["config"]["kl_weight"] == 0 and all("hidden_mse" in t["terms"] for t in res["training"])
    assert seen[0] == 0.0                 # the first forward: the model is still the original
    assert seen[-1] > 1e-6                # after 5 updates it is not: the reference stayed the original
    # the same fork that forgets to declare its need is refused in one line, never given the trained model
    monkeypatch.setattr(train, "Guidance", reference_fork(False, [])[0])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(base_args(env, tmp_path / "undeclared", "--max_steps", "3"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: ") and "metadata=REF" in err[-1], err[-3:]


def test_chat_template_flag_replaces_the_checkpoints_own(env, tmp_path, capsys):
    # --chat_template FILE: the user's jinja renders every prompt; a broken one is one line, nothing written
    (tmp_path / "qa.jinja").write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                                       "{% if add_generation_prompt %}[assistant] {% endif %}")
    model, tok = load_model(env["model"], chat_template=tmp_path / "qa.jinja")
    assert tok.decode(tok.chat_prompt("hi")).endswith("[user] hi\n[assistant] ")
    res = run_main(base_args(env, tmp_path / "run", "--max_steps", "1", "--chat_template", str(tmp_path / "qa.jinja")))
    assert res["config"]["chat_template"] == str(tmp_path / "qa.jinja")
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
    msg = expect_exit(base_args(env, tmp_path / "bad", "--chat_template", str(tmp_path / "bad.jinja")), capsys)
    assert "bad.jinja" in msg and "does not parse" in msg and not (tmp_path / "bad").exists()
