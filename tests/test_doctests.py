"""The examples in docstrings run: every tuna_ray module's doctests, as the docs show them."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import tuna_ray

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(tuna_ray.__path__, "tuna_ray.")
    if not m.name.startswith("tuna_ray.__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
