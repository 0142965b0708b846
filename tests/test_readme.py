"""The README's Python examples run as written."""

import pathlib
import re
import subprocess
import sys

README = (pathlib.Path(__file__).parent.parent / "README.md").read_text()


def test_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_quickstart_one_liners_run():
    commands = re.findall(r'^python -c "(.*)"$', README, re.M)
    assert commands
    for command in commands:
        subprocess.run([sys.executable, "-c", command], check=True, timeout=300)
