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


def test_a_failed_write_names_the_file_and_leaves_nothing(tmp_path):
    from storage.atomic import atomic_path

    target = tmp_path / "tokens.parquet"
    with pytest.raises(OSError, match="writing .*tokens.parquet: .*No space left on device") as info:
        with atomic_path(target):
            raise OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    assert info.value.errno == 28
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):  # the errno's subclass survives
        with atomic_path(target):
            raise FileNotFoundError(2, "gone")
