"""The examples users copy: the docstring examples and the README's op example must run."""

import doctest
import re
from pathlib import Path

import matryoshka.loss

README = Path(__file__).resolve().parents[1] / "README.md"


def test_loss_docstring_examples():
    result = doctest.testmod(matryoshka.loss, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_readme_op_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    op_example = next(b for b in blocks if "matryoshka_loss(" in b)
    namespace: dict = {}
    exec(compile(op_example, "README.md", "exec"), namespace)
    assert namespace["out"].per_prefix.shape == (namespace["n"],)
    assert namespace["W_dec"].grad is not None
