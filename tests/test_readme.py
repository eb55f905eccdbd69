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
