"""README's example runs as written, and .ci/run runs README's install and test lines."""
import os
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


def test_train_your_own_model_runs_as_written(data_dir):
    """The "Train your own model" section: a two-tower model with side features trained on Coat with
    BADR through the public API, in at most 40 lines, then the same through the joint learner."""
    section = README.split("## Train your own model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)
    assert len(blocks) == 2 and len(blocks[0].splitlines()) <= 40
    env = {**os.environ, "CVR_DATA_DIR": str(data_dir)}
    out = subprocess.run([sys.executable, "-c", "\n".join(blocks)], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    aucs = dict(re.findall(r"^(validation|test) AUC (\d\.\d+)$", out.stdout, flags=re.M))
    assert set(aucs) == {"validation", "test"} and all(float(v) > 0.7 for v in aucs.values()), out.stdout
    # the prose says what it prints
    assert f"validation AUC {aucs['validation']} and test AUC {aucs['test']}" in section
    assert re.search(r"^\d+ epochs, last prediction loss \d", out.stdout, flags=re.M), out.stdout


def test_readme_gives_three_command_lines_used_by_ci():
    block = re.search(r"^```bash\n(.*?)^```$", README, flags=re.S | re.M).group(1).splitlines()
    assert len(block) == 3
    install, test, main_job = block
    assert "torch==2.13.0" in install and "--no-build-isolation" in install
    assert test == "pytest"
    assert main_job.startswith("python -m reproduce table3")
    ci = (REPO / ".ci" / "run").read_text()
    assert "README.md" in ci and "sed -n 1p" in ci and "sed -n 2p" in ci


def test_readme_section_examples_run():
    """The examples of the "Entire-space losses" and "Propensity-free losses" sections run as written."""
    for title, expect in (("### Entire-space losses", r"^escm2_badr loss \d"),
                          ("### Propensity-free losses", r"^damf: \d+ epochs, factual loss \d\.\d{4}$")):
        section = README.split(title, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
        block = re.findall(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)[0]
        out = subprocess.run([sys.executable, "-c", block], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert re.search(expect, out.stdout, flags=re.M), out.stdout


def test_distributed_section_runs(data_dir, tmp_path):
    """The "Distributed training" command, as written but for one epoch and a free port: one row, world_size 2."""
    import socket

    from reproduce.table import read_results

    section = README.split("## Distributed training", 1)[1].split("\n## ", 1)[0]
    line = re.search(r"^```bash\n(.*?)\n```$", section, flags=re.S | re.M).group(1)
    argv = line.split()
    assert argv[:3] == ["torchrun", "--nproc-per-node", "2"] and argv[argv.index("--out") + 1] == "results-ddp"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "torch.distributed.run", "--master-port", str(port), *argv[1:]]
    argv[argv.index("--out") + 1] = str(tmp_path / "out")
    env = {**os.environ, "CVR_DATA_DIR": str(data_dir), "PYTHONPATH": str(REPO)}
    out = subprocess.run(argv + ["--max-epochs", "1"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_results(tmp_path / "out" / "results.csv")
    assert [(r["dataset"], r["method"], r["world_size"]) for r in rows] == [("coat", "badr", 2)]
