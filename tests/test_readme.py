"""The README's Python example runs as written, and its Quickstart matches .ci/run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_readme_python_example_runs():
    blocks = _python_blocks()
    assert blocks, "README.md has no ```python example"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)
        # The example's advertised shapes hold.
        if "image_out" in namespace:
            assert namespace["image_out"].pooled.shape == (8, 48)
            assert namespace["audio_out"].pooled.shape == (1, 128)
            assert namespace["text"].shape == (1, 384)


def test_quickstart_has_exactly_the_two_marked_commands():
    for marker in ("quickstart-install", "quickstart-test"):
        match = re.search(rf"<!-- {marker} -->\n```bash\n(.+?)\n```", README)
        assert match, f"README.md lacks the {marker} command block"
        assert "\n" not in match.group(1)
    assert "quickstart-install" in (ROOT / ".ci" / "run").read_text()
