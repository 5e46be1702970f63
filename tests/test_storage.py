"""Run storage: writability checked up front, filesystem faults named in one line, S3 round trip.

Tests run as root, for whom permission bits stop nothing. Locations that really fail for root:
a path under a regular file (ENOTDIR), sysfs (the kernel refuses new entries: EPERM), an
immutable folder (``chattr +i``: EPERM, where the filesystem supports it), /dev/full (ENOSPC)
and a file-size limit (RLIMIT_FSIZE: EFBIG, the kernel's "no room" for one process).
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO, run_cli
from tuna_ray import storage
from tuna_ray.data import parts


def _under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "plain-file").write_text("x")
    return tmp_path / "plain-file" / "run"


def test_check_writable_creates_the_folder_and_leaves_nothing(tmp_path):
    target = tmp_path / "a" / "b"
    storage.check_writable(str(target))
    assert target.is_dir() and list(target.iterdir()) == []


@pytest.mark.parametrize(
    "where, reason",
    [("under_file", "Not a directory"), ("sysfs", "Operation not permitted")],
)
def test_check_writable_names_location_and_reason(tmp_path, where, reason):
    if where == "sysfs" and not Path("/sys/kernel").is_dir():
        pytest.skip("no sysfs here")
    target = str(_under_a_file(tmp_path)) if where == "under_file" else "/sys/tuna-ray-test-run"
    with pytest.raises(storage.StorageError) as err:
        storage.check_writable(target)
    assert str(err.value) == f"cannot write to {target}: {reason}"


def test_immutable_folder_is_read_only_even_for_root(tmp_path):
    target = tmp_path / "frozen"
    target.mkdir()
    if shutil.which("chattr") is None:
        pytest.skip("no chattr")
    frozen = subprocess.run(["chattr", "+i", str(target)], capture_output=True, check=False)
    if frozen.returncode != 0:
        pytest.skip("this filesystem has no immutable flag")
    try:
        with pytest.raises(storage.StorageError, match="Operation not permitted"):
            storage.check_writable(str(target / "run"))
    finally:
        subprocess.run(["chattr", "-i", str(target)], check=True)


def test_disk_full_is_one_named_error():
    with pytest.raises(storage.StorageError) as err:  # noqa: SIM117 (the point is the nesting)
        with storage.named_errors("write", "/dev/full"), open("/dev/full", "wb") as f:
            f.write(b"x" * 10000)
            f.flush()
    assert str(err.value) == "cannot write /dev/full: No space left on device"


_WRITE_BIG_PART = """
import os
import sys
from tuna_ray import storage
from tuna_ray.data import parts
storage.check_writable(sys.argv[1])  # a tiny probe fits
try:
    rows = [{"id": str(i), "text": os.urandom(100).hex()} for i in range(2000)]  # ~400 KB
    parts.write_part(sys.argv[1], rows, [])
except storage.StorageError as exc:
    print(exc)
"""


def test_file_size_limit_mid_run_names_the_part(tmp_path):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    out = tmp_path / "stage"
    proc = subprocess.run(
        [sys.executable, "-c", _WRITE_BIG_PART, str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith(f"cannot write {out / 'parts'}/part-") and line.endswith(
        ".parquet: File too large"
    ), line


def test_cli_reports_an_unwritable_output_in_one_line_before_any_work(tmp_path):
    target = _under_a_file(tmp_path)
    proc = run_cli(
        "rank-probabilistic",
        "--config",
        "jobs/configs/rank-probabilistic-tiny.yaml",
        f"output_dir={target}",
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"tuna-ray rank-probabilistic: error: cannot write to {target}: Not a directory"
    )
    assert "Traceback" not in proc.stderr and "starting a local Ray" not in proc.stderr


def test_train_checks_its_run_dir_before_ray(tmp_path):
    storage_path = _under_a_file(tmp_path)
    proc = run_cli(
        "train",
        "--config",
        "jobs/configs/train-tiny-cpu.yaml",
        f"run.storage_path={storage_path}",
        "run.name=r",
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"tuna-ray train: error: cannot write to {storage_path}/r: Not a directory"
    )
    assert "starting a local Ray" not in proc.stderr


def test_pipeline_checks_run_dir_first(tmp_path):
    run_dir = "/sys/tuna-ray-test-run"
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no sysfs here")
    proc = run_cli("run", "--config", "jobs/configs/tiny-cpu.yaml", f"run_dir={run_dir}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"tuna-ray run: error: cannot write to {run_dir}: Operation not permitted"
    )
    assert "starting embedded server" not in proc.stderr


def test_stale_tmp_parts_are_removed_on_resume(tmp_path):
    from tuna_ray.ranking.runner import claim_output_dir

    out = tmp_path / "stage"
    parts.write_part(str(out), [{"id": "a"}], [{"id": "b", "reason": "timeout"}])
    (out / "parts" / "part-dead.parquet.1234abcd.tmp").write_bytes(b"half a parquet")
    (out / "failures" / "part-dead.jsonl.1234abcd.tmp").write_text('{"id": ')
    claim_output_dir(str(out), "hash1")
    assert not list(out.rglob("*.tmp"))
    assert parts.finished_ids(str(out)) == {"a"}  # finished parts stay


def test_config_change_keeps_lease_and_cache(tmp_path):
    from tuna_ray.ranking.runner import claim_output_dir

    out = tmp_path / "stage"
    claim_output_dir(str(out), "hash1")
    parts.write_part(str(out), [{"id": "a"}], [])
    (out / "cache").mkdir()
    (out / "cache" / "part-1.jsonl").write_text("{}\n")
    (out / "_lease.json").write_text("{}")
    claim_output_dir(str(out), "hash2")
    assert sorted(p.name for p in out.iterdir()) == ["_lease.json", "cache", "config_hash.txt"]
    assert (out / "config_hash.txt").read_text().strip() == "hash2"


def test_helpers_round_trip_on_s3(s3_server):
    root = s3_server.new_bucket() + "/run"
    storage.check_writable(root)
    storage.write_json(storage.join(root, "a", "m.json"), {"x": 1})
    parts.write_part(storage.join(root, "stage"), [{"id": "a"}, {"id": "b"}], [])
    assert storage.read_json(storage.join(root, "a", "m.json")) == {"x": 1}
    assert parts.finished_ids(storage.join(root, "stage")) == {"a", "b"}
    assert [k for k in s3_server.keys(root) if k.endswith(".tmp") or "probe" in k] == []
    assert [f[0] for f in storage.walk_files(storage.join(root, "a"))] == ["m.json"]
    storage.delete_contents(root, keep=("a",))
    assert s3_server.keys(root) == ["a/m.json"]


def test_a_changed_training_config_starts_its_run_over_on_s3(s3_server):
    """What a pipeline rerun with a changed train_p/train_c section does to that stage's run
    directory in the bucket (the pipeline's train stages use ``on_config_change: restart``):
    the same config finds the finished run, a changed one empties the folder but for the lease
    the rerun holds, and ``error`` refuses, naming the folder."""
    from tuna_ray.train.trainer import _check_run_dir

    run_dir = s3_server.new_bucket() + "/runs/tiny/train_c"
    storage.write_text(storage.join(run_dir, "train_config_hash.txt"), "old\n")
    storage.write_json(storage.join(run_dir, "train_report.json"), {"total_steps": 3})
    for key in ("hf_model/model.safetensors", "checkpoint_step0000002/ckpt/x.pt", "_lease.json"):
        storage.write_text(storage.join(run_dir, key), "x")

    assert _check_run_dir(run_dir, "old", "restart") == {"total_steps": 3}
    with pytest.raises(ValueError, match=f"^{run_dir} holds a run with a different training"):
        _check_run_dir(run_dir, "new", "error")
    assert len(s3_server.keys(run_dir)) == 5  # refused: nothing removed
    assert _check_run_dir(run_dir, "new", "restart") is None
    assert s3_server.keys(run_dir) == ["_lease.json"]


def test_unreachable_bucket_is_a_named_error(s3_server):
    missing = "s3://no-such-bucket-here/run"
    with pytest.raises(storage.StorageError, match="^cannot write to s3://no-such-bucket-here/run"):
        storage.check_writable(missing)


def test_node_cache_dir_is_configurable(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNA_RAY_NODE_CACHE", str(tmp_path / "n"))
    assert storage.node_cache_dir() == tmp_path / "n"
    monkeypatch.delenv("TUNA_RAY_NODE_CACHE")
    monkeypatch.setenv("TUNA_RAY_CACHE", str(tmp_path / "c"))
    assert storage.node_cache_dir() == tmp_path / "c" / "node"
    assert os.environ["TUNA_RAY_CACHE"]  # untouched otherwise
