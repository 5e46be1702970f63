"""Progress lines: records done, rate and ETA when something changed; a heartbeat in silence."""

from __future__ import annotations

import logging
import time

from tuna_ray.progress import RecordProgress, duration


def test_duration_reads_like_a_person_would_say_it():
    assert (
        duration(9.6) == "10 s" and duration(75) == "1 min 15 s" and duration(3600) == "60 min 00 s"
    )


def test_lines_count_records_rate_and_eta_and_never_repeat(caplog):
    caplog.set_level(logging.INFO, logger="tuna_ray")
    with RecordProgress("teacher", total=10, before=2, heartbeat_s=60) as progress:
        progress.add(0)  # nothing new: no line
        time.sleep(0.2)
        progress.add(4)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == (
        "teacher: 8 of 10 records to do; the first results come once the engines have started"
    )
    assert len(lines) == 2 and lines[1].startswith("teacher: 6/10 records (60%) | ")
    rate = float(lines[1].split("| ")[1].split(" records/s")[0])
    assert 0 < rate <= 4 / 0.2  # 4 new records in at least 0.2 s; the 2 done before not counted
    assert "ETA" in lines[1]


def test_a_silent_stage_says_it_is_still_running_once_per_heartbeat(caplog):
    caplog.set_level(logging.INFO, logger="tuna_ray")
    with RecordProgress("sample", total=4, heartbeat_s=0.3):
        time.sleep(1.0)
    beats = [r.getMessage() for r in caplog.records if "still running" in r.getMessage()]
    assert 2 <= len(beats) <= 3, beats  # one per 0.3 s of silence, not a flood
    assert beats[0].startswith("sample: 0/4 records (0%): still running, the engines are starting")
