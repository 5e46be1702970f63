"""The run's own record, ``run_dir/manifest.json``: every stage's history across invocations.

Stage: pipeline. A run is often finished in several invocations (Ctrl-C and rerun, a node
lost, a config changed): the record keeps, per stage, every attempt (start, wall time, how it
ended) so that the report can say what really happened -- "ran", "resumed" (finished after an
interrupted or failed attempt, with the time of every attempt), "finished before" (skipped by
this invocation, figures kept), "interrupted", "failed" -- and a rerun that skips everything
never loses a finished run's figures. A stage whose config changed starts a new history.

    {"run_dir", "variant", "status", "created", "updated",
     "invocations": [{"started", "ended", "status"}],
     "stages": {name: {"kind", "output_dir", "digest", "status",
                       "attempts": [{"started", "wall_time_s", "status", "error"}]}}}
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from tuna_ray import storage

FILE = "manifest.json"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class RunLog:
    """Load, update and save ``run_dir/manifest.json`` (written after every change)."""

    def __init__(self, run_dir: str, variant: str, stages):
        self.path = storage.join(run_dir, FILE)
        old = storage.read_json(self.path) if storage.exists(self.path) else {}
        self.data = {
            "run_dir": run_dir,
            "variant": variant,
            "created": old.get("created", _now()),
            "invocations": list(old.get("invocations", [])),
            "stages": {},
        }
        before = old.get("stages", {})
        for stage in stages:
            prev = before.get(stage.name)
            if prev is None or prev.get("digest") != stage.digest:
                prev = {"status": "pending", "attempts": []}  # new, or its config changed
            self.data["stages"][stage.name] = {
                **prev,
                "kind": stage.kind,
                "output_dir": stage.output_dir,
                "digest": stage.digest,
            }
        self.data["invocations"].append({"started": _now(), "ended": None, "status": "running"})
        self._t0: dict[str, float] = {}
        self.save()

    def stage(self, name: str) -> dict:
        return self.data["stages"][name]

    def started(self, name: str) -> None:
        self._t0[name] = time.time()
        entry = self.stage(name)
        entry["attempts"].append(
            {"started": _now(), "wall_time_s": None, "status": "running", "error": None}
        )
        entry["status"] = "running"
        self.save()

    def ended(self, name: str, status: str, error: str | None = None) -> None:
        """``status``: "ran" | "resumed" | "failed" | "interrupted" (of this attempt)."""
        entry = self.stage(name)
        attempt = entry["attempts"][-1]
        attempt.update(
            wall_time_s=round(time.time() - self._t0.pop(name), 1), status=status, error=error
        )
        earlier = [a for a in entry["attempts"][:-1] if a["status"] != "skipped"]
        if status == "ran" and earlier:
            status = "resumed"  # finished after attempts that did not
        entry["status"] = status
        self.save()

    def skipped(self, name: str) -> None:
        """Finished before: this invocation leaves it (and its figures) as they were."""
        entry = self.stage(name)
        if entry["status"] in ("pending", "running"):
            entry["status"] = "finished before"  # finished by a run this record did not see
        self.save()

    def finish(self, status: str) -> None:
        self.data["invocations"][-1].update(ended=_now(), status=status)
        self.data["status"] = status
        self.save()

    def save(self) -> None:
        self.data["updated"] = _now()
        storage.write_json(self.path, self.data)

    def report_entries(self, reports: dict[str, dict | None]) -> list[dict]:
        """Stage entries for tuna_ray.report: status, total time over every attempt."""
        out = []
        for name, entry in self.data["stages"].items():
            attempts = [a for a in entry["attempts"] if a["wall_time_s"] is not None]
            out.append(
                {
                    "name": name,
                    "kind": entry["kind"],
                    "status": entry["status"],
                    "output_dir": entry["output_dir"],
                    "report": reports.get(name),
                    "wall_time_s": round(sum(a["wall_time_s"] for a in attempts), 1)
                    if attempts
                    else None,
                    "attempts": attempts,
                    "error": next((a["error"] for a in reversed(attempts) if a["error"]), None)
                    if entry["status"] in ("failed", "interrupted")
                    else None,
                }
            )
        return out
