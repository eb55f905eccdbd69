"""The README and the documents it links (docs/, results/README.md): code examples run as printed,
diffs apply and keep the fast suite green, links resolve, the functions it names exist and the study's
numbers are the files' own, and the README stays short."""
import os
import re

import pytest

from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "results" / "README.md"]
STUDY_DOCS = [ROOT / "results" / "README.md"]    # where the study's tables are (the README: its prose)


def test_readme_is_short():
    # the front door: what it is, how to run it, where to read; the rest has a home under docs/ and results/
    text = (ROOT / "README.md").read_text()
    n = len(text.splitlines())
    assert n <= 200, f"README.md has {n} lines; move detail to docs/ or results/README.md (at most 200)"
    # one results table (the confirmation); the studies' other tables live in results/README.md
    results = text.split("## Results", 1)[1].split("\n## ", 1)[0]
    assert len(re.findall(r"^\|[-|]+\|$", results, re.M)) == 1, "the README's results hold one table"


def test_doc_python_examples_run():
    blocks = [(doc, code) for doc in DOCS
              for code in re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)]
    assert blocks, "neither the README nor docs/ has a python example"
    for doc, code in blocks:
        scope = {}
        exec(compile(code, str(doc.relative_to(ROOT)), "exec"), scope)
        assert "model" in scope  # the example ran to its end


def _without_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def _anchor(heading: str) -> str:
    # GitHub's anchor of a heading: lower case, punctuation (backticks, dots, slashes, ...) dropped,
    # spaces to hyphens
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_doc_links_resolve():
    # a relative link (or image) in the README or a doc must name a file of the repository, and a
    # #fragment a heading of that file: moving a section must not leave a reader at a dead link
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", _without_code(doc.read_text())):
            if re.match(r"[a-z]+:", target):    # https:, mailto:
                continue
            path, _, fragment = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            where = f"{doc.relative_to(ROOT)}: link ({target})"
            assert dest.is_relative_to(ROOT) and dest.exists(), f"{where} names no file of the repository"
            if fragment:
                headings = re.findall(r"^#+ (.*)", _without_code(dest.read_text()), re.M)
                assert fragment in {_anchor(h) for h in headings}, f"{where}: no such heading"


def test_readme_names_functions_that_exist():
    # the README's "where the method lives" table names a function (or Class.method, or a module-level
    # name) per row, never a line number (every fork moves lines); each must exist in its file
    import ast
    rows = re.findall(r"^\| `([\w/]+\.py)` \| `([\w.]+)` \|", (ROOT / "README.md").read_text(), re.M)
    assert len(rows) >= 10, "the README's table of where the method lives is missing"
    assert not re.search(r"^\| `[\w/]+\.py` \| \d+-\d+ \|", (ROOT / "README.md").read_text(), re.M)
    for file, name in rows:
        scope = ast.parse((ROOT / file).read_text())
        for part in name.split("."):    # LossModule.loss: the class, then its method
            defs = {n.name: n for n in scope.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            defs |= {t.id: n for n in scope.body if isinstance(n, ast.Assign) for t in n.targets
                     if isinstance(t, ast.Name)}
            scope = defs.get(part)
            assert scope is not None, f"README: {file} has no {name}"


def test_method_citations_point_at_sections_that_exist():
    # code, --help texts and docs cite "docs/method.md §N": the file and every cited section must exist
    method = (ROOT / "docs" / "method.md").read_text()
    sections = set(re.findall(r"^## §(\d+)", method, re.M))
    cited = set()
    for path in [*ROOT.glob("*.py"), *ROOT.glob("*/*.py"), *ROOT.glob("*.md"), *ROOT.glob("*/*.md")]:
        text = path.read_text(encoding="utf-8")
        assert "METHOD" + ".md" not in text, f"{path} cites a file the repository does not have"
        cited |= set(re.findall(r"docs/method\.md §(\d+)", text))
    assert cited and cited <= sections, f"cited {sorted(cited)}, present {sorted(sections)}"


# the suite a fork must keep green: every fast test (those not marked slow: whole runs on the real
# model, GGUF parsing), this one excepted (it would fork itself)
FORK_TESTS = ["tests", "-m", "not slow", "--deselect", "tests/test_readme.py::test_forks_stay_green"]


def test_forks_stay_green(tmp_path):
    # the README's "Fork it" diff and docs/ablations.md's forks of train.py: each must apply to a copy
    # of the repository (a diff that drifted would teach a fork that no longer exists), carry the
    # test changes it needs, and leave the whole fast suite green in that copy
    import shutil
    import subprocess
    import sys
    fork_it = (ROOT / "README.md").read_text().split("## Fork it", 1)[1].split("\n## ", 1)[0]
    diffs = re.findall(r"```diff\n(.*?)```", fork_it + (ROOT / "docs" / "ablations.md").read_text(), re.S)
    assert len(diffs) >= 4, "the README and docs/ablations.md show fewer than four diffs"
    skip = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "runs", "ivs", "out", "*.egg-info", "*venv")
    for i, diff in enumerate(diffs):
        work = tmp_path / str(i)
        shutil.copytree(ROOT, work, ignore=skip)
        (work / "fork.patch").write_text(diff)
        r = subprocess.run(["git", "apply", "fork.patch"], cwd=work, capture_output=True, text=True)
        assert r.returncode == 0, f"diff {i + 1} no longer applies: {r.stderr}"
        assert (work / "train.py").read_text() != (ROOT / "train.py").read_text()
        # the copy's own modules come first on sys.path (python -m puts the working directory there)
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *FORK_TESTS],
                           cwd=work, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, f"diff {i + 1}: the fast tests fail on the fork:\n{r.stdout[-2000:]}"
        assert " passed" in r.stdout


def test_study_tables_match_the_results():
    """Every table of the study's methods in the README and results/README.md, headed "method (regime X,
    N seeds)", "method (regime X, seed K)" or "method (regimes A / B, N seeds)" (then each column is
    named "A <metric>" or "B <metric>"), shows results/study.json's mean ± std over N seeds, or that
    seed's run file: the documents' numbers cannot drift from the runs they came from."""
    import json
    columns = {"GP drop ↓": "GP_drop", "IP drop ↓": "IP_drop", "AP": "AP", "BWT": "BWT", "FWT": "FWT",
               "new_task": "new_task"}
    study = json.loads((ROOT / "results" / "study.json").read_text())
    pts = lambda x: f"{100 * x:.1f}".replace("-0.0", "0.0")

    def cell(regime, method, which, key):
        if which.endswith("seeds"):
            got = study["regimes"][regime]["methods"][method]
            assert got["GP_drop"]["n"] == int(which.split()[0]), f"{regime} {method}: {which} in the table"
            return f"{pts(got[key]['mean'])} ± {pts(got[key]['std'])}"
        cl = json.loads((ROOT / "results" / "study" /
                         f"run_{regime}-{method}-s{which.split()[1]}.json").read_text())["cl"]
        k = len(cl["train_tasks"])
        cl["new_task"] = sum(cl["R"][i + 1][i] for i in range(k)) / k
        return pts(cl[key])

    for doc in STUDY_DOCS:
        tables = re.findall(r"^\| method \(regimes? (A / B|[AB]), (\d+ seeds|seed \d+)\) \|(.*)\n"
                            r"\|[-|]+\n((?:\|.*\n)+)", doc.read_text(), re.M)
        assert tables, f"{doc.relative_to(ROOT)} shows no table of the study's methods"
        for regimes, which, head, body in tables:
            heads = [c.strip() for c in head.strip(" |").split("|")]
            # (regime, metric) of each column: "A GP drop ↓" in a table of both regimes
            cols = [(c[0], columns[c[2:]]) if regimes == "A / B" else (regimes, columns[c]) for c in heads]
            for row in body.strip().split("\n"):
                method, *cells = [c.strip().replace("−", "-") for c in row.strip(" |").split("|")]
                method = method.split()[0]
                want = [cell(regime, method, which, key) for regime, key in cols]
                where = f"{doc.relative_to(ROOT)}, regimes {regimes} ({which}), {method}"
                assert cells == want, f"{where}: {cells} but the results say {want}"


def test_study_findings_match_the_results():
    """results/README.md's table of the four findings ("finding (seed 0)", one column per regime and method)
    shows results/study.json's numbers, the reference values in its row names included."""
    import json
    study = json.loads((ROOT / "results" / "study.json").read_text())
    table = re.search(r"^\| finding \(seed 0\) \|(.*)\n\|[-|]+\n((?:\|.*\n)+)",
                      (ROOT / "results" / "README.md").read_text(), re.M)
    assert table, "results/README.md shows no table of the study's findings"
    runs = [c.strip().split() for c in table.group(1).strip(" |").split("|")]    # [["A", "plain"], ...]
    f = {r: study["regimes"][r]["findings"] for r in "AB"}
    noise = {r: f[r]["b"]["means"]["noise_floor"] for r in "AB"}
    # row name's start -> (value of regime r's run, reference value in the row name, digits)
    rows = {"(a) instruction": (lambda r, run: f[r]["a"][run]["instruction_logprob"][-1],
                                lambda r: f[r]["a"][f"{r}-plain-s0"]["instruction_logprob"][0], 2),
            "(a) knowledge": (lambda r, run: f[r]["a"][run]["knowledge_logprob"][-1],
                              lambda r: f[r]["a"][f"{r}-plain-s0"]["knowledge_logprob"][0], 2),
            "(b) cosine": (lambda r, run: f[r]["b"]["means"][run]["cos"], lambda r: noise[r]["cos"], 2),
            "(b) top heads": (lambda r, run: 100 * f[r]["b"]["means"][run]["head_overlap"],
                              lambda r: 100 * noise[r]["head_overlap"], 0),
            "(c)": (lambda r, run: 100 * f[r]["c"]["pooled_general"][run]["recovered"], None, 0),
            "(d)": (lambda r, run: f[r]["d"]["runs"][run]["spearman"], None, 2)}
    seen = set()
    for line in table.group(2).strip().split("\n"):
        name, *cells = [c.strip().replace("−", "-") for c in line.strip(" |").split("|")]
        key = next(k for k in rows if name.startswith(k))
        value, reference, digits = rows[key]
        seen.add(key)
        want = [f"{value(r, f'{r}-{m}-s0'):.{digits}f}" for r, m in runs]
        assert cells == want, f"results/README.md findings, {name}: {cells} but the results say {want}"
        if reference:
            for r in "AB":
                ref = f"{reference(r):.{digits}f}"
                assert re.search(rf"\({ref} before\)|\(noise floor {ref}\)", name), \
                    f"results/README.md findings, {name}: not {ref}"
    assert seen == set(rows), f"results/README.md's findings table lacks {set(rows) - seen}"


def test_tradeoff_tables_match_the_results():
    """results/README.md's table of the dev curves' points shows points of results/tradeoff.json's sweep
    (x 100), and the README's table of the confirmation shows its mean ± std over the 3 seeds for every
    method the protocol registered: the documents cannot drift from the runs."""
    import json
    d = json.loads((ROOT / "results" / "tradeoff.json").read_text())
    have = {(r["task"], f"{100 * r['new_task']:.1f}", f"{100 * r['general_after']:.1f}") for r in d["sweep"]}
    table = re.search(r"^\| method at a point of its curve.*\| (\w+) new / general \| (\w+) new / general \|.*\n"
                      r"\|[-|]+\n((?:\|.*\n)+)", (ROOT / "results" / "README.md").read_text(), re.M)
    assert table, "results/README.md shows no table of the dev curves' points"
    rows = table.group(3).strip().splitlines()
    assert len(rows) >= 5
    for row in rows:
        cells = [c.strip() for c in row.strip(" |").split("|")][1:3]
        for task, c in zip(table.groups()[:2], cells):
            new, general = (x.strip() for x in c.split("/"))
            assert (task, new, general) in have, f"results/README.md: {row!r}: {task} {c} is no point of the sweep"

    # the README's confirmation table: a row's name starts with the method's own words
    labels = {"plain,": "plain", "instruction-free KL": "free_kl", "replay": "replay", "guided,": "guided",
              "guided + replay": "guided+replay", "fvg": "fvg", "lwf": "lwf"}
    table = re.search(r"^\| method \| new task \| GP drop ↓ \| general, mean over stages \| IP drop ↓ \| BWT \| "
                      r"instruction log P \|\n\|[-|]+\n((?:\|.*\n)+)", (ROOT / "results" / "README.md").read_text(), re.M)
    assert table, "results/README.md shows no table of amendment 2's confirmation"
    pts = lambda s: f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"
    seen = set()
    for row in table.group(1).strip().splitlines():
        name, *cells = [c.strip().replace("−", "-").replace("**", "") for c in row.strip(" |").split("|")]
        label = next(v for k, v in labels.items() if name.startswith(k))
        c = d["confirm"][label]
        assert c["GP_drop"]["n"] == 3, f"README: {label} has {c['GP_drop']['n']} seeds, not 3"
        lp = c["instruction_logprob"]
        want = [pts(c[k]) for k in ("new_task", "GP_drop", "general_stage_mean", "IP_drop", "BWT")]
        want.append(f"{lp['mean']:.2f} ± {lp['std']:.2f}")
        assert cells == want, f"results/README.md confirmation, {name}: {cells} but the results say {want}"
        seen.add(label)
    assert seen == set(labels.values()), f"results/README.md's confirmation table lacks {set(labels.values()) - seen}"


def test_amendment_2s_lead_is_one_task():
    """results/README.md's per-task sentence about the instruction-free KL's lead in amendment 2's
    confirmation recomputes from its records (final general-task scores, mean of the 3 seeds)."""
    import json
    def final(label):
        out = {}
        for s in range(3):
            r = json.loads((ROOT / "results" / "tradeoff" / "confirm" / f"{label}-s{s}.json").read_text())
            last = r["stages"][-1]
            for g in r["cl"]["general_tasks"]:
                out.setdefault(g, []).append(last["tasks"][g][last["primary"][g]])
        return {g: 100 * sum(v) / len(v) for g, v in out.items()}
    text = " ".join((ROOT / "results" / "README.md").read_text().split())
    m = re.search(r"scores ([\d.]+) on `(\w+)` \(plain ([\d.]+)\) and ([\d.]+) on the other five", text)
    assert m, "results/README.md: the per-task sentence about the instruction-free KL's lead is gone"
    free, plain = final("free_kl"), final("plain")
    task = m.group(2)
    assert (f"{free[task]:.1f}", f"{plain[task]:.1f}") == (m.group(1), m.group(3))
    assert max(free, key=free.get) == task
    assert all(f"{free[g]:.1f}" == m.group(4) == f"{plain[g]:.1f}" for g in free if g != task)


def test_forgetting_tables_match_the_results():
    """results/README.md's table of the regime runs shows results/forgetting.json's rows, and
    results/forgetting.md is what the report renders from that JSON: neither can drift from the runs."""
    import json
    import forgetting_report as FR
    d = json.loads((ROOT / "results" / "forgetting.json").read_text())
    assert (ROOT / "results" / "forgetting.md").read_text() == FR.markdown(d, ["forgetting.png"])
    rows = {r["lr"]: r for r in d["regime"]["rows"]}
    table = re.search(r"^\| lr \| new task \| IF retention \| drift KL \| median retention \|\n\|[-|]+\n((?:\|.*\n)+)",
                      (ROOT / "results" / "README.md").read_text(), re.M)
    assert table, "results/README.md shows no table of the regime runs"
    f = lambda e, d=2: f"{e['value']:.{d}f} ± {e['se']:.{d}f}"  # noqa: E731
    seen = set()
    for row in table.group(1).strip().splitlines():
        lr, *cells = [c.strip() for c in row.strip(" |").split("|")]
        r = rows[float(lr)]
        assert cells == [f"{100 * r['new_task']:.1f}", f(r["if_retention"]), f(r["drift_kl"], 3),
                         f(r["median_retention"])], f"results/README.md regime row {lr}: {cells}"
        seen.add(float(lr))
    assert seen == set(rows)
    # results/README.md's sentence about plain at lr 1e-4 after the dev sequence
    harsh, text = rows[1e-4], " ".join((ROOT / "results" / "README.md").read_text().split())
    assert f"drifts {harsh['drift_kl']['value']:.2f} nats per token" in text
    assert f"keeps a median {harsh['median_retention']['value']:.2f} of" in text
    assert harsh["answers"]["value"] == 0 and "no reply of 10 words or more to any IF prompt" in text
    assert f"off-floor regime is lr {d['regime']['lr']:.0e}".replace("e-0", "e-") in text
    # ... and its sentence about replay's curve (amendment 3c)
    plain, rest = d["replay"][0], d["replay"][1:]
    assert plain["settings"]["replay"] == 0 and rest
    span = lambda xs, f: f"{f(min(xs))}-{f(max(xs))}"  # noqa: E731
    assert f"keeps uppercase at {span([100 * r['earlier_after'] for r in rest], lambda x: f'{x:.1f}')}" in text
    assert f"(plain: {100 * plain['earlier_before']:.1f} → {100 * plain['earlier_after']:.1f})" in text
    assert (f"({span([r['drift_kl']['value'] for r in rest], lambda x: f'{x:.3f}')} against plain's "
            f"{plain['drift_kl']['value']:.3f})") in text


def test_readme_shows_amendment_3s_confirmation():
    """The README's results table is results/forgetting.json's confirmation, every arm of both regimes
    with its 3 seeds (mean ± std), and its verdict sentence is the registered decision's."""
    import json
    d = json.loads((ROOT / "results" / "forgetting.json").read_text())
    text = (ROOT / "README.md").read_text()
    table = re.search(r"^\| regime \| arm \| seeds \| new task \| IF retention \| answers \| drift KL ↓ \| "
                      r"median retention \|\n\|[-|]+\n((?:\|.*\n)+)", text, re.M)
    assert table, "README shows no table of amendment 3's confirmation"
    pm = lambda e, k, f: f"{k * e['mean']:{f}} ± {k * e['std']:{f}}"  # noqa: E731
    seen = set()
    for row in table.group(1).strip().splitlines():
        regime, name, *cells = [c.strip().replace("**", "") for c in row.strip(" |").split("|")]
        labels = re.findall(r"`([\w+-]+)`", name)
        assert labels, f"README confirmation row {row!r} names no arm"
        for label in labels:
            a = d["confirm"][regime][label]
            assert a["median_retention"]["n"] == 3, f"README: {regime}/{label} has {a['median_retention']['n']} seeds"
            want = [str(a["median_retention"]["n"]), pm(a["new_task"], 100, ".1f") if "new_task" in a else "—",
                    pm(a["if_retention"], 1, ".2f"), pm(a["answers"], 100, ".1f"), pm(a["drift_kl"], 1, ".3f"),
                    pm(a["median_retention"], 1, ".2f")]
            assert cells == want, f"README confirmation, {regime}/{label}: {cells} but the results say {want}"
            seen.add((regime, label))
    assert seen == {(g, lab) for g, arms in d["confirm"].items() for lab in arms}, "README lacks arms"
    verdicts = d["decision"]["per_arm"]
    flat = " ".join(text.split())
    met = sorted(k for k, v in verdicts.items() if v)
    assert (f"meets the registered goal: {', '.join(met)}" if met else "no arm meets the registered goal") in flat
    # the prose's ratios and medians recompute from the same means
    r = lambda g, lab: d["confirm"][g][lab]["drift_kl"]["mean"] / d["confirm"][g]["plain"]["drift_kl"]["mean"]  # noqa: E731
    med = lambda g: d["confirm"][g]["plain"]["median_retention"]["mean"]  # noqa: E731
    assert f"plain keeps a median {med('off-floor'):.2f} (off-floor) and {med('harsh'):.2f} (harsh)" in flat
    assert f"off the floor it drifts {r('off-floor', 'free_kl'):.2f}× as much as plain" in flat
    assert f"in the harsh regime it drifts {r('harsh', 'best'):.2f}× as much" in flat
    assert f"drifts {r('off-floor', 'guided-paper'):.2f}× and {r('harsh', 'guided-paper'):.2f}× as much" in flat


@pytest.mark.parametrize("run,record,name", [("plain", "plain", "plain"),
                                             ("free_kl", "best-non-iv", "the KL")])
def test_stage_curve_paragraph_matches_its_run(run, record, name):
    """results/README.md's stage-by-stage sentences show the committed stage curves' own numbers, and
    each curve's last stage is the confirmation record it claims to reproduce."""
    import json
    import general_eval as G
    stages_dir, confirm = ROOT / "results" / "forgetting" / "stages", ROOT / "results" / "forgetting" / "confirm"
    curve = json.loads((stages_dir / f"off-floor.{run}-s0.json").read_text())
    record = json.loads((confirm / f"off-floor.{record}-s0.json").read_text())
    base = json.loads((ROOT / "results" / "general_eval.json").read_text())
    stages, text = curve["stages"], " ".join((ROOT / "results" / "README.md").read_text().split())
    assert [s["subset"] for s in stages] == [True, True, True, False]
    assert curve["base"] == "results/general_eval.json"          # repo-relative: true in any clone
    assert G.summary(G.endpoints(base, record["general"])) == stages[-1]["endpoints"]     # to the last digit
    drift = [s["endpoints"]["drift_kl_per_token"]["value"] for s in stages]
    assert drift == sorted(drift) and f"({', '.join(f'{x:.3f}' for x in drift)} nats per token)" in text
    ans = [f"{s['scores']['if']['answers']['value']:.2f}" for s in stages]
    assert f"{name}: {', '.join(ans[:-1])}, then {ans[-1]} on every prompt" in text
    ret = [s["endpoints"]["per_task"]["ifeval"]["retention"] for s in stages]
    f = lambda e: f"{e['value']:.2f} ± {e['se']:.2f}"  # noqa: E731
    assert f"{name}: {', '.join(f(r) for r in ret[:-1])}; {f(ret[-1])} on every prompt after the last" in text


def test_stage_curves_drift_ratio():
    """The KL's drift over plain's, stage by stage, is the range results/README.md states."""
    import json
    stages_dir = ROOT / "results" / "forgetting" / "stages"
    drift = {run: [s["endpoints"]["drift_kl_per_token"]["value"]
                   for s in json.loads((stages_dir / f"off-floor.{run}-s0.json").read_text())["stages"]]
             for run in ("plain", "free_kl")}
    ratio = [k / p for k, p in zip(drift["free_kl"], drift["plain"])]
    text = " ".join((ROOT / "results" / "README.md").read_text().split())
    assert f"stays at {min(ratio):.2f}-{max(ratio):.2f}× plain's throughout" in text
