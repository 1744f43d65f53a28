"""The README's worked example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_training_step_example_runs():
    text = README.read_text()
    match = re.search(r"<!-- tested: readme-training-step -->\s*```python\n(.*?)```", text, re.S)
    assert match, "the README lost its tested example"
    namespace: dict = {}
    exec(compile(match.group(1), "README.md (training-step example)", "exec"), namespace)
    assert namespace["losses"].shape == (3,)
