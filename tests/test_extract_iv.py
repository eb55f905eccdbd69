"""Tests for extract_iv.py: the fast exact AIE against Todd's full-forward loop, attribution against
a finite difference, a hand-built model whose one instruction head must rank first, the IV's
construction, the sweep's fast path, extraction, caching, the command line and bad input. Tiny
models only; runs in seconds. The settings, prompts, files and check have test files of their own."""
import importlib.util
import json

import pytest
import torch

import extract_iv as X
from toys import SMALL, TOK, char_model, llama_tiny, standin_task
from ivft.ivcheck import check_iv, choose_kind, dev_advice
from ivft.ivfile import iv_filename, load_iv, task_fingerprint
from ivft.ivprompts import Prompt, load_task_by_name, score_prompts
from ivft.errors import ExtractError
from ivft.ivsettings import Settings, default_layer, default_top_k
from model import Intervention, ModelConfig, Transformer
from ivft.tasks import Example, Task


# ---- tiny models ------------------------------------------------------------------------------------

def gpt2_tiny(seed=0, vocab=64):
    # learned positions, LayerNorm, biases everywhere: the other code path of the model
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, max_position_embeddings=64, attention_bias=True,
                      tie_word_embeddings=True, norm="layernorm", position="learned", mlp="gelu", bias=True)
    m = Transformer(cfg).init_weights(std=0.3)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))     # non-zero biases, so a bias leak would show
    return m.eval()


def random_prompts(n, vocab=64, answer_len=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [Prompt(torch.randint(0, vocab, (5 + 3 * i,), generator=g).tolist(),
                   torch.randint(0, vocab, (answer_len,), generator=g).tolist(), "") for i in range(n)]


# ---- the fast exact AIE is Todd's loop, to the float ----------------------------------------------

@pytest.mark.parametrize("family", ["llama_gqa", "gpt2"])
@pytest.mark.parametrize("effect", ["prob", "logprob"])
def test_exact_equals_naive(family, effect):
    model = llama_tiny() if family == "llama_gqa" else gpt2_tiny()
    L, H, D = model.n_layers, model.config.num_attention_heads, model.config.head_dim
    prompts = random_prompts(2)
    z_mean = torch.randn(L, H, D, generator=torch.Generator().manual_seed(2))
    naive = X.aie_naive(model, prompts, z_mean, effect=effect, progress=False)
    fast = X.aie_exact(model, prompts, z_mean, effect=effect, progress=False)
    chunked = X.aie_exact(model, prompts, z_mean, effect=effect, max_rows=5, progress=False)
    assert naive.abs().max() > 1e-3, "the test model's heads should matter"
    for got in (fast, chunked):
        diff = (got - naive).abs().max().item()
        assert diff <= 1e-5, f"max |fast - naive| = {diff:.2e} (mean {(got - naive).abs().mean():.2e})"


def test_attribution_is_the_first_order_term():
    # Patching z̄_eps = z ± eps (z̄ - z) exactly, the central difference quotient tends to the
    # attribution estimate dM/dz · (z̄ - z). (fp64 model; RMSNorm still runs in fp32, hence eps 1e-3.)
    model = llama_tiny(dtype=torch.float64)
    L, H, D = model.n_layers, model.config.num_attention_heads, model.config.head_dim
    p = random_prompts(1)[0]
    z_mean = torch.randn(L, H, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    z = X._corrupted_state(model, p, "prob")["z"]
    eps = 1e-3
    plus, minus = (X.aie_exact(model, [p], z + e * (z_mean - z), progress=False).double() for e in (eps, -eps))
    quotient = (plus - minus) / (2 * eps)
    attr = X.aie_attribution(model, [p], z_mean, progress=False).double()
    assert quotient.abs().max() > 1e-4, "the test model's heads should matter"
    torch.testing.assert_close(attr, quotient, atol=1e-3 * quotient.abs().max().item(), rtol=1e-2)


# ---- a planted instruction head ---------------------------------------------------------------------
# Tokens: 0 = bos, 1 = INSTR, 2..9 words, 10 = the answer A. Head 2 of layer 1 attends to INSTR from
# any position (query from a constant embedding dimension, key only on INSTR) and copies a value that
# only INSTR has; its o_proj slice writes that into the residual dimension that lm_head reads as A.
# With INSTR in the prompt P(A) is high; without it the head's z is 0 and A is one token among 16.
INSTR, ANSWER, PLANT = 1, 10, (1, 2)


def planted_model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, hidden_size=24, intermediate_size=16, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=4, rope_theta=1e6)
    m = Transformer(cfg).init_weights(std=0.02)
    const, D = 23, 4
    (l, h), g = PLANT, PLANT[1] // 2          # GQA: query heads 2 and 3 share kv head 1
    att = m.model.layers[l].self_attn
    with torch.no_grad():
        m.model.embed_tokens.weight.copy_(torch.eye(16, 24))
        m.model.embed_tokens.weight[:, const] = 1.0           # every token: a constant direction
        m.lm_head.weight.copy_(torch.eye(16, 24))             # logit of t = normalised residual[t]
        att.q_proj.weight[h * D:(h + 1) * D] = 0
        # head dim 1 pairs with dim 3 at RoPE frequency theta^(-1/2) = 1e-3 rad/position: the score
        # barely depends on distance, so the head finds INSTR wherever it is
        att.q_proj.weight[h * D + 1, const] = 20.0
        att.k_proj.weight[g * D:(g + 1) * D] = 0
        att.k_proj.weight[g * D + 1, INSTR] = 1.0
        att.v_proj.weight[g * D:(g + 1) * D] = 0
        att.v_proj.weight[g * D + 0, INSTR] = 1.0
        att.o_proj.weight[:, h * D:(h + 1) * D] = 0
        att.o_proj.weight[ANSWER, h * D + 0] = 4.0
    return m.eval()


def planted_prompts():
    words = range(2, 10)
    clean = [Prompt([0, INSTR, w], [ANSWER], "") for w in words] + \
            [Prompt([0, w, INSTR, 11 - w], [ANSWER], "") for w in words]
    corrupt = [Prompt([0, w], [ANSWER], "") for w in words] + [Prompt([0, w, 11 - w], [ANSWER], "") for w in words]
    return clean, corrupt


@pytest.mark.parametrize("method", ["exact", "attribution"])
def test_planted_head_ranks_first(method):
    model = planted_model()
    clean, corrupt = planted_prompts()
    sc_clean = score_prompts(model, clean, record_z=True)
    sc_corrupt = score_prompts(model, corrupt)
    assert sc_clean["p_first"].mean() > 0.5 > 0.2 > sc_corrupt["p_first"].mean(), "the circuit is not planted"
    z_mean = sc_clean["z"].mean(0)
    fn = X.aie_exact if method == "exact" else X.aie_attribution
    aie = fn(model, corrupt, z_mean, progress=False)
    ranked = X.top_heads(aie, 3)
    assert ranked[0] == PLANT, f"ranking {ranked}, AIE\n{aie}"
    second = aie.flatten().sort(descending=True).values[1]
    assert aie[PLANT] > 10 * max(second.item(), 1e-4)
    # the IV from that head alone restores the answer on corrupted prompts
    iv = X.build_iv(model, z_mean, [PLANT])
    restored = score_prompts(model, corrupt, add=(PLANT[0], iv))
    assert restored["p_first"].mean() > 0.5


# ---- the IV ---------------------------------------------------------------------------------------

def test_build_iv_is_heads_through_w_o_without_bias():
    model = gpt2_tiny()
    L, H, D = model.n_layers, model.config.num_attention_heads, model.config.head_dim
    z_mean = torch.randn(L, H, D)
    heads = [(2, 1), (0, 3)]
    iv = X.build_iv(model, z_mean, heads)
    want = sum(model.model.layers[l].self_attn.o_proj.weight[:, h * D:(h + 1) * D] @ z_mean[l, h]
               for l, h in heads)
    torch.testing.assert_close(iv, want.detach())


def test_top_heads_best_first():
    aie = torch.tensor([[0.1, 0.5], [0.3, -1.0]])
    assert X.top_heads(aie, 2) == [(0, 1), (1, 0)]


# ---- the pipeline and caching -----------------------------------------------------------------------

def test_extract_is_deterministic():
    model, task = char_model(), standin_task()
    a = X.extract_iv(model, TOK, task, progress=False, seed=3, model_id="tiny", **SMALL)
    b = X.extract_iv(model, TOK, task, progress=False, seed=3, model_id="tiny", **SMALL)
    assert torch.equal(a["iv"], b["iv"]) and torch.equal(a["aie"], b["aie"]) and a["heads"] == b["heads"]
    L, H = model.n_layers, model.config.num_attention_heads
    assert a["aie"].shape == (L, H) and a["iv"].shape == (model.config.hidden_size,)
    assert len(a["heads"]) == default_top_k(L * H) and a["layer"] == default_layer(L)
    m = a["meta"]
    assert (m["task"], m["model"], m["n_clean"], m["n_corrupt"]) == ("opp", "tiny", 4, 4)
    json.dumps(m)   # the metadata must be plain JSON


def test_get_iv_caches_on_weights_and_settings(tmp_path, monkeypatch):
    model, task = char_model(), standin_task()
    monkeypatch.setattr(X, "load_task_by_name", lambda name: task)
    path = tmp_path / "opp.safetensors"
    first = X.get_iv(model, TOK, "opp", path, progress=False, **SMALL)
    calls = []
    real = X.extract_iv
    monkeypatch.setattr(X, "extract_iv", lambda *a, **k: calls.append(k) or real(*a, **k))
    again = X.get_iv(model, TOK, "opp", path, progress=False, **{**SMALL, "batch_size": 2})
    assert calls == [] and torch.equal(again["iv"], first["iv"])      # batch size: not part of the key
    X.get_iv(model, TOK, "opp", path, progress=False, **{**SMALL, "seed": 1})
    assert len(calls) == 1                                             # other settings: re-extracted
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.01)           # "fine-tuned" weights
    X.get_iv(model, TOK, "opp", path, progress=False, **{**SMALL, "seed": 1})
    assert len(calls) == 2
    load_iv(path, model)      # load_iv itself accepts changed weights of the same architecture


def test_universal_shares_heads():
    model = char_model()
    t1, t2 = standin_task("a"), standin_task("b", "Give the antonym.")
    res = X.extract_universal(model, TOK, [t1, t2], progress=False, **SMALL)
    assert res["a"]["heads"] == res["b"]["heads"]
    torch.testing.assert_close(res["a"]["aie"], (res["a"]["aie_task"] + res["b"]["aie_task"]) / 2)
    assert not torch.equal(res["a"]["iv"], res["b"]["iv"])
    assert res["a"]["meta"]["universal"] == ["a", "b"]


# ---- bad input --------------------------------------------------------------------------------------

def test_bad_settings_fail_clearly():
    # Settings' own checks: tests/test_ivsettings.py
    model, task = char_model(), standin_task()
    with pytest.raises(ExtractError, match="layer 4 is out of range"):
        X.extract_iv(model, TOK, task, layer=4, progress=False, **SMALL)
    tiny = Task(name="tiny", kind="generate", metric="exact_match", train=task.train[:2], test=[])
    with pytest.raises(ExtractError, match="too few"):
        X.extract_iv(model, TOK, tiny, progress=False, **SMALL)


def big_task(name="up3"):
    # 60 three-letter words -> upper case: enough training examples for a dev split of 12
    words = ["".join(c) for c in zip("abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefgh",
                                     "defghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijk",
                                     "mnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrst")]
    ex = [Example(instruction="Write it in capitals.", input=w, output=w.upper()) for w in words]
    return Task(name=name, kind="train", metric="exact_match", train=ex[:48], test=ex[48:])


def test_cli(tmp_path, monkeypatch, capsys):
    # unknown task and bad numbers: exit 2, one line, before any model is loaded
    assert X.main(["--task", "no_such_task_xyz"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown task 'no_such_task_xyz'" in err and len(err.splitlines()) == 1
    assert X.main(["--task", "antonym", "--n_clean", "1"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    # the rest with a tiny model in place of the embedded one
    monkeypatch.setattr(X, "load_model", lambda *a, **k: (char_model(), TOK))
    monkeypatch.setattr(X, "load_task_by_name", lambda name: big_task(name))
    assert X.main(["--task", "up3", "--layer", "9", "--quiet"]) == 2
    assert "layer 9 is out of range" in capsys.readouterr().err
    out, report = tmp_path / "up3.safetensors", tmp_path / "rep" / "check.json"
    assert X.main(["--task", "up3", "--out", str(out), "--n_clean", "4", "--n_corrupt", "4", "--shots", "2",
                   "--check", "--n_check", "4", "--sweep", "--report", str(report), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "query alone + IV" in printed and "heads (" in printed and "best:" in printed
    assert "chat, 0-shot + IV" in printed          # the form train.py adds the IV to
    # a random model does not capitalise even in context: the check says so, in one line
    said = [line for line in printed.splitlines() if line.startswith("advice:")]
    assert len(said) == 1 and "no vector can carry what the model cannot do" in said[0]
    if importlib.util.find_spec("matplotlib") is not None:
        assert out.with_suffix(".sweep.png").is_file()
    rep = json.loads(report.read_text())
    for key in ("task", "layer", "heads", "clean_accuracy", "corrupted_accuracy", "iv_accuracy", "accuracy_gain",
                "restored_accuracy", "restored_logprob", "n"):
        assert key in rep, key
    assert rep["task"] == "up3" and rep["n"] == 4 and rep["layer"] == default_layer(4)
    assert rep["accuracy_gain"] == pytest.approx(rep["iv_accuracy"] - rep["corrupted_accuracy"])
    assert {"chat_logprob", "chat_iv_logprob", "chat_iv_contains"} <= set(rep)
    assert rep["advice"] == said and "sweep" in rep
    # layer auto: the sweep's choice is the IV's layer and K
    assert X.main(["--task", "up3", "--out", str(out), "--n_clean", "4", "--n_corrupt", "4", "--shots", "2",
                   "--layer", "auto", "--quiet"]) == 0
    _, layer, meta = load_iv(out, char_model())
    assert meta["chosen_by_sweep"]["layer"] == layer and meta["settings"]["layer"] == "auto"
    assert meta["top_k"] in X.K_GRID


# ---- the sweep's fast path --------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama_gqa", "gpt2"])
def test_steered_logits_equal_full_forward(family):
    # the sweep's suffix-only recomputation = a full forward with the vector added after the block
    model = llama_tiny() if family == "llama_gqa" else gpt2_tiny()
    p = random_prompts(3)[2]
    st = X._corrupted_state(model, p, "logprob")
    L, C, T = model.n_layers, model.config.hidden_size, len(p.ids)
    layers = sorted([0, 0, 1, L - 2, L - 1, L - 1])
    vecs = torch.randn(len(layers), C, generator=torch.Generator().manual_seed(4))
    got = X._steered_logits(model, st, layers, vecs)
    idx = torch.tensor([p.ids + p.answer[:-1]])
    for n, (l, v) in enumerate(zip(layers, vecs)):
        want = model(idx, intervention=Intervention(pos=torch.tensor([T - 1]), add_resid={l: v}))[0, T - 1:]
        assert (want - model(idx)[0, T - 1:]).abs().max() > 1e-2, "the vector should change the logits"
        torch.testing.assert_close(got[n], want, atol=5e-5, rtol=1e-4)


# ---- the planted head under the default pipeline -----------------------------------------------------
# A tokenizer onto the planted model's 16 tokens: "!" is INSTR, letters a-h are words, " *" is the
# answer token. The default pipeline builds 10-shot "Q: !\nb\nA: *" prompts and query-only "Q: b\nA:".

class PlantTok:
    table = {"!": INSTR, **{c: 2 + i for i, c in enumerate("abcdefgh")}, "\n": 11, " ": 12, ":": 13,
             "Q": 14, "A": 15}
    special_tokens = {}
    bos_id = eos_id = 0
    chat_format = None         # no chat template: --check skips its chat-form rows

    def encode(self, text):
        ids, i = [], 0
        while i < len(text):
            if text.startswith(" *", i):
                ids.append(ANSWER)
                i += 2
            else:
                ids.append(self.table[text[i]])
                i += 1
        return ids

    def decode(self, ids):
        inv = {v: k for k, v in self.table.items()} | {ANSWER: " *"}
        return "".join(inv.get(i, "") for i in ids)

    def stop_ids(self):
        return {0}


def test_planted_head_ranks_first_under_the_defaults():
    ex = [Example(instruction="!", input=c, output="*") for c in "abcdefgh" * 4]
    task = Task(name="plant", kind="train", metric="exact_match", train=ex[:24], test=ex[24:])
    model, tok = planted_model(), PlantTok()
    s = Settings(n_clean=8, n_corrupt=8).resolve(model)
    med = X.mediation(model, tok, task, s, progress=False)
    assert med["effect"] == "prob" and med["info"]["clean_p_first"] > 0.5
    assert X.top_heads(med["aie"], 1)[0] == PLANT, med["aie"]
    r = X.extract_iv(model, tok, task, progress=False, n_clean=8, n_corrupt=8)
    assert r["heads"][0] == PLANT
    res = check_iv(model, tok, task, r["iv"], r["layer"], n=8, progress=False)
    assert res["corrupted"]["top1"] == 0 and res["iv"]["top1"] == 1 and res["restored_logprob"] > 0.5


# ---- task files ---------------------------------------------------------------------------------------

def fv_file(tmp_path):
    # a function-vector file (no instruction): the project's own pairs, lower -> upper case
    words = big_task().train + big_task().test
    path = tmp_path / "data" / "caps.json"
    path.parent.mkdir()
    path.write_text(json.dumps([{"input": e.input, "output": e.output} for e in words]))
    return path


def test_file_task_extract_check_and_reuse(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(X, "load_model", lambda *a, **k: (char_model(), TOK))
    path = fv_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ["--task", str(path), "--n_clean", "4", "--n_corrupt", "4", "--shots", "2", "--quiet"]
    assert X.main(args + ["--check", "--n_check", "4"]) == 0
    out = capsys.readouterr().out
    assert "restored share of the logprob gap" in out
    task = load_task_by_name(str(path))
    ivs = list((tmp_path / "ivs").rglob("*.safetensors"))
    assert [p.name for p in ivs] == [f"caps-{task_fingerprint(task)}.safetensors"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["caps.json"]      # nothing beside the data
    calls = []
    monkeypatch.setattr(X, "extract_iv", lambda *a, **k: calls.append(1))
    assert X.main(args + ["--reuse"]) == 0
    assert calls == [] and "(reused)" in capsys.readouterr().out
    # other data under the same name is a different cache file
    path.write_text(json.dumps([{"input": e.input, "output": e.output[::-1]} for e in big_task().train]))
    assert iv_filename(load_task_by_name(str(path))) != ivs[0].name


def test_identical_prompts_are_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(X, "load_model", lambda *a, **k: (char_model(), TOK))
    path = fv_file(tmp_path)
    assert X.main(["--task", str(path), "--shots", "0", "--n_clean", "4", "--n_corrupt", "4", "--quiet",
                   "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "identical" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


# ---- what the IV can carry: the check's advice on the planted toy -------------------------------------
# The planted model does the task in context (clean accuracy 1); its heads IV restores it all, while
# a residual-stream IV read after block 0, before the planted head has written anything, restores none.

def plant_task():
    ex = [Example(instruction="!", input=c, output="*") for c in "abcdefgh" * 4]
    return Task(name="plant", kind="train", metric="exact_match", train=ex[:24], test=ex[24:])


def plant_cli(tmp_path, monkeypatch, capsys, *flags):
    monkeypatch.setattr(X, "load_model", lambda *a, **k: (planted_model(), PlantTok()))
    monkeypatch.setattr(X, "load_task_by_name", lambda name: plant_task())
    out, report = tmp_path / "plant.safetensors", tmp_path / "check.json"
    assert X.main(["--task", "plant", "--out", str(out), "--n_clean", "8", "--n_corrupt", "8", "--check",
                   "--n_check", "8", "--report", str(report), "--quiet", *flags]) == 0
    printed = capsys.readouterr().out
    said = [line for line in printed.splitlines() if line.startswith("advice:")]
    return said, json.loads(report.read_text())


def test_check_gives_no_advice_where_the_iv_carries_the_task(tmp_path, monkeypatch, capsys):
    said, rep = plant_cli(tmp_path, monkeypatch, capsys)
    assert rep["clean_accuracy"] == 1 and rep["iv_accuracy"] == 1
    assert said == [] and rep["advice"] == [] and "sweep" not in rep      # no sweep run where none is needed


def test_check_says_what_restores_more_where_the_iv_restores_little(tmp_path, monkeypatch, capsys):
    said, rep = plant_cli(tmp_path, monkeypatch, capsys, "--kind", "resid", "--layer", "0")
    assert rep["clean_accuracy"] == 1 and rep["iv_accuracy"] == 0
    assert len(said) == 2 and "restores little although the clean prompts work" in said[0]
    assert "the IV's own setting (--kind resid --layer 0)" in said[1] and "rerun with" in said[1]
    assert {r["kind"] for r in rep["sweep"]["rows"]} == {"heads", "resid"}


# extract_iv's method, as extract_iv.py passes it to ivft.ivcheck's advice
METHOD = dict(sweep=X.sweep, best_row=X.best_row, k_grid=X.K_GRID, progress=False)


def test_layer_auto_takes_the_other_kind_where_it_restores_clearly_more():
    # a resid IV at block 0 standing in for a poor sweep choice: choose_kind sweeps both kinds and rebuilds
    model, tok, task = planted_model(), PlantTok(), plant_task()
    settings = dict(n_clean=8, n_corrupt=8, kind="resid", layer=0)
    s = Settings(**settings).resolve(model)
    r = X.extract_iv(model, tok, task, progress=False, **settings)
    r["meta"]["chosen_by_sweep"] = {"layer": 0, "top_k": r["meta"]["top_k"]}
    new, lines = choose_kind(model, tok, task, r, s, make_iv=X.make_iv, **METHOD)
    assert lines[-1].endswith("chosen (--layer auto)")
    assert new["layer"] != 0 or new["meta"]["kind"] != "resid"
    assert new["meta"]["chosen_by_sweep"]["instead_of"]["layer"] == 0
    res = check_iv(model, tok, task, new["iv"], new["layer"], n=8, progress=False, generate=False)
    assert res["iv"]["top1"] == 1
    assert choose_kind(model, tok, task, new, s, make_iv=X.make_iv, **METHOD) == (new, [])   # done once
    # measured on the dev split: nothing to say about the good IV; the poor one restores little, and
    # the sweep says what does better
    assert dev_advice(model, tok, task, new, s, **METHOD) == []
    said = dev_advice(model, tok, task, r, s, **METHOD)
    assert len(said) == 2 and "restores little" in said[0] and "--kind heads" in said[1]


def test_get_iv_with_layer_auto_chooses_the_kind_as_the_cli_does(tmp_path, monkeypatch, capsys):
    # get_iv (train.py's path) and extract_iv.py --layer auto end with the same IV: layer, K and kind
    # chosen on the dev split, marked done, so that choosing again changes nothing
    model, tok, task = planted_model(), PlantTok(), plant_task()
    settings = dict(n_clean=8, n_corrupt=8, kind="resid", layer="auto")
    r = X.get_iv(model, tok, task, tmp_path / "a.safetensors", model_id="SmolLM2-135M-Instruct", progress=False,
                 **settings)
    assert r["meta"]["chosen_by_sweep"]["kind"] == "resid" and r["meta"]["advice"] == []
    s = Settings(**settings).resolve(model)
    assert choose_kind(model, tok, task, r, s, make_iv=X.make_iv, **METHOD) == (r, [])
    monkeypatch.setattr(X, "load_model", lambda *a, **k: (planted_model(), PlantTok()))
    monkeypatch.setattr(X, "load_task_by_name", lambda name: plant_task())
    assert X.main(["--task", "plant", "--out", str(tmp_path / "b.safetensors"), "--n_clean", "8", "--n_corrupt",
                   "8", "--kind", "resid", "--layer", "auto", "--quiet"]) == 0
    capsys.readouterr()
    from ivft.ivfile import read_iv
    cli, api = read_iv(tmp_path / "b.safetensors"), read_iv(tmp_path / "a.safetensors")
    assert torch.equal(cli["iv"], api["iv"]) and cli["layer"] == api["layer"]
    drop = ("aie_seconds",)
    assert {k: v for k, v in cli["meta"].items() if k not in drop} == \
        {k: v for k, v in api["meta"].items() if k not in drop}


# ---- train.py --guided says what an IV can carry: the cheap verdict, stored with a fresh IV --------

def test_training_ivs_says_when_the_model_cannot_do_the_task(tmp_path, monkeypatch, capsys):
    # a random model does not capitalise even in context: said once per task, from the fresh
    # extraction and again from the cache, with no sweep run (that is extract_iv.py --check's job)
    def no_sweep(*a, **k):
        raise AssertionError("get_iv ran the sweep")
    monkeypatch.setattr(X, "sweep", no_sweep)
    model, task = char_model(), big_task()
    kw = dict(iv_dir=tmp_path, model_id="tiny", progress=False, n_clean=4, n_corrupt=4, shots=2)
    for _ in ("fresh", "reused"):
        X.training_ivs(model, TOK, [task], **kw)
        said = capsys.readouterr().out.splitlines()
        assert len(said) == 1 and said[0].startswith("IV of up3: advice: the model does not do this task "
                                                     "even in context (clean first-token accuracy on the dev split")
    meta = load_iv(tmp_path / "tiny" / iv_filename(task), model)[2]
    assert meta["advice"] == [said[0].removeprefix("IV of up3: ")]


def test_training_ivs_says_nothing_where_the_model_does_the_task(tmp_path, capsys):
    model, tok, task = planted_model(), PlantTok(), plant_task()
    got = X.training_ivs(model, tok, [task], iv_dir=tmp_path, model_id="plant", progress=False,
                         n_clean=8, n_corrupt=8)
    assert got["plant"][2]["advice"] == [] and capsys.readouterr().out == ""


def test_a_fresh_iv_that_restores_little_is_said_with_the_check_to_run(tmp_path, capsys):
    # the planted task done in context, but a resid IV read after block 0 carries none of it
    model, tok, task = planted_model(), PlantTok(), plant_task()
    r = X.get_iv(model, tok, task, tmp_path / "p.safetensors", progress=False, n_clean=8, n_corrupt=8,
                 kind="resid", layer=0)
    assert len(r["meta"]["advice"]) == 1 and "restores little" in r["meta"]["advice"][0]
    X.training_ivs(model, tok, [task], iv_dir=tmp_path, model_id="x", files={"plant": tmp_path / "p.safetensors"})
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 2 and said[0].startswith("IV of plant: advice: the IV restores little")
    assert said[1].startswith("IV of plant: `python extract_iv.py --task <its task file> --check`")

