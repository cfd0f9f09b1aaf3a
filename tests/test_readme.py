"""README's example runs as written, and .ci/run runs README's install and test lines."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_readme_python_example_runs():
    blocks = re.findall(r"^```python\n(.*?)^```$", README, flags=re.S | re.M)
    assert blocks, "README.md has no python example"
    out = subprocess.run([sys.executable, "-c", blocks[0]], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "gradient finite: True" in out.stdout


def test_readme_gives_three_command_lines_used_by_ci():
    block = re.search(r"^```bash\n(.*?)^```$", README, flags=re.S | re.M).group(1).splitlines()
    assert len(block) == 3
    install, test, main_job = block
    assert "torch==2.13.0" in install and "--no-build-isolation" in install
    assert test == "pytest"
    assert main_job.startswith("python -m reproduce table3")
    ci = (REPO / ".ci" / "run").read_text()
    assert "README.md" in ci and "sed -n 1p" in ci and "sed -n 2p" in ci
