"""Shared fixtures: an isolated plan cache per test, small symbols and training helpers."""
from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own plan cache directory and a fresh in-process cache table."""
    directory = tmp_path / "plan-cache"
    monkeypatch.setenv("MXNET_MIRROR_HOOK_CACHE_DIR", str(directory))
    try:
        from mxnet_mirror_hook import cache
    except ImportError:  # core-only environments
        yield directory
        return
    monkeypatch.setattr(cache, "_CACHES", {})
    yield directory
