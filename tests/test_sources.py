"""pmf prepare-data from a Hugging Face datasets folder (parquet, arrow), an EDM2 zip and WebDataset tar shards: the
same images as a class-folder source give the same shards (pixels, labels, order), through the same crop."""

import io
import json
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from pmf.data.prepare import prepare_data
from pmf.data.sources import SourceOptions, index_source
from pmf.errors import PmfError

CLASSES = ["cat", "dog", "eel"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """{relative path: encoded bytes}: 3 classes x 3 images of odd sizes and modes (RGB, L, RGBA), PNG and JPEG, in
    class-folder order; plus the class folder itself."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("folder")
    files = {}
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i, (h, w, mode, fmt) in enumerate([(13, 10, "RGB", "PNG"), (9, 16, "L", "PNG"), (20, 20, "RGBA", "PNG"),
                                               (12, 15, "RGB", "JPEG")][: 3 + (c == 1)]):
            channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
            arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8).squeeze()
            buf = io.BytesIO()
            Image.fromarray(arr, mode).save(buf, fmt)
            rel = f"{name}/img{i}.{'png' if fmt == 'PNG' else 'jpg'}"
            (root / rel).write_bytes(buf.getvalue())
            files[rel] = buf.getvalue()
    return root, files


def _label(rel):
    return CLASSES.index(rel.split("/")[0])


def _shards(out):
    m = json.loads((out / "dataset.json").read_text())
    x = np.concatenate([np.load(out / s["images"]) for s in m["shards"]])
    y = np.concatenate([np.load(out / s["labels"]) for s in m["shards"]])
    return m, x, y


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "shards"
    prepare_data(images[0], out, 8, shard_size=4, quiet=True)
    return _shards(out)


def _check_same(source, tmp_path, reference, options=SourceOptions()):
    out = tmp_path / "shards"
    m = prepare_data(source, out, 8, shard_size=4, quiet=True, source_options=options)
    _, x, y = _shards(out)
    ref_m, ref_x, ref_y = reference
    assert np.array_equal(y, ref_y) and np.array_equal(x, ref_x)
    assert m["num_images"] == ref_m["num_images"] and len(m["shards"]) == len(ref_m["shards"])
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix == ".npy"}
    again = prepare_data(source, out, 8, shard_size=4, quiet=True, source_options=options)  # resumes: keeps all
    assert again == m and before == {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix == ".npy"}
    return m


def test_parquet_with_class_names(images, tmp_path, reference):
    """A Hub snapshot layout (data/train-*.parquet + a validation file that must not be read), the Image feature's
    {bytes, path} struct, ClassLabel names from the datasets metadata."""
    pa = pytest.importorskip("pyarrow", reason="Hugging Face sources need pyarrow: pip install 'pixel-meanflow[data]'")
    import pyarrow.parquet as pq

    _, files = images
    rels = list(files)
    meta = {"info": {"features": {"image": {"_type": "Image"},
                                  "label": {"_type": "ClassLabel", "names": CLASSES}}}}
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

    def table(rs):
        t = pa.table({"image": pa.array([{"bytes": files[r], "path": None} for r in rs], image_type),
                      "label": pa.array([_label(r) for r in rs], pa.int64())})
        return t.replace_schema_metadata({"huggingface": json.dumps(meta)})

    (tmp_path / "hf" / "data").mkdir(parents=True)
    pq.write_table(table(rels[:5]), tmp_path / "hf" / "data" / "train-00000-of-00002.parquet")
    pq.write_table(table(rels[5:]), tmp_path / "hf" / "data" / "train-00001-of-00002.parquet")
    pq.write_table(table(rels[:2]), tmp_path / "hf" / "data" / "validation-00000-of-00001.parquet")
    m = _check_same(tmp_path / "hf", tmp_path, reference)
    assert m["classes"] == CLASSES
    _, val = index_source(tmp_path / "hf", SourceOptions(split="validation"))
    assert len(val.files) == 2


def test_arrow_stream_with_given_columns(images, tmp_path, reference):
    """A save_to_disk / cache .arrow file (IPC stream), plain binary images, columns named on the command line."""
    pa = pytest.importorskip("pyarrow", reason="Hugging Face sources need pyarrow: pip install 'pixel-meanflow[data]'")
    _, files = images
    t = pa.table({"png_bytes": pa.array(list(files.values()), pa.binary()),
                  "fine_label": pa.array([_label(r) for r in files], pa.int32())})
    (tmp_path / "cache").mkdir()
    with pa.OSFile(str(tmp_path / "cache" / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, t.schema) as w:
        w.write_table(t)
    with pytest.raises(PmfError, match="--label-column"):
        index_source(tmp_path / "cache")
    _check_same(tmp_path / "cache", tmp_path, reference, SourceOptions(image_column="png_bytes",
                                                                       label_column="fine_label"))


def test_edm2_zip(images, tmp_path, reference):
    _, files = images
    with zipfile.ZipFile(tmp_path / "ds.zip", "w") as z:
        for rel, data in reversed(list(files.items())):  # member order does not matter
            z.writestr(rel, data)
        z.writestr("dataset.json", json.dumps({"labels": [[rel, _label(rel)] for rel in files]}))
    _check_same(tmp_path / "ds.zip", tmp_path, reference)


def test_webdataset_tar_shards(images, tmp_path, reference):
    _, files = images
    rels = list(files)
    (tmp_path / "wds").mkdir()
    for k, chunk in enumerate([rels[:4], rels[4:]]):
        with tarfile.open(tmp_path / "wds" / f"shard-{k:04d}.tar", "w") as t:
            for rel in chunk:
                key, ext = rel.rsplit(".", 1)
                for name, data in ((f"{key}.{ext}", files[rel]), (f"{key}.cls", str(_label(rel)).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
    _check_same(tmp_path / "wds", tmp_path, reference)
