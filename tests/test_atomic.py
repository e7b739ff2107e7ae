"""Atomic writes: the temporary is renamed into place with the mode a plain open() would have given."""
from __future__ import annotations

import os
import stat

import pyarrow as pa
import pytest

from storage.atomic import write_json, write_parquet


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, mask, mode):
    previous = os.umask(mask)
    try:
        paths = [write_json({"a": 1}, tmp_path / "m.json"), write_parquet(pa.table({"x": [1]}), tmp_path / "t.parquet")]
        plain = tmp_path / "plain"
        plain.write_text("x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(plain.stat().st_mode) == mode
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
