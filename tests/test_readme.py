"""The README's two commands, `.ci/run`, and the `tierflow` command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The non-empty, non-comment lines of the README's first code block."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    assert match, "README.md has no code block"
    lines = [line.strip() for line in match.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _steps(command: str) -> list[str]:
    """The parts of a `a && b && c` command line."""
    return [part.strip() for part in command.split("&&")]


def _index(steps: list[str], pattern: str) -> int:
    """Index of the first step matching ``pattern``; fails if none does."""
    for i, step in enumerate(steps):
        if re.fullmatch(pattern, step):
            return i
    raise AssertionError(f"no step matches {pattern!r} in {steps}")


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``tierflow ARGS`` in a subprocess, from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env.setdefault("COLUMNS", "160")
    return subprocess.run([sys.executable, "-m", "tierflow", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_readme_first_block_has_exactly_two_commands():
    assert len(readme_commands()) == 2, readme_commands()


def test_first_command_installs_torch_then_project_then_trains():
    steps = _steps(readme_commands()[0])
    torch_at = _index(steps, r"pip install torch==2\.13\.0")
    project_at = _index(steps, r"pip install (-e )?(\.|\"\.\"|'\.')")
    train_at = _index(steps, r"tierflow train")
    assert torch_at < project_at < train_at


def test_second_command_installs_test_extras_and_runs_pytest():
    steps = _steps(readme_commands()[1])
    install_at = _index(steps, r"pip install (-e )?[\"']?\.\[test\][\"']?")
    test_at = _index(steps, r"python -m pytest.*")
    assert install_at < test_at


def test_ci_runs_what_the_readme_says():
    script = (ROOT / ".ci" / "run").read_text()
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
    assert "set -euo pipefail" in script
    lines = [line.strip() for line in script.splitlines()]
    torch_at = lines.index("pip install torch==2.13.0")
    tests_at = lines.index(readme_commands()[1])
    assert torch_at < tests_at


def test_help():
    top = run_cli("--help")
    assert top.returncode == 0, top.stderr
    assert "train" in top.stdout
    train = run_cli("train", "--help")
    assert train.returncode == 0, train.stderr
    for flag in ("--model", "--data", "--device", "--device-memory", "--host-memory", "--nvme", "--dtype",
                 "--steps", "--batch-size", "--seq-len", "--grad-accum", "--lr", "--seed", "--log-every"):
        assert flag in train.stdout


def test_no_command_prints_help_and_fails():
    result = run_cli()
    assert result.returncode == 2
    assert "train" in result.stdout


@pytest.mark.parametrize("args", [
    ["--data", "no/such/file.txt"],
    ["--model", "no-such-model"],
    ["--steps", "0"],
])
def test_bad_input_is_one_line_and_exit_2(args):
    result = run_cli("train", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("tierflow: error:")


def test_train_args_validate():
    from tierflow.cli.train import TrainArgs
    from tierflow.errors import ConfigError

    assert TrainArgs().model == "llama-100m"
    for bad in ({"batch_size": 0}, {"seq_len": 1}, {"lr": 0.0}, {"dtype": "float8"}):
        with pytest.raises(ConfigError):
            TrainArgs(**bad)


def test_lr_schedule_warms_up_then_decays():
    from tierflow.cli.train import _lr_factor

    factors = [_lr_factor(s, warmup=5, total=30) for s in range(30)]
    assert factors[0] == pytest.approx(0.2) and factors[4] == pytest.approx(1.0)
    assert factors[5] == pytest.approx(1.0) and min(factors) >= 0.1
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))


def test_train_smoke_tiny_with_nvme(tmp_path):
    nvme = tmp_path / "nvme"
    result = run_cli("train", "--model", "llama-tiny", "--steps", "3", "--seq-len", "32",
                     "--device", "cpu", "--device-memory", "3MiB", "--host-memory", "3MiB",
                     "--nvme", str(nvme), "--log-every", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "placement" in out and "summary" in out
    assert "step 3/3" in out
    assert re.search(r"loss\W+[\d.]+ \(step 1\) -> [\d.]+ \(step 3\)", out), out
    assert f"NVMe tier: {nvme} (" in out
    spilled = re.search(r"nvme read ([\d.]+) (\w+)", out)
    assert spilled and float(spilled.group(1)) > 0, "the tiny budgets must make state spill to NVMe"
