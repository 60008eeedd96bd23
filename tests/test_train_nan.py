"""`tierflow train` stops at the first non-finite loss or gradient norm: a one-line error
naming the step, exit status 2, and the last good checkpoint left as it was."""
from __future__ import annotations

import pytest
from safetensors.torch import load_file

from tierflow.checkpoint import verify
from tierflow.cli.main import EXIT_ERROR, main

from conftest import cli_train_flags


@pytest.fixture
def flags(tmp_path):
    return cli_train_flags(tmp_path, "--lr", "1e30")


def test_diverging_run_stops_before_saving_the_bad_step(flags, tmp_path, capsys):
    """lr 1e30: step 1 is finite, and its update makes step 2's gradients NaN (the loss is still
    finite). Step 2 must be neither applied nor saved."""
    out = tmp_path / "out"
    assert main(flags + ["--save-every", "1", "--output", str(out)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("tierflow: error: training diverged at step 2") and "nan" in err, err
    assert "--lr" in err and str(out / "step-1") in err, err
    assert sorted(p.name for p in out.iterdir()) == ["latest", "step-1"]
    assert (out / "latest").read_text().strip() == "step-1"
    verify(out / "step-1")  # complete, checksums match
    master = load_file(out / "step-1" / "master.safetensors")
    assert all(bool(t.isfinite().all()) for t in master.values())


def test_nan_loss_stops_the_run_without_clipping(flags, capsys):
    """--clip 0: the CLI computes no gradient norm; the engine skips the step whose gradients are
    not finite and the next opt.step() stops the run (or a NaN loss does)."""
    assert main(flags + ["--clip", "0"]) == EXIT_ERROR
    err = capsys.readouterr().err
    step = int(err.split("training diverged at step ")[1].split(":")[0])
    assert 1 <= step <= 4 and ("the loss is nan" in err or "not finite" in err), err
    assert "check the data" in err and "float32" in err


def test_finite_run_exits_zero(flags, capsys):
    assert main([f if f != "1e30" else "1e-3" for f in flags]) == 0
    assert "diverged" not in capsys.readouterr().err
