"""The README's code examples must run as printed, and its study numbers must be the results' own."""
import re

from conftest import ROOT


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        scope = {}
        exec(compile(code, "README.md", "exec"), scope)
        assert "model" in scope  # the example ran to its end


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


def test_readme_ablation_diffs_apply_to_train_py(tmp_path):
    # the Ablations section shows forks of train.py as diffs: each must still apply to the current
    # train.py (a patch that drifted would teach a fork that no longer exists) and give valid Python
    import ast
    import subprocess
    section = (ROOT / "README.md").read_text().split("## Ablations", 1)[1].split("\n## ", 1)[0]
    diffs = re.findall(r"```diff\n(.*?)```", section, re.S)
    assert len(diffs) >= 3, "the Ablations section shows fewer than three diffs"
    for i, diff in enumerate(diffs):
        work = tmp_path / str(i)
        work.mkdir()
        (work / "train.py").write_text((ROOT / "train.py").read_text())
        (work / "fork.patch").write_text(diff)
        r = subprocess.run(["git", "apply", "--unidiff-zero", "fork.patch"], cwd=work, capture_output=True, text=True)
        assert r.returncode == 0, f"diff {i + 1} no longer applies to train.py: {r.stderr}"
        forked = (work / "train.py").read_text()
        assert forked != (ROOT / "train.py").read_text()
        ast.parse(forked)


def test_readme_study_tables_match_the_results():
    """Every README table of the study's methods, headed "method (regime X, N seeds)" or "method
    (regime X, seed K)", shows results/study.json's mean ± std over N seeds, or that seed's run
    file: the README's numbers cannot drift from the runs they came from."""
    import json
    columns = {"GP drop ↓": "GP_drop", "IP drop ↓": "IP_drop", "AP": "AP", "BWT": "BWT", "FWT": "FWT",
               "new_task": "new_task"}
    study = json.loads((ROOT / "results" / "study.json").read_text())
    tables = re.findall(r"^\| method \(regime ([AB]), (\d+ seeds|seed \d+)\) \|(.*)\n\|[-|]+\n((?:\|.*\n)+)",
                        (ROOT / "README.md").read_text(), re.M)
    assert tables, "the README shows no table of the study's methods"
    pts = lambda x: f"{100 * x:.1f}".replace("-0.0", "0.0")
    for regime, which, head, body in tables:
        names = [columns[c.strip()] for c in head.strip(" |").split("|")]
        for row in body.strip().split("\n"):
            method, *cells = [c.strip().replace("−", "-") for c in row.strip(" |").split("|")]
            method = method.split()[0]
            if which.endswith("seeds"):
                got = study["regimes"][regime]["methods"][method]
                assert got["GP_drop"]["n"] == int(which.split()[0]), f"{regime} {method}: {which} in the README"
                want = [f"{pts(got[k]['mean'])} ± {pts(got[k]['std'])}" for k in names]
            else:
                cl = json.loads((ROOT / "results" / "study" /
                                 f"run_{regime}-{method}-s{which.split()[1]}.json").read_text())["cl"]
                k = len(cl["train_tasks"])
                cl["new_task"] = sum(cl["R"][i + 1][i] for i in range(k)) / k
                want = [pts(cl[k]) for k in names]
            assert cells == want, f"README, regime {regime} ({which}), {method}: {cells} but the results say {want}"


def test_readme_study_findings_match_the_results():
    """The README's table of the four findings ("finding (seed 0)", one column per regime and method)
    shows results/study.json's numbers, the reference values in its row names included."""
    import json
    study = json.loads((ROOT / "results" / "study.json").read_text())
    table = re.search(r"^\| finding \(seed 0\) \|(.*)\n\|[-|]+\n((?:\|.*\n)+)", (ROOT / "README.md").read_text(), re.M)
    assert table, "the README shows no table of the study's findings"
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
        assert cells == want, f"README findings, {name}: {cells} but the results say {want}"
        if reference:
            for r in "AB":
                ref = f"{reference(r):.{digits}f}"
                assert re.search(rf"\({ref} before\)|\(noise floor {ref}\)", name), f"README findings, {name}: not {ref}"
    assert seen == set(rows), f"the README's findings table lacks {set(rows) - seen}"
