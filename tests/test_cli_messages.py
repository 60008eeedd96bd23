"""What `tierflow train` shows and says: a progress bar readable at 80 and 120 columns,
errors in the command's own terms (flags, not Python keywords), a read-only file system
told apart from a permission problem, a bad JSONL line with its line and column, an
interrupt that names the checkpoint to resume from, and singular/plural in the summary."""
from __future__ import annotations

import errno
import os
import re
import types
from pathlib import Path

import pytest
from rich.console import Console

import tierflow
import tierflow.cli.train as cli_train
from tierflow.cli import progress
from tierflow.cli.main import EXIT_ERROR, main
from tierflow.cli.messages import for_cli
from tierflow.errors import NvmeError, os_problem

from conftest import SMALL_UNITS, cli_train_flags, open_files_under


@pytest.fixture
def flags(tmp_path):
    return cli_train_flags(tmp_path)


def _files(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ---------------------------------------------------------------------------- 1. progress bar

class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("width", [80, 120])
def test_progress_bar_keeps_step_count_eta_and_loss_whole(width):
    clock = Clock()
    console = Console(width=width, record=True, force_terminal=True, color_system=None)
    bar = progress.progress_bar(console, get_time=clock, auto_refresh=False)
    task = bar.add_task("train", total=300, completed=0, loss="", info="")
    for _ in range(7):  # 7 steps of 12.5 s: 293 left, ETA 1:01:02
        clock.now += 12.5
        loss, info = progress.step_info(5.1234, 1.23, 12345, 12.5, {"nvme_read": 123 << 20, "nvme_written": 45 << 20,
                                                                    "host_to_device": 1 << 30, "device_to_host": 1})
        bar.update(task, advance=1, loss=loss, info=info)
    console.print(bar.make_tasks_table(bar.tasks))
    line = console.export_text().strip()
    assert len(line) <= width and "\n" not in line, line
    assert "7/300 steps" in line, line
    assert re.search(r"eta 1:01:0\d", line), line  # the ETA, whole
    assert "0:01:27" in line, line  # elapsed
    assert "loss 5.1234" in line, line
    assert "…" not in line.split("loss 5.1234")[0], f"only the details may be shortened: {line}"


def test_progress_bar_in_a_real_run_at_80_columns(flags):
    console = Console(width=80, record=True, force_terminal=True, color_system=None)
    args = cli_train.TrainArgs.from_namespace(_namespace(flags))
    cli_train.train(args, console=console)
    text = console.export_text()
    assert "4/4 steps" in text and re.search(r"eta \d+:\d\d:\d\d", text), text
    assert "mean over 4 steps" in text


def _namespace(argv):
    from tierflow.cli.main import build_parser

    return build_parser().parse_args(argv)


# ---------------------------------------------------------------------------- 6. singular / plural

def test_summary_says_one_step_not_one_steps():
    result = cli_train.TrainResult(losses=[2.5], step_seconds=[0.5], tokens=64, io_per_step={},
                                   peaks={"device": (1 << 20, 2 << 20)})
    console = Console(width=120, record=True)
    console.print(progress.summary_table(result))
    text = console.export_text()
    assert "mean over 1 step" in text and "1 steps" not in text, text
    assert progress.plural(1, "step") == "1 step" and progress.plural(0, "step") == "0 steps"


# ---------------------------------------------------------------------------- 2. flags, not keywords

def test_keywords_become_flags_of_the_command():
    options = {"device_memory": 1, "host_memory": 1, "nvme": 1, "unit_bytes": 1, "activations": 1}
    assert for_cli("raise device_memory to at least 1 MiB, or pass a smaller unit_bytes", options) == \
        "raise --device-memory to at least 1 MiB, or pass a smaller --unit-bytes"
    assert for_cli("does not fit; raise host_memory by 2 MiB, or pass nvme=DIR to spill to disk", options) == \
        "does not fit; raise --host-memory by 2 MiB, or pass --nvme DIR to spill to disk"
    assert for_cli("device_memory=16.0 KiB is too small", options) == "--device-memory 16.0 KiB is too small"
    assert for_cli("use activations='offload' instead", options) == "use --activations offload instead"
    # Keywords the command has no flag for, paths and quoted names are left alone.
    assert for_cli("placement='nvme' needs pass a smaller chunk_bytes", options) == \
        "placement='nvme' needs pass a smaller chunk_bytes"
    assert for_cli("cannot read /x/unit_bytes.txt", options) == "cannot read /x/unit_bytes.txt"


def test_train_errors_name_flags(flags, tmp_path, capsys):
    before = _files(tmp_path)
    argv = [f if f != "3MiB" else "16KiB" for f in flags]
    assert main(argv) == EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("tierflow: error: ") and "\n" not in err, err
    assert "--device-memory" in err and "--unit-bytes" in err, err
    assert "device_memory" not in err and "unit_bytes" not in err, err
    assert _files(tmp_path) == before, "nothing may change on disk"

    argv = flags[:flags.index("--nvme")] + ["--nvme", "none", "--host-memory", "64KiB"]
    argv = [a for i, a in enumerate(argv) if not (a == "4MiB" or (a == "--host-memory" and argv[i + 1] == "4MiB"))]
    assert main(argv) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "--host-memory" in err and "--nvme DIR" in err and "nvme=" not in err, err

    assert main(flags + ["--unit-bytes", "12 parsecs"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "--unit-bytes" in err and "12 parsecs" in err, err


@pytest.mark.parametrize("flag", ["--lr", "--clip", "--weight-decay"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_train_refuses_values_that_are_not_finite(flags, tmp_path, capsys, flag, value):
    """argparse reads "nan" and "inf" as floats: --lr inf trained to NaN weights, --clip nan
    turned clipping off without a word."""
    before = _files(tmp_path)
    assert main(flags + [flag, value]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert f"{flag} {value}" in err and "not a finite number" in err, err
    assert _files(tmp_path) == before, "nothing may change on disk"


def test_train_refuses_a_negative_weight_decay(flags, capsys):
    assert main(flags + ["--weight-decay", "-0.1"]) == EXIT_ERROR
    assert "--weight-decay must be >= 0" in capsys.readouterr().err


def test_unit_bytes_flag_reaches_the_engine(flags, monkeypatch):
    seen = {}
    real = tierflow.offload

    def spy(model, **kwargs):
        seen.update(kwargs)
        return real(model, **kwargs)

    monkeypatch.setattr(tierflow, "offload", spy)
    assert main([f if f != "4" else "1" for f in flags] + ["--unit-bytes", "64KiB"]) == 0
    assert seen["unit_bytes"] == "64KiB"


def test_plan_reports_in_flag_terms(capsys, monkeypatch):
    from tierflow.bench import calibrate
    from test_plan import fake_calibration

    monkeypatch.setattr(calibrate, "get_calibration", lambda *a, **k: (fake_calibration(), True))
    assert main(["plan", "--model", "llama-tiny", "--device-memory", "16KiB"]) == 1
    out = capsys.readouterr().out
    assert "--device-memory" in out and "device_memory" not in out, out


def test_unparseable_budget_names_the_flag(flags, capsys):
    argv = flags[:flags.index("--device-memory")] + ["--device-memory", "1e9"] + flags[flags.index("3MiB") + 1:]
    assert main(argv) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "--device-memory: cannot parse size '1e9'" in err, err


def test_plan_json_into_a_missing_directory_fails_before_planning(tmp_path, capsys, monkeypatch):
    """It used to plan (and calibrate) first, then end in a FileNotFoundError traceback."""
    from tierflow.bench import calibrate

    monkeypatch.setattr(calibrate, "get_calibration", lambda *a, **k: pytest.fail("planned before the check"))
    target = tmp_path / "missing" / "plan.json"
    assert main(["plan", "--model", "llama-tiny", "--json", str(target)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert f"--json {target}" in err and "does not exist" in err, err


def test_resume_from_an_empty_latest_file_names_it(tmp_path, capsys):
    """An empty `latest` named the directory itself: a RecursionError."""
    (tmp_path / "latest").write_text("\n")
    assert main(["train", "--resume", str(tmp_path)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert f"{tmp_path / 'latest'} names no checkpoint" in err, err


# ---------------------------------------------------------------------------- 3. read-only vs permission

def _read_only_under(monkeypatch, root: Path):
    real = os.statvfs

    def statvfs(path):
        st = real(path)
        fields = {name: getattr(st, name) for name in dir(st) if name.startswith("f_")}
        if Path(path).absolute().is_relative_to(root):
            fields["f_flag"] |= os.ST_RDONLY
        return types.SimpleNamespace(**fields)

    monkeypatch.setattr(os, "statvfs", statvfs)


def test_read_only_nvme_directory_is_not_called_a_permission_problem(tmp_path, monkeypatch, spill_io):
    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only_under(monkeypatch, ro)
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as the kernel answers on a read-only mount
    with pytest.raises(NvmeError) as info:
        tierflow.offload(_small_model(), nvme=ro, placement="nvme", **SMALL_UNITS)
    message = str(info.value)
    assert f"the file system at {ro} is read-only" in message and "permission" not in message, message
    assert info.value.errno == errno.EROFS
    assert not any(ro.iterdir()) and spill_io["writes"] == 0 and not open_files_under(ro)


def test_nvme_directory_that_cannot_be_created_on_a_read_only_file_system(tmp_path, monkeypatch):
    def mkdir(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(NvmeError, match="read-only") as info:
        tierflow.offload(_small_model(), nvme=tmp_path / "spill", placement="nvme", **SMALL_UNITS)
    assert "permission" not in str(info.value)


def test_os_problem_tells_read_only_permission_and_full_apart(tmp_path, monkeypatch):
    denied = OSError(errno.EACCES, "Permission denied", str(tmp_path))
    assert os_problem(denied) == f"permission denied on {tmp_path} (fix its permissions)"
    assert os_problem(OSError(errno.EROFS, "Read-only file system"), tmp_path) == \
        f"the file system at {tmp_path} is read-only"
    assert "disk is full" in os_problem(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    _read_only_under(monkeypatch, tmp_path)
    assert os_problem(denied) == f"the file system at {tmp_path} is read-only"  # EACCES on a read-only mount


def test_train_output_on_a_read_only_file_system_fails_before_any_work(flags, tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only_under(monkeypatch, ro)
    monkeypatch.setattr(cli_train, "_start", lambda *a: pytest.fail("no model may be built"))
    assert main(flags + ["--output", str(ro / "ckpt")]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert f"the file system at {ro} is read-only" in err and "permission" not in err, err
    assert not any(ro.iterdir())


def test_train_output_without_permission_says_so(flags, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    monkeypatch.setattr(cli_train, "_start", lambda *a: pytest.fail("no model may be built"))
    assert main(flags + ["--output", str(tmp_path / "ckpt")]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "permission denied" in err and "read-only" not in err, err


def _small_model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 64))


# ---------------------------------------------------------------------------- 4. JSONL line and column

def test_bad_jsonl_line_names_file_line_and_column(flags, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n\n{"text": "ok", oops}\n')
    argv = flags[:]
    argv[argv.index("--data") + 1] = str(data)
    assert main(argv) == EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert f"{data}:3:16:" in err and "line 3, column 16" in err and "\n" not in err, err


# ---------------------------------------------------------------------------- 5. interrupt

def _interrupt_at(monkeypatch, at_step):
    real = cli_train._step

    def step(engine, opt, batches, args, device, step):
        if step == at_step:
            raise KeyboardInterrupt
        return real(engine, opt, batches, args, device, step)

    monkeypatch.setattr(cli_train, "_step", step)


def test_interrupt_names_the_last_checkpoint_and_how_to_resume(flags, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _interrupt_at(monkeypatch, 4)
    assert main(flags + ["--output", str(out), "--save-every", "2"]) == 130
    err = capsys.readouterr().err.strip()
    assert str(out / "step-2") in err and f"tierflow train --resume {out}" in err and "\n" not in err, err


def test_interrupt_without_checkpoints_says_how_to_get_them(flags, monkeypatch, capsys):
    _interrupt_at(monkeypatch, 2)
    assert main(flags) == 130
    err = capsys.readouterr().err
    assert "no checkpoint was saved" in err and "--output DIR" in err and "--save-every" in err, err
