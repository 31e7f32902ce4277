import json
import os

import pytest

from stage1.base.atomic import atomic_path, write_json


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


def test_outputs_get_the_mode_a_plain_write_gives(tmp_path):
    """Issue 12, case 10: temporaries are 0600 / 0700 and the mode survived the rename; outputs follow the umask."""
    import stat

    from stage1.train.checkpoint import write_checkpoint

    old = os.umask(0o022)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        expected_file = stat.S_IMODE(plain.stat().st_mode)
        write_json(tmp_path / "a.json", {})
        target = tmp_path / "b.json"
        target.write_text("{}")
        os.chmod(target, 0o644)
        write_json(target, {"over": "written"})  # overwriting keeps the plain mode, not 0600
        step = write_checkpoint(str(tmp_path / "ckpt"), 1, lambda d: write_json(os.path.join(d, "s.json"), {}))
        os.mkdir(tmp_path / "plain_dir")
        expected_dir = stat.S_IMODE((tmp_path / "plain_dir").stat().st_mode)
    finally:
        os.umask(old)
    assert expected_file == 0o644 and expected_dir == 0o755
    for path in (tmp_path / "a.json", target, os.path.join(step, "s.json")):
        assert stat.S_IMODE(os.stat(path).st_mode) == expected_file, path
    assert stat.S_IMODE(os.stat(step).st_mode) == expected_dir
