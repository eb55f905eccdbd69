"""experiments/tradeoff.py: the registered choice rule, the confirmatory plan, the decision rule by
hand, the dev split's files, and the keys of results/tradeoff.json (issue "Where IV guidance helps")."""
import json

import pytest

import tradeoff as T
import tradeoff_report as R


def point(method, label, task, new, after, settings=None, before=0.33):
    return {"method": method, "label": label, "strength": 0.0, "settings": settings or {"x": label}, "task": task,
            "split": "dev", "new_task": new, "general_before": before, "general_after": after}


def sweep():
    pts = []
    for task, scale in (("uppercase", 1.0), ("date_iso", 0.9)):
        pts += [point("plain", "lr=1e-5", task, 0.5 * scale, 0.30, {"lr": 1e-5}),
                point("plain", "lr=3e-5", task, 0.95 * scale, 0.20, {"lr": 3e-5}),
                point("plain", "lr=1e-4", task, 1.0 * scale, 0.05, {"lr": 1e-4}),
                # lwf: λ=30 keeps the most but learns too little on date_iso only; λ=10 qualifies
                point("lwf", "λ=10", task, 0.92 * scale, 0.15, {"preset": "lwf", "kl_weight": 10.0}),
                point("lwf", "λ=30", task, (0.95 if task == "uppercase" else 0.5) * scale, 0.29),
                point("lwf", "λ=1", task, 1.0 * scale, 0.06)]
    return pts


def test_choice_rule_by_hand():
    s = sweep()
    # plain's best new task: 1.0 (uppercase), 0.9 (date_iso); the bar 0.9 x that on each task
    c = T.choose_setting(s, "plain")
    assert c["label"] == "lr=3e-5" and c["qualified"] and c["settings"] == {"lr": 3e-5}
    assert c["general_after"] == pytest.approx(0.20) and c["new_task"] == pytest.approx((0.95 + 0.855) / 2)
    c = T.choose_setting(s, "lwf")
    assert c["label"] == "λ=10", "λ=30 keeps more but fails the bar on date_iso: it must not be chosen"
    # nothing qualifies: the highest mean new task, marked
    s2 = [p for p in s if p["method"] == "plain"] + [point("fvg", f"x{f}", t, 0.1 * f, 0.3) for f in (1, 2)
                                                    for t in ("uppercase", "date_iso")]
    c = T.choose_setting(s2, "fvg")
    assert c["label"] == "x2" and not c["qualified"]
    # a method missing a task's point is not chosen yet; so is a method with no points at all
    assert T.choose_setting(s[:-1], "lwf") is None and T.choose_setting(s, "guided") is None


def test_confirm_plan_waits_for_every_method_then_sets_the_chosen_points():
    s = sweep()
    assert T.confirm_plan(s) is None
    for m, kw in (("guided", {"preset": "guided", "iv_norm_ratio": 0.5}), ("free_kl", {"free_kl_weight": 10.0}),
                  ("fvg", {"preset": "fvg"})):
        s += [point(m, "only", t, 1.0, 0.2, kw) for t in ("uppercase", "date_iso")]
    plan = T.confirm_plan(s)
    assert list(plan) == ["plain", "free_kl", "guided", "plain-less", "replay", "lwf", "fvg", "guided+replay"]
    assert plan["plain"] == {} and plan["plain-less"] == {"lr": 3e-5}
    assert plan["guided+replay"] == {"preset": "guided", "iv_norm_ratio": 0.5, "replay": 0.25}
    assert T.flags_of(plan["guided+replay"]) == ["--preset", "guided", "--iv_norm_ratio", "0.5", "--replay", "0.25"]
    assert T.settings_of(["--lr", "1e-05", "--preset", "lwf"]) == {"lr": 1e-5, "preset": "lwf"}
    assert len(T.confirm_jobs(plan)) == 24 and [j[2] for j in T.confirm_jobs(plan)[:8]] == [0] * 8


def table(**gp_nt):
    return {m: {"method": m, "regime": "A", "settings": {}, "seeds": [0, 1, 2],
                "GP_drop": {"mean": gp, "std": 0.0, "n": 3}, "new_task": {"mean": nt, "std": 0.0, "n": 3}}
            for m, (gp, nt) in gp_nt.items()}


def test_decision_rule_by_hand():
    base = dict(plain=(0.30, 0.90), **{"plain-less": (0.20, 0.80)}, replay=(0.14, 0.89), lwf=(0.25, 0.90),
                free_kl=(0.10, 0.85))
    # replay is the best non-IV method within 2 points of plain's learning (free_kl learns too little)
    d = T.decide(table(**base, guided=(0.11, 0.89)))
    assert d["holds"] is True and "replay" in d["text"]
    d = T.decide(table(**base, guided=(0.12, 0.89)))        # halved, learned, but only 2 points below replay
    assert d["holds"] is False
    d = T.decide(table(**base, guided=(0.05, 0.87)))        # forgets little but learns 3 points less
    assert d["holds"] is False
    d = T.decide(table(**{k: v for k, v in base.items() if k != "lwf"}, guided=(0.05, 0.9)))
    assert d["holds"] is None and "not yet decided" in d["text"]


def test_endpoints_of_a_run():
    r = {"cl": {"train_tasks": ["a", "b"], "R": [[0, 0], [0.8, 0.1], [0.5, 0.9]], "GP": [0.4, 0.3, 0.2],
                "GP_drop": 0.2, "IP_drop": 0.1, "BWT": -0.3, "general": {"instruction_logprob": [-9.0, -8.0, -7.5]},
                "AP": 0.7, "FWT": 0.0, "IP": [0.5, 0.45, 0.4]}}       # as results.json's cl has them
    e = T.endpoints(r)
    assert e["new_task"] == pytest.approx(0.85) and e["general_stage_mean"] == pytest.approx(0.25)
    assert e["instruction_logprob"] == -7.5 and e["GP_drop"] == 0.2


def test_dev_split_files_keep_the_registry_metric_and_never_the_test_split(tmp_path, monkeypatch):
    from ivft import tasks
    monkeypatch.setattr(T, "RUNS", tmp_path)
    new, general = T.dev_files()
    up, reg = tasks.load_task(new["uppercase"]), tasks.load_task("uppercase")
    assert up.train == reg.train[:320] and up.test == reg.train[320:400]
    test_inputs = {e.input for e in reg.test}
    assert not test_inputs & {e.input for e in up.test}
    for path in general.split(","):
        g = tasks.load_task(path)
        r = tasks.load_task(g.name)
        assert (g.metric, g.kind) == (r.metric, "general") and g.test == r.train
    stamp = (tmp_path / "dev" / "uppercase.train.jsonl").stat().st_mtime_ns
    T.dev_files()        # unchanged files are not rewritten (the IV cache keys on the data, not the time)
    assert (tmp_path / "dev" / "uppercase.train.jsonl").stat().st_mtime_ns == stamp


def test_report_writes_tradeoff_json_with_the_issue_keys(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "RAW", tmp_path / "raw")
    monkeypatch.setattr(T, "ROOT", tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "raw" / "sweep").mkdir(parents=True)
    for i, p in enumerate(sweep()):
        p = {**p, "settings": T.flags_of(p["settings"])} if i == 0 else p     # as an older record had them
        (tmp_path / "raw" / "sweep" / f"{i}.json").write_text(json.dumps(p))
    T.write_report()
    d = json.loads((tmp_path / "results" / "tradeoff.json").read_text())
    R.check_tradeoff(d)
    assert {"sweep", "confirm", "decision"} <= set(d) and d["decision"]["holds"] is None
    for rec in d["sweep"]:
        assert {"method", "settings", "task", "split", "new_task", "general_before", "general_after"} <= set(rec)
        assert isinstance(rec["settings"], dict) and rec["split"] == "dev"
    assert d["chosen"]["plain"]["label"] == "lr=3e-5"
    assert "lr=3e-5" in (tmp_path / "results" / "tradeoff.md").read_text()


def fake_results(new=0.8, gp=(0.33, 0.2), dtype="float32"):
    stages = [{"tasks": {"antonym": {"reply_contains": g}}, "primary": {"antonym": "reply_contains"},
               "settings": {"groups": [{"k_shot": 0, "dtype": dtype}]}} for g in gp]
    return {"cl": {"R": [[0.0], [new]], "GP": list(gp), "general_tasks": ["antonym"], "GP_drop": gp[0] - gp[-1]},
            "stages": stages, "training": [{"task": "t", "terms": {"ce": 1.0, "kl": 0.1}, "grad_share": {"kl": 0.3}}],
            "config": {"code": {"commit": "abc"}}}


def test_a_sweep_point_and_a_confirmatory_run_leave_their_record_and_are_skipped_after(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(T, "RAW", tmp_path / "raw")
    calls = []

    def fake_train(out_dir, flags, threads, log):
        calls.append(flags)
        out_dir.mkdir(parents=True)
        (out_dir / "stage-1").mkdir()
        return fake_results()
    monkeypatch.setattr(T, "train_run", fake_train)
    files = ({"uppercase": "dev/uppercase.train.jsonl"}, "g1,g2")
    msg = T.sweep_point("uppercase", "lwf", "λ=10", 10.0, ["--preset", "lwf", "--kl_weight", "10"], files, 1)
    assert "new task 0.80" in msg and len(calls) == 1
    assert calls[0][calls[0].index("--tasks") + 1] == "dev/uppercase.train.jsonl" and "--eval_k_shot" in calls[0]
    rec = json.loads((tmp_path / "raw" / "sweep" / "uppercase.lwf.l_10.json").read_text())
    assert rec["settings"] == {"preset": "lwf", "kl_weight": 10.0} and rec["general_after"] == 0.2
    assert rec["general_tasks"] == {"antonym": [0.33, 0.2]} and rec["terms"][0]["grad_share"] == {"kl": 0.3}
    assert not (tmp_path / "runs" / "sweep" / "uppercase.lwf.l_10").exists(), "its checkpoints are deleted"
    assert T.sweep_point("uppercase", "lwf", "λ=10", 10.0, [], files, 1).endswith("done") and len(calls) == 1
    # confirmatory runs: the chosen settings as flags, the study's test evaluation; seed 0 of guided gets
    # the re-injection analysis on its final model before its checkpoints go
    children = []
    monkeypatch.setattr(T, "run_child", lambda cmd, log: children.append(cmd) or 0)
    for label, analysed in (("guided", True), ("lwf", False)):
        T.confirm_run(label, {"preset": label, "kl_weight": 3.0}, 0, 1)
        flags = calls[-1]
        assert flags[flags.index("--preset") + 1] == label and flags[flags.index("--kl_weight") + 1] == "3"
        assert flags[flags.index("--eval_n") + 1] == "50" and flags[flags.index("--seed") + 1] == "0"
        assert not (tmp_path / "runs" / "confirm" / f"{label}-s0").exists()
        assert json.loads((tmp_path / "raw" / "confirm" / f"{label}-s0.json").read_text())["label"] == label
        assert len(children) == 1 and children[0][children[0].index("--final") + 1].endswith("confirm/guided-s0")
    # a failed analysis leaves no record: the run is done again, with its analysis, next time
    monkeypatch.setattr(T, "run_child", lambda cmd, log: 1)
    assert "FAILED" in T.confirm_run("plain", {}, 0, 1)
    assert not (tmp_path / "raw" / "confirm" / "plain-s0.json").exists()


def test_a_label_that_resolves_to_another_labels_run_reuses_its_records_only_after_seed_0_agrees(tmp_path, monkeypatch):
    # amendment 2b: plain-less chosen at plain's own point (lr 1e-4, one epoch: train.py's defaults)
    plan = {"plain": {}, "free_kl": {"free_kl_weight": 30.0}, "plain-less": {"lr": 1e-4, "epochs": 1.0},
            "lwf": {"preset": "lwf", "kl_weight": 1.0}}
    assert T.twins(plan) == {"plain-less": "plain"}
    assert T.twins({**plan, "plain-less": {"lr": 3e-5}}) == {}, "another lr is another run"
    assert "lwf" not in T.twins({**plan, "lwf": {"preset": "lwf", "kl_weight": 0.0}}), "λ 0 keeps its preset"
    jobs = T.confirm_jobs(plan)
    assert [(j[0], j[2]) for j in jobs[-2:]] == [("plain-less", 1), ("plain-less", 2)], "a twin's later seeds go last"
    assert ("plain-less", 0, "plain") in [(j[0], j[2], j[3]) for j in jobs[:4]], "seed 0 of both is trained"

    monkeypatch.setattr(T, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(T, "RAW", tmp_path / "raw")
    trained = []

    def fake_train(out_dir, flags, threads, log):
        trained.append(out_dir.name)
        rec = fake_results(new=0.8 if "plain-less" not in out_dir.name else got_less)
        rec["stages"][0]["settings"]["seconds"] = len(trained)      # wall-clock time differs in every run
        return rec
    monkeypatch.setattr(T, "train_run", fake_train)
    monkeypatch.setattr(T, "run_child", lambda cmd, log: 0)      # plain-s0's re-injection analysis
    got_less = 0.8                                # seed 0: both labels train, and agree
    for label, seed in (("plain", 0), ("plain-less", 0), ("plain", 1)):
        T.confirm_run(label, plan[label], seed, 1, twin=T.twins(plan).get(label))
    msg = T.confirm_run("plain-less", plan["plain-less"], 1, 1, twin="plain")
    assert "same run as plain-s1" in msg and trained == ["plain-s0", "plain-less-s0", "plain-s1"]
    rec = json.loads((tmp_path / "raw" / "confirm" / "plain-less-s1.json").read_text())
    assert rec["label"] == "plain-less" and rec["same_as"] == "plain-s1" and rec["cl"] == fake_results()["cl"]
    # plain's record of seed 2 is missing: plain-less trains
    T.confirm_run("plain-less", plan["plain-less"], 2, 1, twin="plain")
    assert trained[-1] == "plain-less-s2"
    # seed 0 differed: nothing is reused
    (tmp_path / "raw" / "confirm" / "plain-less-s0.json").unlink()
    (tmp_path / "raw" / "confirm" / "plain-less-s1.json").unlink()
    got_less = 0.7
    T.confirm_run("plain-less", plan["plain-less"], 0, 1, twin="plain")
    T.confirm_run("plain-less", plan["plain-less"], 1, 1, twin="plain")
    assert trained[-2:] == ["plain-less-s0", "plain-less-s1"]
    assert "same_as" not in json.loads((tmp_path / "raw" / "confirm" / "plain-less-s1.json").read_text())


def test_confirmatory_runs_are_pinned_to_fp32_and_a_record_of_another_dtype_is_refused(tmp_path, monkeypatch):
    flags = T.confirm_flags({"preset": "guided"}, 1)
    assert flags[flags.index("--dtype") + 1] == "fp32", "--dtype auto would be bf16 on an AMX CPU"
    monkeypatch.setattr(T, "RAW", tmp_path)
    (tmp_path / "confirm").mkdir()
    (tmp_path / "confirm" / "plain-s0.json").write_text(json.dumps(fake_results(dtype="bfloat16")))
    with pytest.raises(SystemExit, match=r"plain-s0.json: evaluated in bfloat16, not float32"):
        T.confirm_table({"plain": {}})
    (tmp_path / "confirm" / "plain-s0.json").write_text(json.dumps(fake_results()))
    assert T.confirm_record(tmp_path / "confirm" / "plain-s0.json")["cl"] == fake_results()["cl"]
    assert T.confirm_record(tmp_path / "confirm" / "plain-s1.json") is None
