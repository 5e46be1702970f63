"""DeepSpeed's CPU all-reduce op is compiled ahead (``make setup``), where training finds it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import REPO


def test_cpu_op_is_built_where_training_loads_it():
    out = subprocess.run(
        [sys.executable, "-m", "tuna_ray.train.cpu_ops"],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=1200,
    )  # fmt: skip
    assert "deepspeed.ops.comm.deepspeed_shm_comm_op" in out.stdout, out.stdout + out.stderr
    built = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm"
    assert (built / "deepspeed_shm_comm.so").is_file()
