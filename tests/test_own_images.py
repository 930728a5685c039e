"""README "Bring your own images": a folder of real image files, through the real CLI, to a running server.

train -> eval (codes saved) -> index build (queries held out) -> query / encode -> serve, on a small generated
folder of PNG and JPEG files in three classes, of mixed sizes and modes (grey, RGB, RGBA, palette).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from vdsh.app.cli import app

SHAPES = ("circle", "cross", "square")
MODES = ("L", "RGB", "RGBA", "P")


def draw(shape: str, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A bright shape on a dark background, jittered in place, size and colour."""
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 60, 3)))
    pen, fill = ImageDraw.Draw(image), tuple(int(v) for v in rng.integers(150, 256, 3))
    side = min(width, height)
    m, dx, dy = side // 5, int(rng.integers(-2, 3)), int(rng.integers(-2, 3))
    box = [m + dx, m + dy, side - m + dx, side - m + dy]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.line(box, fill=fill, width=3)
        pen.line([box[0], box[3], box[2], box[1]], fill=fill, width=3)
    return image


def make_image_folder(root: Path, per_class: int = 30, seed: int = 0) -> Path:
    """root/<shape>/<n>.png|jpg: per_class images of each shape, 20-32 px, every mode, some JPEG."""
    rng = np.random.default_rng(seed)
    for shape in SHAPES:
        (root / shape).mkdir(parents=True)
        for i in range(per_class):
            image = draw(shape, int(rng.integers(20, 33)), int(rng.integers(20, 33)), rng).convert(MODES[i % 4])
            suffix = ".jpg" if image.mode in ("L", "RGB") and i % 3 == 0 else ".png"
            image.save(root / shape / f"{i}{suffix}")
    return root


def vdsh(*args: str, ok: bool = True):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, f"vdsh {' '.join(map(str, args))}: {result.output}\n{result.exception!r}"
    return result


@pytest.mark.slow
def test_bring_your_own_images_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "images")
    run = tmp_path / "runs" / "shapes"

    # 1. train: a protocol made on the folder (5 queries per class, training on the rest); a progress bar per step
    trained = vdsh("train", "--protocol", "folder:images", "--queries-per-class", "5", "--train", "all",
                   "--encoder", "small_cnn", "--width", "8", "--epochs", "6", "--bits", "16", "--out", run,
                   "--options", json.dumps({"batch_size": 16}))
    assert "decoding 90 images" in trained.stderr and "epochs" in trained.stderr
    assert "augmentation: none" in trained.stderr, "unknown data gets no augmentation unless asked"
    meta = json.loads((run / "protocol.json").read_text())
    assert meta["counts"] == {"query": 15, "train": 75, "database": 75} and meta["pool_size"] == 90
    assert meta["protocol"]["dataset"] == f"folder:{tmp_path / 'images'}" and meta["image_shape"][0] == 3
    map_all = json.loads(trained.stdout.strip().splitlines()[-1])["map_all"]
    assert map_all > 0.5, f"three shapes should be told apart (mAP@all {map_all:.3f}; chance is about 0.33)"

    # 2. eval on exactly the saved split (found beside the model); the scored codes are written with ids
    vdsh("eval", "--model", run / "model.safetensors", "--save-codes", run / "codes", "--out", run / "eval")
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["n_query"] == 15 and metrics["n_database"] == 75
    assert metrics["metrics"]["mAP@all"] == pytest.approx(map_all, abs=1e-6), "eval must score the split training scored"
    moved = tmp_path / "moved.safetensors"  # away from its run folder, the model's recorded protocol redraws the split
    moved.write_bytes((run / "model.safetensors").read_bytes())
    vdsh("eval", "--model", moved, "--out", tmp_path / "moved-eval")
    assert json.loads((tmp_path / "moved-eval" / "metrics.json").read_text())["metrics"] == metrics["metrics"]
    split = np.load(run / "split.npz")
    with np.load(run / "codes" / "query.npz") as q, np.load(run / "codes" / "database.npz") as db:
        assert np.array_equal(q["ids"], split["query"]) and np.array_equal(db["ids"], split["database"])
        assert q["class_names"].tolist() == list(SHAPES) and int(q["bits"]) == 16
        query_codes, query_ids = q["codes"], q["ids"]

    # 3. index the whole folder with the queries held out; ids are dataset positions, as the sources say
    index = tmp_path / "index"
    vdsh("index", "build", "--model", run / "model.safetensors", "--dataset", "folder:images",
         "--exclude", f"{run / 'split.npz'}:query", "--out", index)
    from vdsh.index.store import load_index

    items = load_index(index)
    assert len(items) == 75 and not np.isin(split["query"], items.index.ids).any(), "no query may be indexed"
    assert items.class_names == list(SHAPES)
    sources = items.sources_of(items.index.ids)
    files = sorted((tmp_path / "images").glob("*/*"))
    assert all(Path(s) == files[i].resolve() for i, s in zip(items.index.ids, sources)), "id i is the folder's i-th file"

    # 4. query with a held-out image file, and print its code: the same code eval scored
    query_file = files[int(query_ids[0])]
    answer = vdsh("query", "--index", index, "--model", run / "model.safetensors", query_file, "-k", "3")
    assert answer.stdout.count("labels=") == 3
    printed = vdsh("--quiet", "encode", query_file, "--model", run / "model.safetensors")
    assert printed.stdout.split()[0] == query_codes[0].tobytes().hex() and printed.stderr == ""
    vdsh("encode", query_file, files[0], "--model", run / "model.safetensors", "--out", tmp_path / "codes.h5")
    import h5py

    with h5py.File(tmp_path / "codes.h5") as f:
        assert f["codes"][0].tobytes() == query_codes[0].tobytes() and int(f.attrs["bits"]) == 16
        assert [s.decode() for s in f["sources"][()]] == [str(query_file), str(files[0])]

    # 5. serve it, and search over HTTP with the same file
    import httpx

    from vdsh.app.bench.http import start_server
    from tests.serving_fixtures import stop_server

    process, url = start_server(index, run / "model.safetensors")
    try:
        found = httpx.post(f"{url}/search", files={"image": (query_file.name, query_file.read_bytes())},
                           data={"k": "5"}, timeout=30).json()
    finally:
        stop_server(process)
    assert len(found["results"]) == 5 and found["query_code"] == query_codes[0].tobytes().hex()
    assert all(set(r["labels"]) <= set(SHAPES) for r in found["results"])


def test_index_refuses_a_shape_the_model_does_not_take_before_decoding(tmp_path, monkeypatch):
    from vdsh.data import folder
    from vdsh.training.encoders.linear import LinearEncoder
    from vdsh.training.encoders.model import HashingModel, InputSpec, save_model

    make_image_folder(tmp_path / "images", per_class=2)
    save_model(tmp_path / "m.safetensors", HashingModel(LinearEncoder(28 * 28, 16), InputSpec(1, 28)))
    monkeypatch.setattr(folder, "decode_images", lambda *a: pytest.fail("decoded before the shape check"))
    result = vdsh("index", "build", "--model", tmp_path / "m.safetensors", "--dataset", f"folder:{tmp_path / 'images'}",
                  "--image-size", "64", "--out", tmp_path / "index", ok=False)
    assert result.exit_code != 0 and "takes 1 x 28 x 28" in result.output and "drop --image-size" in result.output



@pytest.mark.slow
def test_validation_says_where_it_comes_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "images", per_class=12)
    for train, expected in (("6", "database images outside the training set"), ("all", "training images")):
        run = tmp_path / f"run-{train}"
        result = vdsh("train", "--protocol", "folder:images", "--queries-per-class", "2", "--train", train,
                      "--trainer", "cnn-local", "--width", "4", "--epochs", "1", "--bits", "8", "--out", run)
        assert f"validation on {expected}" in result.stderr
        history = json.loads((run / "history.json").read_text())
        assert all(r["val_on"].startswith(expected) for r in history if r.get("val_map") is not None)
        assert any(r.get("val_map") is not None for r in history)
    # scored on images never trained on: the database less the training set (30 - 18 images)
    vdsh("eval", "--model", tmp_path / "run-6" / "model.safetensors", "--exclude", f"{tmp_path / 'run-6'}:train",
         "--out", tmp_path / "unseen")
    assert json.loads((tmp_path / "unseen" / "metrics.json").read_text())["n_database"] == 12


def test_hybrid_reports_every_trunk_epoch_and_head_sweep():
    from dataclasses import replace

    from vdsh.training.trainers.proxprop import ProxPropOptions
    from vdsh.training.trainers.cnn_backprop import CNN_OPTIONS
    import torch

    from vdsh.training.encoders.registry import ENCODERS
    from vdsh.training.protocol_inputs import image_spec, prepare_images
    from vdsh.training.trainers.hybrid import HybridOptions, HybridTrainer

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 1, 12, 12), dtype=np.uint8)
    labels = np.eye(2, dtype=np.uint8)[rng.integers(0, 2, 40)]
    options = HybridOptions(trunk=replace(CNN_OPTIONS, epochs=2, batch_size=16), head=ProxPropOptions(sweeps=3), mlp_width=16,
                            bits=8)
    records = []
    x, y = prepare_images(image_spec(images), images), torch.as_tensor(labels).float()
    HybridTrainer(options, records.append).fit(ENCODERS["small_cnn"](1, 12, 2, width=4), x, y)
    assert len(records) == 2 + 3, "one report per trunk epoch and per head sweep"


@pytest.mark.slow
def test_train_takes_the_old_dataset_spelling_with_a_deprecation_note(tmp_path):
    result = vdsh("train", "--dataset", "mnist-sample", "--trainer", "lsh", "--bits", "8", "--out", tmp_path / "run")
    assert "--dataset is deprecated here" in result.stderr and "--protocol mnist-sample" in result.stderr
    assert json.loads((tmp_path / "run" / "protocol.json").read_text())["protocol"]["name"] == "mnist-sample"


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_saved_codes_carry_ids_and_class_names_and_still_load(tmp_path, suffix):
    import h5py

    from vdsh.index.codes import CodeSet, load_codes, save_codes

    codes = CodeSet(np.array([[1, 2], [3, 4], [5, 6]], np.uint8), 16, np.eye(3, dtype=np.uint8)[[0, 2, 1]])
    save_codes(tmp_path / f"c{suffix}", codes, ids=np.array([7, 9, 11]), class_names=["cat", "dog", "owl"])
    again = load_codes(tmp_path / f"c{suffix}")
    assert np.array_equal(again.packed, codes.packed) and np.array_equal(again.labels, codes.labels)
    if suffix == ".npz":
        with np.load(tmp_path / "c.npz") as f:
            ids, names = f["ids"].tolist(), f["class_names"].tolist()
    else:
        with h5py.File(tmp_path / "c.h5") as f:
            ids, names = f["ids"][()].tolist(), [n.decode() for n in f["class_names"][()]]
    assert ids == [7, 9, 11] and names == ["cat", "dog", "owl"]
    with pytest.raises(ValueError, match="3 codes but 2 ids"):
        save_codes(tmp_path / f"d{suffix}", codes, ids=np.array([1, 2]))


def test_an_mlp_trains_on_a_folder_of_grey_images_at_a_chosen_size(tmp_path):
    from vdsh.training.encoders.model import read_model_metadata

    make_image_folder(tmp_path / "images", per_class=10)
    result = vdsh("train", "--protocol", f"folder:{tmp_path / 'images'}", "--queries-per-class", "2", "--channels", "1",
                  "--image-size", "12", "--trainer", "backprop", "--depth", "2", "--width", "16", "--epochs", "1",
                  "--bits", "8", "--out", tmp_path / "run")
    assert "images 1x12x12" in result.stderr and "augmentation: none" in result.stderr
    spec = read_model_metadata(tmp_path / "run" / "model.safetensors")["input"]
    assert (spec["channels"], spec["size"], spec["features"]) == (1, 12, "pixels") and 0 < spec["mean"][0] < 1
    meta = json.loads((tmp_path / "run" / "protocol.json").read_text())
    assert meta["image_shape"] == [1, 12, 12] and meta["counts"]["query"] == 6
