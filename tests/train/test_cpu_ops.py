"""DeepSpeed's CPU all-reduce op is compiled ahead (``make setup``), where training finds it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import REPO, foreign_ninja_first


def test_cpu_op_is_built_where_training_loads_it():
    out = subprocess.run(
        [sys.executable, "-m", "tuna_ray.train.cpu_ops"],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=1200,
    )  # fmt: skip
    assert "deepspeed.ops.comm.deepspeed_shm_comm_op" in out.stdout, out.stdout + out.stderr
    built = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm"
    assert (built / "deepspeed_shm_comm.so").is_file()


def test_the_op_is_built_and_loaded_with_the_environments_ninja(tmp_path):
    """With another ninja first on PATH (a system one), the op is still built and loaded with
    the environment's: ninja versions record commands differently, and each would compile again
    what the other built (measured: twice in one suite, 19-135 s a build)."""
    import ninja

    path, calls = foreign_ninja_first(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "tuna_ray.train.cpu_ops"],
        cwd=REPO, capture_output=True, text=True, timeout=1200, check=False,
        env={**os.environ, "PATH": path},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert not calls.exists(), calls.read_text()
    built = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm"
    dry_run = subprocess.run(
        [str(Path(ninja.BIN_DIR) / "ninja"), "-n", "-d", "explain"],
        cwd=built, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "no work to do" in dry_run.stdout, dry_run.stdout + dry_run.stderr
