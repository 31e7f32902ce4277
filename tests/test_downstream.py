"""Issue 21: outputs that the tools people use downstream read as they are (webdataset's and timm's conventions)."""

import io
import os

import numpy as np
from PIL import Image


def test_make_shards_names_fields_as_webdataset_and_timm_expect(tmp_path):
    """ImageNet's files end in .JPEG: written as the `jpg` field (the same bytes) that to_tuple("jpg", "cls") and
    timm's tar reader ("jpg;png;webp") find; path.txt keeps the file's own name."""
    import webdataset as wds

    from stage1.cli import make_shards

    rng = np.random.default_rng(0)
    files = {}
    for folder, name, fmt in (("n01", "a.JPEG", "jpeg"), ("n01", "b.jpeg", "jpeg"), ("n02", "c.png", "png"),
                              ("n02", "d.TIFF", "tiff")):
        os.makedirs(tmp_path / "data" / folder, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, format=fmt)
        (tmp_path / "data" / folder / name).write_bytes(buffer.getvalue())
        files[f"{folder}/{name}"] = buffer.getvalue()
    assert make_shards.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "shards"),
                             "--shard-size", "10"]) == 0
    samples = list(wds.WebDataset(str(tmp_path / "shards" / "000000.tar"), shardshuffle=False, empty_check=False)
                   .to_tuple("jpg;png;tif", "cls", "path.txt"))
    assert [(path.decode(), int(cls)) for _, cls, path in samples] == [
        ("n01/a.JPEG", 0), ("n01/b.jpeg", 0), ("n02/c.png", 1), ("n02/d.TIFF", 1)]
    assert all(image == files[path.decode()] for image, _, path in samples)
