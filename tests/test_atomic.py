import json
import os

import pytest

from stage1.atomic import atomic_path, write_json


def test_write_json_replaces_the_file_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "state.json"
    write_json(target, {"step": 1})
    write_json(target, {"step": 2})
    assert json.loads(target.read_text()) == {"step": 2}
    assert os.listdir(tmp_path) == ["state.json"]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"good")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"partial")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"good"
    assert os.listdir(tmp_path) == ["weights.bin"]


def test_temporaries_are_hidden_and_marked(tmp_path):
    with atomic_path(tmp_path / "out.png") as tmp:
        name = os.path.basename(tmp)
        assert name.startswith(".out.png.") and name.endswith(".tmp")
        assert os.path.dirname(tmp) == str(tmp_path)  # same folder: the rename is atomic
        open(tmp, "wb").close()
