"""The README's Python example runs as written."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_example_runs():
    text = open(os.path.join(ROOT, "README.md")).read()
    code = re.search(r"## Python API\n\n```python\n(.*?)```", text, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["x"].shape == (16, 1, 4, 4) and len(scope["frames"]) == 1000
    assert scope["frames"][-1] is scope["x"]
    assert ((scope["recon"] - scope["x0"]) ** 2).mean() < 0.01
