"""Tests for evaluate.py: metrics on models whose log-probabilities are known in closed form or
against plain greedy generation, the continual-learning summary on a hand-made matrix, and bad
input. All models are tiny and random or hand-set; runs in seconds."""
import pytest
import torch

import evaluate as E
from ivft.engine import cut_at_stop, score_continuations
from ivft.prompts import answer_ids, draw_shots, normalize_answer, render_prompt, reply_contains
from ivft.report import print_table
from ivft.tasks import Example
from toys import TOK, bigram_model, lp, make_task, naive_score, tiny_model


# ---- metrics on a model with hand-set log-probabilities ---------------------------------------------
# Every chat prompt ends with "\n" (of "assistant\n"), so the bigram model answers every example alike.
TABLE = {("\n", "c"): 6.0, ("\n", "a"): 5.0, ("\n", "b"): 2.0,
         ("c", "a"): 6.0,
         ("a", "E"): 6.0, ("a", "b"): 4.0,
         ("b", "E"): 6.0,
         ("s", " "): 3.0, (" ", "c"): 2.0}


def test_choice_accuracy_and_instruction_logprob_by_hand():
    model, L = bigram_model(TABLE)
    s = {"ab": lp(L, "\n", "a") + lp(L, "a", "b") + lp(L, "b", "E"),
         "b": lp(L, "\n", "b") + lp(L, "b", "E"),
         "ca": lp(L, "\n", "c") + lp(L, "c", "a") + lp(L, "a", "E")}
    assert s["ca"] > s["ab"] > s["b"] + 0.5  # the margins the expectations below rely on
    test = [Example("i", "x", "ca", choices=["ab", "b", "ca"]),    # gold ranks first: right
            Example("i", "y", "ab", choices=["ab", "b"]),          # gold ranks first: right
            Example("i", "z", "b", choices=["ab", "b"])]           # "ab" beats gold: wrong
    out = E.evaluate_task(model, TOK, make_task(test), metrics=("choice_accuracy", "instruction_logprob"),
                          progress=False)
    assert out["choice_accuracy"] == pytest.approx(2 / 3)
    assert out["instruction_logprob"] == pytest.approx((s["ca"] + s["ab"] + s["b"]) / 3, abs=1e-4)
    # without choices the task's label set {ab, b, ca} is ranked: only "ca" can win
    test = [Example("i", "x", "ca"), Example("i", "y", "ab"), Example("i", "z", "b"), Example("i", "w", "ca")]
    out = E.evaluate_task(model, TOK, make_task(test), metrics=("choice_accuracy",), progress=False)
    assert out["choice_accuracy"] == pytest.approx(0.5)


def test_exact_match_by_hand():
    model, _ = bigram_model(TABLE)  # greedy from "\n": c (6) -> a (6) -> <|im_end|>: "ca"
    test = [Example("i", "x", "Ca."), Example("i", "y", '"ca"'), Example("i", "z", "CA"), Example("i", "w", "cab"),
            Example("i", "v", "ca")]
    out = E.evaluate_task(model, TOK, make_task(test, metric="exact_match"), metrics=("exact_match",), progress=False)
    assert out["exact_match"] == pytest.approx(3 / 5)
    # gold "c" alone gives room for 2 tokens: the model's "ca" still shows it went on past "c"
    out = E.evaluate_task(model, TOK, make_task([Example("i", "z", "c")]), metrics=("exact_match",), progress=False)
    assert out["exact_match"] == 0.0


def test_reply_contains_equals_naive_generation():
    # reply_contains decodes with an early stop once the answer has appeared: the verdict must be the
    # one read off each example's full greedy reply from Transformer.generate
    model = tiny_model(seed=5)
    inputs = ["ab", "cde", "f", "ghij", "kl", "mno", "p", "qrs"]
    stop = TOK.stop_ids()
    replies, full = [], []
    for w in inputs:
        prompt = render_prompt(TOK, Example("Say it.", w, "x"))
        out = model.generate(torch.tensor([prompt]), E.REPLY_TOKENS, stop_ids=stop)[0].tolist()
        full.append(out)
        replies.append(TOK.decode([t for t in cut_at_stop(out, stop) if t not in stop]))
    # golds: a word the reply really contains (as whole words or not), something absent, or the
    # whole reply (an exact match)
    golds = []
    for i, r in enumerate(replies):
        words = [x for x in r.replace("\ufffd", " ").split() if x.strip(".,:;?!'\"-")]
        part = r[1:4] if "\ufffd" not in r[1:4] and r[1:4].strip() else ""
        whole = r if r.strip() and all(c in TOK.chars for c in r) and len(r.strip()) < E.REPLY_TOKENS else ""
        golds.append(whole if i % 4 == 3 and whole else
                     words[0] if words and i % 2 == 0 else (part if i % 3 == 1 and part else "zzqq"))
    test = [Example("Say it.", w, g) for w, g in zip(inputs, golds)]
    want = sum(reply_contains(r, g) for r, g in zip(replies, golds)) / len(test)
    # exact match reads the same greedy reply, cut at its budget: the longest gold + end token
    budget = max(len(answer_ids(TOK, g)) for g in golds)
    em = [normalize_answer(TOK.decode([t for t in cut_at_stop(out[:budget], stop) if t not in stop]))
          == normalize_answer(g) for out, g in zip(full, golds)]
    want_em = sum(em) / len(test)
    for bs in (1, 3):
        out = E.evaluate_task(model, TOK, make_task(test, metric="reply_contains"), metrics=("reply_contains",),
                              batch_size=bs, progress=False)
        assert out["reply_contains"] == pytest.approx(want), (replies, golds)
        # one decoding pass serves both generation metrics (and rides on choice ranking's pass):
        # each verdict must be the one it gets alone
        both = E.evaluate_task(model, TOK, make_task(test, metric="reply_contains"),
                               metrics=("reply_contains", "exact_match", "choice_accuracy"), batch_size=bs,
                               progress=False)
        assert both["reply_contains"] == pytest.approx(want), (replies, golds)
        assert both["exact_match"] == pytest.approx(want_em), (replies, golds)
    assert 0 < want < 1, (replies, golds)  # both verdicts exercised
    assert want_em > 0, (replies, golds)


def test_pooled_decoding_across_tasks_equals_naive_generation():
    # evaluate_suite decodes rows of all tasks in shared pools (continuous batching): tasks whose
    # prompts differ in length, in pools smaller and larger than a task, must give every verdict
    # that each example's own full greedy reply gives
    model = tiny_model(seed=5)
    stop = TOK.stop_ids()
    specs = {"short": ("Say.", ["ab", "cde", "f", "gh", "kl"]),
             "long": ("Say it again and again please.", ["mno", "p", "qrs", "tu", "vw", "xyz", "a"])}
    tasks, want = [], {}
    for name, (instr, inputs) in specs.items():
        test = []
        for j, w in enumerate(inputs):
            out = model.generate(torch.tensor([render_prompt(TOK, Example(instr, w, "x"))]), E.REPLY_TOKENS,
                                 stop_ids=stop)[0].tolist()
            reply = TOK.decode([t for t in cut_at_stop(out, stop) if t not in stop])
            words = [x for x in reply.replace("\ufffd", " ").split() if all(c in TOK.chars for c in x)]
            test.append(Example(instr, w, words[0] if words and j % 2 == 0 else "zzqq"))
        tasks.append(make_task(test, name=name, metric="reply_contains"))
        want[name] = [reply_contains(TOK.decode([t for t in cut_at_stop(model.generate(
            torch.tensor([render_prompt(TOK, ex)]), E.REPLY_TOKENS, stop_ids=stop)[0].tolist(), stop) if t not in stop]),
            ex.output) for ex in test]
    assert 0 < sum(map(sum, want.values())) < sum(map(len, want.values()))   # both verdicts exercised
    for bs in (2, 64):
        rep = E.evaluate_suite(model, TOK, tasks, metrics=("reply_contains",), batch_size=bs, progress=False)
        for name, verdicts in want.items():
            assert rep["tasks"][name]["reply_contains"] == pytest.approx(sum(verdicts) / len(verdicts)), (name, bs)


def test_zero_shot_replies_keep_their_own_stop_rule_beside_other_kshot_metrics():
    # 0-shot rows can still be decoding after the k-shot prompts were queued: their early stop must
    # stay the 0-shot one (reply_contains), not the k-shot one (exact match), or a reply is cut
    # before the answer appears. Golds are the last word of each full reply.
    model = tiny_model(seed=5)
    stop = TOK.stop_ids()
    test = []
    for w in ["ab", "cde", "f", "ghij", "kl", "mno", "p", "qrs"]:
        out = model.generate(torch.tensor([render_prompt(TOK, Example("Say it.", w, "x"))]), E.REPLY_TOKENS,
                             stop_ids=stop)[0].tolist()
        reply = TOK.decode([t for t in cut_at_stop(out, stop) if t not in stop])
        words = [x for x in reply.replace("\ufffd", " ").split() if all(c in TOK.chars for c in x)]
        test.append(Example("Say it.", w, words[-1] if words else "zz"))
    task = make_task(test, [Example("Say it.", "x", "x")], metric="reply_contains")
    alone = E.evaluate_task(model, TOK, task, metrics=("reply_contains",), progress=False)
    mixed = E.evaluate_task(model, TOK, task, metrics=("reply_contains", "exact_match_kshot"), k_shot=1,
                            progress=False)
    assert mixed["reply_contains"] == alone["reply_contains"] > 0


def test_knowledge_logprob_by_hand():
    model, L = bigram_model(TABLE)
    test = [Example("i", "x", "ca", knowledge_prompt="it is", knowledge_answer="ca"),
            Example("i", "y", "ab")]  # no knowledge prompt: not counted
    out = E.evaluate_task(model, TOK, make_task(test), metrics=("knowledge_logprob",), progress=False)
    expected = lp(L, "s", " ") + lp(L, " ", "c") + lp(L, "c", "a")
    assert out["knowledge_logprob"] == pytest.approx(expected, abs=1e-4)
    out = E.evaluate_task(model, TOK, make_task(test[1:]), metrics=("knowledge_logprob",), progress=False)
    assert "knowledge_logprob" not in out


def test_kshot_metrics_use_fixed_demonstrations():
    model = tiny_model(seed=11)
    train = [Example("Copy.", w, w) for w in ("ab", "cd", "ef", "gh", "ij")]
    test = [Example("Copy.", w, w) for w in ("kl", "mn")]
    task = make_task(test, train)
    out = E.evaluate_task(model, TOK, task, k_shot=2, seed=3, progress=False)
    assert {"exact_match_kshot", "choice_accuracy_kshot", "instruction_logprob_kshot"} <= set(out)
    shots = draw_shots(task, 2, seed=3)
    prompts = [render_prompt(TOK, ex, shots) for ex in test]
    ref = sum(naive_score(model, p, answer_ids(TOK, ex.output)) for p, ex in zip(prompts, test)) / 2
    assert out["instruction_logprob_kshot"] == pytest.approx(ref, abs=1e-4)
    assert out["instruction_logprob_kshot"] != pytest.approx(out["instruction_logprob"], abs=1e-3)
    zero = E.evaluate_task(model, TOK, task, k_shot=0, progress=False)
    assert not any(k.endswith("_kshot") for k in zero)


def test_fewer_demonstrations_than_k_uses_them_all_and_says_so(capsys):
    model = tiny_model()
    task = make_task([Example("i", "x", "ab")])
    out = E.evaluate_task(model, TOK, task, k_shot=3, progress=False)
    assert "instruction_logprob_kshot" in out
    assert "k_shot=3 uses those" in capsys.readouterr().err


def test_no_autograd_graph_is_built():
    # evaluation must not record autograd graphs (memory and time), whatever the caller's grad mode
    model = tiny_model()
    grad_modes, forward = [], model.forward
    model.forward = lambda *a, **k: (grad_modes.append(torch.is_grad_enabled()), forward(*a, **k))[1]
    task = make_task([Example("Copy.", "ab", "ab", choices=["ab", "ba"])], [Example("Copy.", "cd", "cd")])
    E.evaluate_task(model, TOK, task, k_shot=1, progress=False)
    score_continuations(model, [[5, 6]], [[7, 8]])
    assert grad_modes and not any(grad_modes), grad_modes


# ---- continual-learning summary --------------------------------------------------------------------

def report(scores, general=None, general_k=None):
    tasks = {t: {"choice_accuracy": v} for t, v in scores.items()}
    for t, v in (general or {}).items():
        tasks[t] = {"exact_match": v, "exact_match_kshot": general_k[t]}
    primary = {t: "choice_accuracy" for t in scores} | {t: "exact_match" for t in (general or {})}
    return {"model": "m", "tasks": tasks, "primary": primary, "settings": {}}


def test_cl_metrics_by_hand():
    R = [[0.1, 0.2, 0.3],
         [0.8, 0.3, 0.3],
         [0.6, 0.9, 0.4],
         [0.5, 0.7, 0.9]]
    G = [(0.6, 0.4), (0.5, 0.3), (0.4, 0.3), (0.3, 0.2)]        # (g1, g2) zero-shot per stage
    GK = [(0.7, 0.5), (0.7, 0.4), (0.6, 0.4), (0.6, 0.3)]       # k-shot
    reports = [report(dict(zip("ABC", r)), {"g1": g[0], "g2": g[1]}, {"g1": k[0], "g2": k[1]})
               for r, g, k in zip(R, G, GK)]
    cl = E.cl_metrics(reports, ["A", "B", "C"], ["g1", "g2"])
    assert cl["R"] == R
    assert cl["AP"] == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert cl["BWT"] == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)
    assert cl["FWT"] == pytest.approx(((0.3 - 0.2) + (0.4 - 0.3)) / 2)
    assert cl["forgetting"]["A"] == pytest.approx(0.8 - 0.5)
    assert cl["forgetting"]["B"] == pytest.approx(0.9 - 0.7)
    assert cl["forgetting"]["C"] is None
    assert cl["GP"] == pytest.approx([0.5, 0.4, 0.35, 0.25])
    assert cl["GP_drop"] == pytest.approx(0.25) and cl["IP_drop"] == pytest.approx(0.6 - 0.45)
    # every metric the general reports share, per stage (here the primary ones themselves)
    assert cl["general"]["exact_match"] == pytest.approx(cl["GP"])
    assert cl["general"]["exact_match_kshot"] == pytest.approx(cl["IP"])
    # one stage: nothing learned before it, so BWT, FWT and forgetting are undefined
    one = E.cl_metrics(reports[:2], ["A", "B", "C"], ["g1"])
    assert one["AP"] == pytest.approx(0.8) and one["BWT"] is None and one["FWT"] is None
    assert one["forgetting"] == {"A": None}
    assert one["GP_drop"] == pytest.approx(0.1) and one["IP_drop"] == pytest.approx(0.0)
    # no k-shot scores in the reports: IP is None, GP still computed
    bare = [report({"A": 0.1}, {"g1": 0.5}, {"g1": 0.5}), report({"A": 0.2}, {"g1": 0.4}, {"g1": 0.4})]
    for r in bare:
        del r["tasks"]["g1"]["exact_match_kshot"]
    cl = E.cl_metrics(bare, ["A"], ["g1"])
    assert cl["IP"] is None and cl["GP_drop"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="at least one stage"):
        E.cl_metrics(reports[:1], ["A"], [])
    with pytest.raises(ValueError, match="stages"):
        E.cl_metrics(reports, ["A"], [])


# ---- suite reports --------------------------------------------------------------------------------

def test_suite_report_and_table(capsys):
    model = tiny_model()
    task = make_task([Example("Copy.", "ab", "ab"), Example("Copy.", "cd", "cd")], name="copy")
    rep = E.evaluate_suite(model, TOK, [task], model_name="tiny", n=2, progress=False)
    assert set(rep) >= {"model", "tasks", "settings"} and rep["primary"] == {"copy": "choice_accuracy"}
    assert E.primary_score(rep, "copy") == rep["tasks"]["copy"]["choice_accuracy"]
    print_table(rep, E.METRICS)
    out = capsys.readouterr().out
    assert "copy" in out and "choice_accuracy" in out and "*" in out


# ---- bad input ------------------------------------------------------------------------------------

def test_empty_task_is_an_error():
    with pytest.raises(ValueError, match="'void' has no test examples"):
        E.evaluate_task(tiny_model(), TOK, make_task([], name="void"), progress=False)


def test_empty_answer_is_an_error():
    task = make_task([Example("i", "ok", "ab"), Example("i", "bad", "   ")], name="holes")
    with pytest.raises(ValueError, match=r"'holes', test example 1 \(input 'bad'\).*tokenizes to nothing"):
        E.evaluate_task(tiny_model(), TOK, task, progress=False)


def test_other_bad_inputs():
    model = tiny_model()
    task = make_task([Example("i", "x", "ab", choices=["cd", "ef"])], name="t")
    with pytest.raises(ValueError, match="gold 'ab' is not among its choices"):
        E.evaluate_task(model, TOK, task, metrics=("choice_accuracy",), progress=False)
    with pytest.raises(ValueError, match="unknown metric"):
        E.evaluate_task(model, TOK, task, metrics=("accuracy",), progress=False)


def test_cli_errors_exit_2(capsys):
    # an unknown task fails before any model is loaded, with one line that names the known tasks
    assert E.main(["--tasks", "no_such_task_xyz", "--no_progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evaluate.py: error:") and "no_such_task_xyz" in err[0], err
    from ivft import tasks
    assert any(name in err[0] for name in tasks.list_tasks())
    with pytest.raises(SystemExit) as e:
        E.main(["--n", "-1"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        E.main(["--metrics", "accuracy"])
    assert e.value.code == 2


def test_unwritable_out_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(E, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert E.main(["--tasks", "antonym", "--out", str(blocker / "report.json"), "--no_progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(blocker / "report.json") in err[0] and "cannot write" in err[0]

