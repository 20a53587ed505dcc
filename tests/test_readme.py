"""README.md's Python blocks run as written, in order, in a fresh folder, offline."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def python_blocks(text: str) -> list[str]:
    """The ```python fenced blocks of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def test_readme_python_blocks_run_in_order(tmp_path):
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 4, "the README's Python walk-through lost its blocks"
    script = tmp_path / "readme_blocks.py"
    script.write_text("\n\n".join(blocks))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "MPLBACKEND": "Agg"}
    for rerun in (1, 2):  # a second run over the first one's files must work too
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"run {rerun}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
