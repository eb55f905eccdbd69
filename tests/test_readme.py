"""The README's code examples must run as printed."""
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

