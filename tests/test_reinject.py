"""Tests of experiments/reinject.py: the recovered shares against hand computations (scores faked),
the controls' vectors (norm, seed, direction, layer), the noise rule, one real run through evaluate.py
on closed-form bigram toys whose greedy replies are known (so the honest and the old share differ by a
known amount, and a zero IV changes nothing), and the CLI's one-line error on a missing checkpoint."""
import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import evaluate as E
from ivft.tasks import Example, Task
from toys import TOK, bigram_model, tid, tiny_model

ROOT = Path(__file__).resolve().parents[1]
# experiments/ is on the tests' path (pyproject.toml), where reinject.py finds its sibling study.py
spec = importlib.util.spec_from_file_location("reinject", ROOT / "experiments" / "reinject.py")
R = importlib.util.module_from_spec(spec)
spec.loader.exec_module(R)


def task(name, outputs=("dry", "wet", "dry", "wet"), metric="reply_contains"):
    ex = [Example("Say the opposite.", f"w{i}", out) for i, out in enumerate(outputs)]
    return Task(name=name, kind="generate", metric=metric, train=ex, test=ex)


def cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def fake_scorer(original, ivs, table, calls):
    """A stand-in for reinject.task_score: the score of table[task][variant], the variant read off
    the model and the vector it is given (the task's IV exactly, another task's direction, or else
    the random control); every call is recorded in `calls` as (task, variant, layer, vector)."""
    def score(model, tok, t, n, add=None, **kw):
        variant = "original" if model is original else "final"
        layer, vec = add if add is not None else (None, None)
        if add is not None:
            own = ivs[t.name][0]
            others = [x for x in ivs if x != t.name and abs(cos(vec, ivs[x][0])) > 1 - 1e-6]
            variant += "_iv" if torch.equal(vec, own) else "_other_iv" if others else "_random"
        calls.append((t.name, variant, layer, vec))
        return table[t.name][variant], 50
    return score


TABLE = {"a": {"original": 0.8, "original_iv": 0.9, "final": 0.4, "final_iv": 0.7, "final_random": 0.45,
               "final_other_iv": 0.5},
         "b": {"original": 0.5, "original_iv": 0.52, "final": 0.46, "final_iv": 0.5, "final_random": 0.46,
               "final_other_iv": 0.44}}


@pytest.fixture
def faked(monkeypatch):
    orig, final = tiny_model(seed=0), tiny_model(seed=1)
    g = torch.Generator().manual_seed(3)
    ivs = {"a": (torch.randn(32, generator=g), 0), "b": (5 * torch.randn(32, generator=g), 1)}
    calls = []
    monkeypatch.setattr(R, "task_score", fake_scorer(orig, ivs, TABLE, calls))
    return orig, final, ivs, calls


def test_recovery_arithmetic_by_hand(faked):
    orig, final, ivs, calls = faked
    res = R.reinjection(orig, final, TOK, [task("a"), task("b")], ivs, n=50)
    a, b = res["tasks"]["a"], res["tasks"]["b"]
    assert {k: a[k] for k in R.SCORES} == TABLE["a"] and a["n"] == 50 and a["layer"] == 0
    assert a["iv_norm"] == pytest.approx(float(ivs["a"][0].norm()))
    # a: loss 0.8 - 0.4 = 0.4 > 2 sqrt(0.8 * 0.2 / 50) = 0.113; against original + IV 0.5 > 0.085
    assert a["margin_vs_original"] == pytest.approx(2 * math.sqrt(0.16 / 50))
    assert a["margin_vs_original_iv"] == pytest.approx(2 * math.sqrt(0.09 / 50))
    assert a["recovery_vs_original"] == pytest.approx(0.3 / 0.4)        # the old, overstated number
    assert a["recovery_vs_original_iv"] == pytest.approx(0.3 / 0.5)     # the honest one
    assert a["recovery_random"] == pytest.approx(0.05 / 0.5)
    assert a["recovery_other_iv"] == pytest.approx(0.1 / 0.5)
    assert not a["within_noise_vs_original"] and not a["within_noise_vs_original_iv"]
    # b: gaps 0.04 and 0.06, both under 2 standard errors (0.141): no share, flagged as noise
    assert all(b[k] is None for k in R.RECOVERIES)
    assert b["within_noise_vs_original"] and b["within_noise_vs_original_iv"]
    m = res["mean"]
    assert m["original"] == pytest.approx(0.65) and m["final_other_iv"] == pytest.approx(0.47)
    assert m["recovery_vs_original_iv"] == pytest.approx(0.6) and m["recovery_random"] == pytest.approx(0.1)
    assert m["tasks_defined"] == {k: 1 for k in R.RECOVERIES}
    # six scorings per task; the IVs go in at their own layer
    assert sorted(v for t, v, _, _ in calls if t == "a") == sorted(R.SCORES)
    assert {(t, layer) for t, _, layer, _ in calls if layer is not None} == {("a", 0), ("b", 1)}
    json.dumps(res)                                                      # the report is plain JSON


def test_within_noise_and_an_explicit_margin(faked):
    orig, final, ivs, _ = faked
    res = R.reinjection(orig, final, TOK, [task("a"), task("b")], ivs, n=50, margin=0.01)
    b = res["tasks"]["b"]
    assert b["recovery_vs_original"] == pytest.approx(0.04 / 0.04)
    assert b["recovery_vs_original_iv"] == pytest.approx(0.04 / 0.06)
    assert b["recovery_other_iv"] == pytest.approx(-0.02 / 0.06)
    # a gap that only equals the margin is noise; so is a final model that is better
    row = {"original": 0.5, "original_iv": 0.125, "final": 0.25, "final_iv": 0.375}   # exact in binary
    assert R.share(row, "final_iv", "original", 0.25) is None
    assert R.share(row, "final_iv", "original", 0.249) == 0.5
    assert R.share(row, "final_iv", "original_iv", 0.0) is None
    assert R.noise_margin(0.5, 100) == pytest.approx(0.1) and R.noise_margin(1.0, 10) == 0.0


def test_random_control_has_the_ivs_norm_and_is_fixed_by_seed_and_task(faked):
    orig, final, ivs, calls = faked
    iv = ivs["b"][0]
    r = R.random_like(iv, 0, "b")
    assert r.dtype == iv.dtype and float(r.norm()) == pytest.approx(float(iv.norm()), rel=1e-6)
    torch.manual_seed(123)                                   # the global RNG plays no part
    assert torch.equal(r, R.random_like(iv, 0, "b"))
    assert not torch.allclose(r, R.random_like(iv, 0, "a"))
    assert not torch.allclose(r, R.random_like(iv, 1, "b"))
    assert abs(cos(r, iv)) < 0.9                             # a direction of its own, not the IV's
    assert R.task_seed(0, "b") == R.task_seed(0, "b") != R.task_seed(0, "a")
    R.reinjection(orig, final, TOK, [task("a"), task("b")], ivs, n=50, seed=0)
    used = {t: v for t, variant, _, v in calls if variant == "final_random"}
    assert torch.equal(used["b"], r) and torch.equal(used["a"], R.random_like(ivs["a"][0], 0, "a"))


def test_other_task_control_is_anothers_direction_at_this_norm_and_layer(faked, monkeypatch):
    orig, final, ivs, calls = faked
    ivs["c"] = (torch.linspace(-1, 2, 32), 1)
    tasks = [task("a"), task("b"), task("c")]
    assert R.other_tasks(["a", "b", "c"], None) == {"a": "b", "b": "c", "c": "a"}
    assert R.other_tasks(["a"], None) == {"a": None}
    with pytest.raises(ValueError, match="another task"):
        R.other_tasks(["a", "b"], {"a": "a"})
    table = {**TABLE, "c": TABLE["a"]}
    monkeypatch.setattr(R, "task_score", fake_scorer(orig, ivs, table, calls))
    res = R.reinjection(orig, final, TOK, tasks, ivs, n=50, other={"a": "c"})
    assert [res["tasks"][t]["other_task"] for t in "abc"] == ["c", "c", "a"]
    used = {t: (layer, v) for t, variant, layer, v in calls if variant == "final_other_iv"}
    for t, o in (("a", "c"), ("b", "c"), ("c", "a")):
        layer, v = used[t]
        assert layer == ivs[t][1]                            # this task's layer, not the other's
        assert cos(v, ivs[o][0]) == pytest.approx(1.0, abs=1e-6)
        assert float(v.norm()) == pytest.approx(float(ivs[t][0].norm()), rel=1e-6)


# ---- the real path, on bigram toys whose replies are known -------------------------------------

# After the generation prompt ("assistant\n") the final model replies "cold. xxxx..." and the original
# "dry"; the IV adds 3 e_9 at the last prompt token, and "9" leads both to "wet", after which the
# original goes on " dry" (its t -> " " -> d). So with golds dry, wet, dry, wet... (reply_contains):
# original 0.5, original + IV ("wet dry") 1.0, final 0, final + IV ("wet") 0.5.
WET = {("9", "w"): 10, ("w", "e"): 10, ("e", "t"): 10}
FINAL = {("\n", "c"): 10, ("c", "o"): 10, ("o", "l"): 10, ("l", "d"): 10, ("d", "."): 10, (".", " "): 10,
         (" ", "x"): 10, ("x", "x"): 10, ("t", "E"): 10, **WET}
ORIGINAL = {("\n", "d"): 10, ("d", "r"): 10, ("r", "y"): 10, ("y", "E"): 10, ("t", " "): 10, (" ", "d"): 10,
            **WET}


def test_real_path_known_scores_and_a_zero_iv_changes_nothing(monkeypatch):
    (orig, _), (final, _) = bigram_model(ORIGINAL), bigram_model(FINAL)
    iv = torch.zeros(orig.config.hidden_size)
    iv[tid("9")] = 3.0
    ivs = {"gen": (iv, 0), "zero": (torch.zeros_like(iv), 0)}
    edits = []
    real_suite = E.evaluate_suite

    def spy(model, tok, tasks, **kw):
        edits.append((tasks[0].name, model, kw.get("intervention")))
        return real_suite(model, tok, tasks, **kw)
    monkeypatch.setattr(E, "evaluate_suite", spy)
    gen, zero = task("gen", ("dry", "wet") * 4), task("zero", ("dry", "cold", "wet", "wet"))
    res = R.reinjection(orig, final, TOK, [gen, zero], ivs, n=8, batch_size=4)
    g, z = res["tasks"]["gen"], res["tasks"]["zero"]
    assert (g["original"], g["original_iv"], g["final"], g["final_iv"]) == (0.5, 1.0, 0.0, 0.5)
    assert g["recovery_vs_original"] == 1.0 and g["recovery_vs_original_iv"] == 0.5   # overstated x2
    assert g["final_other_iv"] == 0.0 and g["recovery_other_iv"] == 0.0   # the zero task's direction
    # evaluate.py's own score of the task, without any IV
    assert g["final"] == E.evaluate_task(final, TOK, gen, n=8, metrics=("reply_contains",),
                                         progress=False)["reply_contains"]
    # a zero IV (and its zero-norm controls) leave every score exactly as it was ...
    assert (z["original_iv"], z["final_iv"], z["final_random"], z["final_other_iv"]) == \
        (z["original"], z["final"], z["final"], z["final"]) == (0.25, 0.25, 0.25, 0.25)
    assert z["iv_norm"] == 0.0 and all(z[k] is None for k in R.RECOVERIES)
    # ... though the edit was passed to evaluate: at the IV's layer, as the zero vector
    zero_edits = [e for name, _, e in edits if name == "zero" and e is not None]
    assert len(zero_edits) == 4
    assert all(set(e.add_resid) == {0} and not e.add_resid[0].any() for e in zero_edits)
    # the same kind of edit with the nonzero IV moves the last token's logits, and only those
    gen_edit = next(e for name, m, e in edits if name == "gen" and m is final and e is not None
                    and torch.equal(e.add_resid[0], iv))
    assert gen_edit.pos is None and gen_edit.scale == 1.0 and set(gen_edit.add_resid) == {0}   # R.iv_edit
    idx = torch.tensor([TOK.render_chat([{"role": "user", "content": "w0"}])])
    last = torch.tensor([idx.shape[1] - 1])
    with torch.no_grad():
        plain = final(idx)
        moved = final(idx, intervention=dataclasses.replace(gen_edit, pos=last))
        same = final(idx, intervention=dataclasses.replace(zero_edits[0], pos=last))
    assert torch.equal(same, plain) and torch.equal(moved[0, :-1], plain[0, :-1])
    assert moved[0, -1].argmax() == tid("w") != plain[0, -1].argmax()


def test_bad_input_is_one_line_before_anything_is_loaded_or_written(tmp_path, monkeypatch, capsys):
    def no_load(*a, **k):
        raise AssertionError("loaded a model after bad input")
    monkeypatch.setattr(R, "load_model", no_load)
    out = tmp_path / "r.json"
    for bad in (tmp_path / "missing", tmp_path / "run"):
        (tmp_path / "run").mkdir(exist_ok=True)              # a run folder without a checkpoint
        assert R.main(["--final", str(bad), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(bad) in err and err.startswith("reinject.py: error:")
    assert not out.exists()
    with pytest.raises(ValueError, match="architectures"):
        R.reinjection(tiny_model(), tiny_model(layers=3), TOK, [task("a")], {"a": (torch.ones(32), 0)}, n=2)
    with pytest.raises(ValueError, match="no IV"):
        R.reinjection(tiny_model(), tiny_model(1), TOK, [task("a")], {}, n=2)


def test_cli_writes_the_report(tmp_path, monkeypatch):
    """main() wired to toys: the loader, the suite and the IVs replaced; the JSON lands at --out."""
    from ivft import tasks as T
    (orig, _), (final, _) = bigram_model(ORIGINAL), bigram_model(FINAL)
    ckpt = tmp_path / "stage-1"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    iv = torch.zeros(orig.config.hidden_size)
    iv[tid("9")] = 3.0
    monkeypatch.setattr(R, "load_model", lambda path=None, **k: (orig if path is None else final, TOK))
    monkeypatch.setattr(T, "general_suite", lambda: ["gen"])
    monkeypatch.setattr(T, "load_task", lambda name, *a, **k: task(name, ("dry", "wet") * 4))
    monkeypatch.setattr(R.X, "get_iv", lambda *a, **k: {"iv": iv, "layer": 0})
    out = tmp_path / "sub" / "r.json"
    assert R.main(["--final", str(ckpt), "--out", str(out), "--n", "8"]) == 0
    rep = json.loads(out.read_text())
    assert rep["tasks"]["gen"]["recovery_vs_original_iv"] == 0.5 and rep["tasks"]["gen"]["other_task"] is None
    assert rep["settings"]["final"] == str(ckpt) and rep["settings"]["dtype"] == "float32"
