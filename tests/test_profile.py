"""``coembed train --profile``: FLOPs, achieved rate and MFU of real training steps."""

from __future__ import annotations

import json

from tests.helpers import run_cli, tiny_dataset, train_args


def test_profile_reports_flops_and_mfu(tmp_path):
    data = tiny_dataset(tmp_path / "data", n=48)
    out = tmp_path / "run"
    proc = run_cli(*train_args(data, out, "--profile", steps=20, batch=8))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MFU" in proc.stdout
    result = json.loads((out / "profile.json").read_text())
    assert result["step_gflop"] > 0 and result["matmul_peak_gflops"] > 0
    assert 0 < result["mfu"] < 2  # a fraction of the measured rate (noisy machines can exceed 1)
    assert result["samples_per_second"] > 0
    assert "aten::" in (out / "profile.txt").read_text()
    # Profiling measures; it does not leave a training run behind to resume.
    assert not (out / "checkpoints").exists()
