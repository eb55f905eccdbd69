"""Tests for experiments/general_eval.py on tiny random models: per-item choice verdicts equal a naive
ranking and average to evaluate.py's choice_accuracy; every part runs end to end on the real data
files (a byte-level tokenizer, a few items); endpoints against a tuned model are paired and the base
against itself keeps everything; the CLI's one-line error."""
import pytest
import torch

import evaluate as E
import general_eval as G
from ivft.prompts import answer_ids, choice_candidates, render_prompt
from ivft.tasks import Example, Task
from toys import PAIRS, TOK, byte_tokenizer, naive_score, tiny_model


def opposite_task():
    ex = [Example("Say the opposite.", a, b) for a, b in PAIRS]
    return Task(name="opp", kind="general", metric="choice", train=ex, test=ex)


def test_choice_verdicts_are_a_naive_ranking_and_average_to_evaluate():
    task = opposite_task()
    for seed in range(3):
        model = tiny_model(seed)
        items, chance = G.choice_verdicts(model, TOK, task, batch_size=4)
        want = []
        for i, ex in enumerate(task.test):
            prompt = render_prompt(TOK, ex)
            cands = choice_candidates(task, ex, i, 0)
            s = {c: naive_score(model, prompt, answer_ids(TOK, c)) for c in cands}
            gold = ex.output
            want.append(float(all(s[gold] > v for c, v in s.items() if c != gold)))
        assert items == want
        assert sum(items) / len(items) == pytest.approx(
            E.evaluate_task(model, TOK, task, metrics=("choice_accuracy",), progress=False)["choice_accuracy"])
        assert chance == [0.1] * len(PAIRS)            # gold + 9 distractors (prompts.N_DISTRACTORS)


@pytest.fixture(scope="module")
def byte_models():
    tok = byte_tokenizer()
    base = tiny_model(0, vocab=259)
    torch.manual_seed(5)
    tuned = tiny_model(0, vocab=259)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tok, base, tuned


def test_every_part_runs_and_endpoints_are_paired(byte_models, tmp_path, monkeypatch):
    tok, base, tuned = byte_models
    prompts = ["What is rain?", "Name a fruit.", "Say hi.", "Why?"]
    monkeypatch.setattr(G.drift, "load_everyday", lambda path=None, n=None: prompts[:n or None])
    kw = dict(n_if=5, n_drift=3, n_knowledge=3, cache_dir=tmp_path, if_tokens=6, drift_tokens=5, n_boot=50)
    b = G.general_eval(base, tok, **kw)
    t = G.general_eval(tuned, tok, original=base, **kw)
    assert b["if"]["n"] == 5 and len(b["if"]["items"]) == 5 and 0 <= b["if"]["prompt_loose"]["value"] <= 1
    assert b["if"]["prompt_strict"]["value"] <= b["if"]["prompt_loose"]["value"]
    assert set(b["knowledge"]) == set(G.T.general_suite()) and all(k["n"] == 3 for k in b["knowledge"].values())
    assert b["drift"]["kl_per_token"] == {"value": 0.0, "se": 0.0} and b["drift"]["n"] == 3
    assert t["drift"]["kl_per_token"]["value"] > 0 and t["drift"]["reply_cache"] == b["drift"]["reply_cache"]
    same = G.endpoints(b, b, n_boot=50)
    kept = [v["retention"]["value"] for v in same["per_task"].values() if v["retention"]["value"] is not None]
    assert kept and all(r == 1.0 for r in kept)
    e = G.endpoints(b, t, n_boot=50)
    assert e["per_task"]["ifeval"]["base"]["value"] == b["if"]["prompt_strict"]["value"]
    assert e["per_task"]["ifeval"]["tuned"]["value"] == t["if"]["prompt_strict"]["value"]
    assert e["drift_kl_per_token"] == t["drift"]["kl_per_token"]
    assert set(e["endpoints"]) == {"median_retention", "mean_retention", "tasks_kept"}
    assert "items" not in str(G.summary(b))


def test_dev_split_reads_other_items(byte_models, tmp_path, monkeypatch):
    # the dev split (choosing settings) reads the general tasks' training items and the dev prompt files
    tok, base, _ = byte_models
    ex = [Example("Say the opposite.", a, b) for a, b in PAIRS]
    task = Task(name="opp", kind="general", metric="choice", train=ex[:4], test=ex[4:])
    assert len(G.choice_verdicts(base, TOK, task, split="dev")[0]) == 4
    assert len(G.choice_verdicts(base, TOK, task)[0]) == len(ex) - 4
    seen = []
    monkeypatch.setattr(G.drift, "load_everyday", lambda path=None, n=None: seen.append(path) or ["Hi?", "Why?"])
    r = G.general_eval(base, tok, split="dev", n_if=2, n_knowledge=2, cache_dir=tmp_path, if_tokens=4,
                       drift_tokens=3, n_boot=20)
    assert [i["id"] for i in r["if"]["items"]] == ["ifdev000", "ifdev001"]
    assert seen == [G.SPLITS["dev"][1]] and seen[0].name == "everyday_dev.jsonl"
    with pytest.raises(ValueError, match="split"):
        G.general_eval(base, tok, split="train")


def test_cli_bad_part_is_one_line(capsys):
    assert G.main(["--parts", "if,vibes"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--parts" in err and "vibes" in err


def test_stage_subset_is_the_prefix_of_every_item(byte_models, tmp_path, monkeypatch):
    # a stage's subset is paired with the base's first items: scoring the first n directly must give
    # exactly the first n per-item results of scoring every item, for every part
    tok, base, tuned = byte_models
    prompts = ["What is rain?", "Name a fruit.", "Say hi.", "Why?"]
    monkeypatch.setattr(G.drift, "load_everyday", lambda path=None, n=None: prompts[:n or None])
    kw = dict(n_knowledge=4, cache_dir=tmp_path, if_tokens=5, drift_tokens=4, n_boot=20)
    full = G.general_eval(tuned, tok, original=base, n_if=6, **kw)
    sub = G.general_eval(tuned, tok, original=base, n_if=3, n_drift=2, **{**kw, "n_knowledge": 2})
    cut = G.first_items(full, 3, 2, 2)
    assert cut["if"]["items"] == sub["if"]["items"] and len(full["if"]["items"]) == 6
    assert cut["drift"]["items"] == sub["drift"]["items"] and len(full["drift"]["items"]["tokens"]) == 4
    assert all(cut["knowledge"][t]["items"] == sub["knowledge"][t]["items"] for t in sub["knowledge"])
    assert full["if"]["items"][3:] and G.first_items(full)["if"]["items"] == full["if"]["items"]


def test_stage_curve_subsets_then_every_item_and_resumes(byte_models, tmp_path, monkeypatch):
    tok, base, tuned = byte_models
    prompts = ["What is rain?", "Name a fruit.", "Say hi.", "Why?"]
    monkeypatch.setattr(G.drift, "load_everyday", lambda path=None, n=None: prompts[:n or None])
    monkeypatch.setattr(G.ifeval, "load_ifeval", lambda path, n=None, real=G.ifeval.load_ifeval: real(path, n=n or 5))
    kw = dict(n_knowledge=3, cache_dir=tmp_path, if_tokens=5, drift_tokens=4, n_boot=20)
    b = G.general_eval(base, tok, **kw)
    loaded = []
    models = {"s1": base, "s2": tuned}
    load = lambda path: loaded.append(path) or (models[path], tok)   # noqa: E731
    out, header = tmp_path / "stages.json", {"run": "r", "settings": {"n": 1}}
    rep = G.stage_curve([(1, "s1"), (2, "s2")], b, base, out=out, n_stage=2, load=load, header=header, **kw)
    s1, s2 = rep["stages"]
    assert (s1["subset"], s2["subset"]) == (True, False) and loaded == ["s1", "s2"]
    assert s1["scores"]["if"]["n"] == 2 and s1["scores"]["drift"]["n"] == 2 and s2["scores"]["if"]["n"] == 5
    assert s1["endpoints"]["per_task"]["ifeval"]["retention"]["value"] in (1.0, None)   # stage 1 is the base
    assert s1["endpoints"]["drift_kl_per_token"]["value"] == 0.0
    want = G.summary(G.endpoints(b, G.general_eval(tuned, tok, original=base, **kw), n_boot=20))
    assert s2["endpoints"] == want and s2["endpoints"]["drift_kl_per_token"]["value"] > 0
    assert G.json.loads(out.read_text())["stages"] == rep["stages"]
    # a rerun keeps what it holds; a third stage turns stage 2 into a subset one; a new header starts over
    loaded.clear()
    models["s3"] = tuned
    again = G.stage_curve([(1, "s1"), (2, "s2"), (3, "s3")], b, base, out=out, n_stage=2, load=load,
                          header=header, **kw)
    assert loaded == ["s2", "s3"] and again["stages"][0] == s1 and again["stages"][1]["subset"]
    loaded.clear()
    G.stage_curve([(1, "s1")], b, base, out=out, n_stage=2, load=load, header={**header, "run": "q"}, **kw)
    assert loaded == ["s1"]
    assert "stage 1 (every item): IF retention" in G.stage_line(G.json.loads(out.read_text())["stages"][0])


@pytest.mark.parametrize("case", ["no_run", "no_stages", "split", "subset_base", "not_json"])
def test_cli_run_checks_before_anything(case, tmp_path, capsys):
    run, base = tmp_path / "run", tmp_path / "base.json"
    if case != "no_run":
        run.mkdir()
    if case not in ("no_run", "no_stages"):
        (run / "stage-1").mkdir()
    settings = {"split": "dev" if case == "split" else "test", "n_if": 60 if case == "subset_base" else 0}
    base.write_text("{" if case == "not_json" else G.json.dumps(
        {"settings": settings, "if": {}, "knowledge": {}, "drift": {}}))
    before = sorted(tmp_path.rglob("*"))
    assert G.main(["--run", str(run), "--base", str(base)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("general_eval.py: error:")
    assert {"no_run": "not a folder", "no_stages": "no stage-<k>", "split": "'dev'", "subset_base": "settings.n_if",
            "not_json": "not a readable JSON"}[case] in err
    assert sorted(tmp_path.rglob("*")) == before            # nothing written
