"""The Milvus backend against a real Milvus server (the embedded standalone server of PyPI `milvus`).

One server per test session, its data in a temporary directory and its ports chosen free; stopped at the
end. Skips when `milvus` or `pymilvus` is missing (pip install 'vdsh[milvus-embedded]'), unless VDSH_REQUIRE_MILVUS
is set (CI), where that is an error.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from serving_fixtures import png_bytes, shared_setup, start_server, stop_server
from vdsh.app.cli import app as cli_app
from vdsh.app.server.app import create_app
from vdsh.index.milvus_items import IVF_FROM, NLIST_MAX, MilvusItems, MilvusTarget, _decode_thumbnail, _encode_thumbnail, choose_index
from vdsh.index.store import load_index

KEY = "test-key"
MISSING = [name for name in ("milvus", "pymilvus") if importlib.util.find_spec(name) is None]
if MISSING and os.environ.get("VDSH_REQUIRE_MILVUS"):
    raise RuntimeError(f"VDSH_REQUIRE_MILVUS is set but {', '.join(MISSING)} is not installed: pip install '.[milvus-embedded]'")
needs_milvus = pytest.mark.skipif(bool(MISSING), reason=f"no {', '.join(MISSING)}: pip install 'vdsh[milvus-embedded]'")


# ------------------------------------------------------------ no server needed


def test_uris_name_a_server_and_a_collection():
    assert MilvusTarget.parse("milvus://db.example:19531/items") == MilvusTarget("http://db.example:19531", "items")
    assert MilvusTarget.parse("milvus://localhost/items_2").address == "http://localhost:19530"
    assert MilvusTarget.parse("milvus://localhost/items").consistency == "Strong"
    assert MilvusTarget.parse("milvus://localhost/items?consistency=Bounded").consistency == "Bounded"
    for bad in ("milvus://localhost/items?consistency=Weak", "milvus://localhost/items?nprobe=3"):
        with pytest.raises(ValueError, match="consistency"):
            MilvusTarget.parse(bad)
    for bad in ("milvus://host:1/", "http://host:1/items", "milvus://host:1/a/b", "milvus://host:1/9items",
                "milvus://host:1/it-ems"):
        with pytest.raises(ValueError, match="milvus://|collection name"):
            MilvusTarget.parse(bad)


def test_exact_index_below_the_threshold_ivf_from_it():
    assert choose_index(IVF_FROM - 1) == ("BIN_FLAT", 0)
    kind, nlist = choose_index(IVF_FROM)
    assert kind == "BIN_IVF_FLAT" and nlist == min(NLIST_MAX, int(4 * np.sqrt(IVF_FROM)))


def test_thumbnails_survive_their_text_form():
    picture = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    assert np.array_equal(_decode_thumbnail(_encode_thumbnail(picture)), picture)
    assert _decode_thumbnail(_encode_thumbnail(None)) is None


# ------------------------------------------------------------ a real server


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    if MISSING:
        pytest.skip(f"no {', '.join(MISSING)}: pip install 'vdsh[milvus-embedded]'")
    from vdsh.index.milvus_embedded import EmbeddedMilvus

    server = EmbeddedMilvus(tmp_path_factory.mktemp("milvus")).start()
    yield server
    server.stop(wait_s=2)  # its data is thrown away: no need to wait for a clean shutdown


@pytest.fixture(scope="module")
def setup():
    return shared_setup()


@pytest.fixture(scope="module")
def exported(milvus_server, setup):
    """The shared 1,000-item index, exported with the CLI: the URI of its collection."""
    uri = milvus_server.uri("shared")
    result = CliRunner().invoke(cli_app, ["index", "export", "--index", str(setup.index_dir), "--to", uri])
    assert result.exit_code == 0, result.output
    assert "exported 1000 items" in result.output
    return uri


def assert_same_answers_where_untied(milvus_ids, milvus_dists, ids, dists):
    """Same distances; same ids, in the same order, at every distance below the last one (where the tied
    items that make the cut may differ)."""
    assert np.array_equal(milvus_dists, dists)
    for row in range(len(ids)):
        below = dists[row] < dists[row].max()
        assert np.array_equal(milvus_ids[row][below], ids[row][below])


@pytest.mark.slow  # starting the Milvus server alone takes seconds
@needs_milvus
def test_export_holds_every_item_and_its_metadata(exported, setup):
    local, remote = load_index(setup.index_dir), MilvusItems.open(exported)
    assert len(remote) == len(local) == 1000
    assert (remote.bits, remote.model_id, remote.class_names) == (local.bits, local.model_id, local.class_names)
    ids = local.index.ids[::7]
    assert np.array_equal(remote.codes_of(ids), local.codes_of(ids))
    assert np.array_equal(remote.labels_of(ids), local.labels_of(ids))
    assert remote.sources_of(ids) == local.sources_of(ids)
    assert np.array_equal(remote.thumbnail_of(int(ids[3])), local.thumbnail_of(int(ids[3])))
    with pytest.raises(KeyError, match="unknown ids"):
        remote.labels_of([10_000])
    again = CliRunner().invoke(cli_app, ["index", "export", "--index", str(setup.index_dir), "--to", exported])
    assert again.exit_code != 0 and "--replace" in str(again.exception)
    assert len(MilvusItems.open(exported)) == 1000  # refused: nothing dropped


@pytest.mark.slow  # starting the Milvus server alone takes seconds
@needs_milvus
def test_search_equals_the_flat_index_at_every_untied_distance(exported, setup):
    local, remote = load_index(setup.index_dir), MilvusItems.open(exported)
    rng = np.random.default_rng(0)
    queries = np.concatenate([local.codes_of(local.index.ids[:20]),
                              rng.integers(0, 256, (20, local.index.nbytes), dtype=np.uint8)])
    for k in (1, 10, 100):
        assert_same_answers_where_untied(*remote.search(queries, k), *local.search(queries, k, device="cpu"))
    for (m_ids, m_d), (l_ids, l_d) in zip(remote.range_search(queries, 4), local.range_search(queries, 4)):
        assert np.array_equal(m_d, l_d) and np.array_equal(m_ids, l_ids)  # a radius answer has no cut: all equal


@pytest.mark.slow  # starting the Milvus server alone takes seconds
@needs_milvus
def test_http_api_answers_as_from_the_index_directory(exported, setup):
    with TestClient(create_app(setup.index_dir, setup.model_path)) as local, \
            TestClient(create_app(exported, setup.model_path)) as remote:
        stats = remote.get("/stats").json()
        assert stats["items"] == 1000 and stats["index_kind"] == "milvus BIN_FLAT"
        for image in setup.query_images[:10]:
            answers = [c.post("/search", files={"image": ("q.png", png_bytes(image), "image/png")}, data={"k": "20"}).json()
                       for c in (local, remote)]
            results = [a["results"] for a in answers]
            last = results[0][-1]["distance"]
            assert [r["distance"] for r in results[1]] == [r["distance"] for r in results[0]]
            assert [r for r in results[1] if r["distance"] < last] == [r for r in results[0] if r["distance"] < last]
        item = local.get("/items/5").json()
        assert remote.get("/items/5").json() == item
        assert remote.get("/items/5/thumbnail").content == local.get("/items/5/thumbnail").content
        assert remote.get("/").status_code == 200
        assert remote.get("/items/123456").status_code == 404


@pytest.mark.slow  # starting the Milvus server alone takes seconds
@needs_milvus
def test_query_command_prints_the_same_neighbours(exported, setup, tmp_path):
    image = tmp_path / "q.png"
    image.write_bytes(png_bytes(setup.query_images[3]))
    printed = []
    for index in (str(setup.index_dir), exported):
        result = CliRunner().invoke(cli_app, ["query", "--index", index, "--model", str(setup.model_path), str(image), "-k", "20"])
        assert result.exit_code == 0, result.output
        printed.append([line.split() for line in result.output.splitlines()[1:]])  # rank id=.. d=.. labels=.. source
    distances = [[int(row[2].removeprefix("d=")) for row in rows] for rows in printed]
    assert len(printed[0]) == 20 and distances[0] == distances[1]
    untied = [rows[: distances[0].index(distances[0][-1])] for rows in printed]
    assert untied[0] == untied[1]
    refused = CliRunner().invoke(cli_app, ["query", "--index", exported, "--index", str(setup.index_dir),
                                           "--model", str(setup.model_path), str(image)])
    assert refused.exit_code != 0 and "alone" in refused.output


@pytest.mark.slow
@needs_milvus
def test_writes_in_one_server_process_are_seen_by_another(milvus_server, setup):
    """An in-process app and a `vdsh serve` child process on one collection: adds and deletes through
    either are answered by the other at once."""
    uri = milvus_server.uri("shared_writes")
    result = CliRunner().invoke(cli_app, ["index", "export", "--index", str(setup.index_dir), "--to", uri])
    assert result.exit_code == 0, result.output
    process, url = start_server(uri, setup.model_path, api_key=KEY)
    try:
        import httpx

        with TestClient(create_app(uri, setup.model_path, api_key=KEY)) as here, httpx.Client(base_url=url) as there:
            image = setup.query_images[0]
            added = here.post("/items", files={"image": ("new.png", png_bytes(image), "image/png")},
                              data={"labels": setup.class_names[1], "source": "test:new"}, headers={"X-API-Key": KEY})
            assert added.status_code == 201, added.text
            new = added.json()
            assert new["id"] == 1000  # the largest exported id + 1
            seen = there.get(f"/items/{new['id']}").json()
            assert seen["source"] == "test:new" and seen["labels"] == [setup.class_names[1]] and seen["code"] == new["code"]
            found = there.post("/search", json={"code": new["code"], "k": 5}).json()["results"]
            assert new["id"] in [r["id"] for r in found if r["distance"] == 0]
            assert there.get("/health").json()["items"] == 1001
            taken = there.post("/items", files={"image": ("again.png", png_bytes(image), "image/png")},
                               data={"id": str(new["id"])}, headers={"X-API-Key": KEY})
            assert taken.status_code == 409

            deleted = there.delete(f"/items/{new['id']}", headers={"X-API-Key": KEY})
            assert deleted.status_code == 200 and deleted.json()["items"] == 1000
            assert here.get(f"/items/{new['id']}").status_code == 404
            found = here.post("/search", json={"code": new["code"], "k": 5}).json()["results"]
            assert new["id"] not in [r["id"] for r in found]
            assert here.delete(f"/items/{new['id']}", headers={"X-API-Key": KEY}).status_code == 404
            assert here.delete("/items/3", headers={"X-API-Key": "wrong"}).status_code == 403
    finally:
        stop_server(process)


@pytest.mark.slow
@needs_milvus
def test_a_killed_and_restarted_milvus_server_has_lost_nothing(milvus_server, exported, setup):
    """Writes acknowledged (not flushed) before the server is killed (SIGKILL) are all there after a restart."""
    local = load_index(setup.index_dir)
    remote = MilvusItems.open(exported)
    rng = np.random.default_rng(1)
    new_codes = rng.integers(0, 256, (5, local.index.nbytes), dtype=np.uint8)
    remote.add(new_codes, np.arange(5000, 5005), labels=np.array([0, 1, 2, 3, 4]), sources=[f"new:{i}" for i in range(5)])
    remote.remove([0, 1, 2])
    before = remote.search(local.codes_of(local.index.ids[:30]), 10)

    milvus_server.stop(wait_s=0)
    milvus_server.start()
    after = MilvusItems.open(milvus_server.uri("shared"))
    assert len(after) == 1000 + 5 - 3
    assert np.array_equal(after.codes_of(np.arange(5000, 5005)), new_codes)
    assert after.sources_of([5004]) == ["new:4"] and after.labels_of([5003])[0].tolist() == [0, 0, 0, 1] + [0] * 6
    assert not after.contains(0) and after.contains(3)
    assert_same_answers_where_untied(*after.search(local.codes_of(local.index.ids[:30]), 10), *before)
