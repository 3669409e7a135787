"""Fixtures shared by the test files."""
import pytest

from vtp.data import build_processor
from vtp.vlm import build_llava


@pytest.fixture(scope="module")
def smoke_teacher():
    """An untrained smoke-sized LLaVA (16 visual tokens) in eval mode and its easy-VQA processor."""
    proc = build_processor(16)
    model = build_llava("smoke", vocab_size=proc.vocab_size, image_token_id=proc.image_token_id,
                        pad_token_id=proc.pad_token_id).eval()
    return model, proc


def run_readme_snippet(heading: str) -> dict:
    """Execute the first ```python block after the README heading ``heading`` as written; return its names."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split(heading, 1)[1]
    scope = {}
    exec(compile(re.search(r"```python\n(.*?)```", section, re.S).group(1), "README.md", "exec"), scope)
    return scope
