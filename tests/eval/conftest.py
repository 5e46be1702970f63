"""Fixtures of the eval tests: a scripted judge on loopback HTTP (``tuna-ray serve --mode judge``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def length_judge():
    """Scripted judge: the longer answer wins; equal lengths go to the answer shown first."""
    from tuna_ray.serve.local import start_local_server

    with start_local_server(mode="judge", judge_rule="length", served_model_name="judge") as s:
        yield s
