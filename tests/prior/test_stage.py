"""Class-prior cache: the same bytes whatever fills it (1 or 2 actors, in-process, after a crash,
two jobs at once), reruns that do nothing, top-ups that generate only the new blocks.

Every generated set is compared PNG-byte for PNG-byte with one in-process reference set. The Ray
tests each start fresh generator actors (the expensive part on CPU), so they share the reference
and keep to 8-12 tiny 64px images.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import threading

import pytest
from PIL import Image

from raydb import faults
from raydb.prior.cache import BLOCK_SCHEMA
from raydb.prior.stage import ensure_prior_images, resolve_prior_cache
from raydb.storage import Storage, join

BLOCK_FILE = re.compile(r"^block-\d{6}\.parquet$")


@pytest.fixture(autouse=True)
def _quiet_ray_data():
    """Ray Data logs every execution at INFO; the assertions below say what matters."""
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


@pytest.fixture(scope="module")
def _reference_store() -> dict:
    return {}


@pytest.fixture
def reference(make_cfg, tmp_path_factory, _reference_store) -> list[bytes]:
    """PNG bytes of images 0..11 (sample_batch_size 2), generated once in-process (no Ray)."""
    if "pngs" not in _reference_store:
        cfg = make_cfg(workspace=str(tmp_path_factory.mktemp("reference")))
        stats = ensure_prior_images(cfg, use_ray=False, count=12, quiet=True)
        assert stats.images_generated == 12 and stats.actors == 1
        _reference_store["pngs"] = _pngs(cfg, 12)
    return _reference_store["pngs"]


def _pngs(cfg, count: int) -> list[bytes]:
    """PNG bytes by index; ``read_table`` raises unless there is exactly one row per index."""
    storage = Storage()
    return resolve_prior_cache(cfg, storage).read_table(storage, count)["png"].to_pylist()


def _blocks_dir(cfg) -> str:
    return join(resolve_prior_cache(cfg, Storage()).uri, "blocks")


def _block_mtimes(cfg) -> dict[str, int]:
    """Raw directory listing (temp files included) -> mtime in ns."""
    folder = _blocks_dir(cfg)
    return {name: os.stat(join(folder, name)).st_mtime_ns for name in os.listdir(folder)}


def _assert_only_published_blocks(cfg, n_blocks: int) -> None:
    names = sorted(os.listdir(_blocks_dir(cfg)))
    assert all(BLOCK_FILE.match(n) for n in names), names  # no temp file left behind
    assert len(names) == n_blocks


# -- unit tier: no Ray, no generation ----------------------------------------------------------


def test_key_follows_class_prompt_and_batch_size_not_workspace(make_cfg, tmp_path):
    storage = Storage()
    toy = resolve_prior_cache(make_cfg(), storage)
    toy_elsewhere = resolve_prior_cache(make_cfg(workspace=str(tmp_path / "other")), storage)
    dog = resolve_prior_cache(make_cfg(subject={"class_prompt": "a photo of a dog"}), storage)
    batch4 = resolve_prior_cache(make_cfg(prior={"sample_batch_size": 4}), storage)
    assert toy.key == toy_elsewhere.key and toy.uri != toy_elsewhere.uri
    assert len({toy.key, dog.key, batch4.key}) == 3
    assert dog.settings["class_prompt"] == "a photo of a dog"


def test_key_follows_the_generation_device(make_cfg):
    """CUDA generates in fp16 and the CPU in fp32: different pixels, so different keys."""
    from raydb.prior.cache import prior_cache_for

    cfg = make_cfg()
    cpu = prior_cache_for(cfg, "model-x", "DDIMScheduler", "cpu")
    cuda = prior_cache_for(cfg, "model-x", "DDIMScheduler", "cuda")
    assert cpu.key != cuda.key
    assert (cpu.settings["dtype"], cuda.settings["dtype"]) == ("float32", "float16")
    # without Ray, the key follows this machine's device
    import torch

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_prior_cache(cfg, Storage(), use_ray=False).settings["device"] == expected
    with pytest.raises(ValueError, match="device"):
        prior_cache_for(cfg, "model-x", "DDIMScheduler", "tpu")


def test_done_blocks_sees_only_published_blocks(make_cfg):
    storage = Storage()
    cache = resolve_prior_cache(make_cfg(), storage)
    rows = [{"index": i, "seed": i, "png": b"x", "prompt": "p", "negative_prompt": "",
             "num_inference_steps": 2, "guidance_scale": 7.5, "width": 64, "height": 64}
            for i in (0, 1)]
    assert list(BLOCK_SCHEMA.names) == list(rows[0])
    assert cache.write_block(storage, 0, rows) is True
    assert cache.write_block(storage, 0, rows) is False  # if_absent: the first block stays
    folder = join(cache.uri, "blocks")
    # What a writer killed mid-block leaves (storage writes a dot-temp file, then links it), and
    # names that only look like blocks.
    for name in (".block-000001.parquet.k3j2.tmp", "block-000002.parquet.tmp", "block-3.parquet"):
        with open(join(folder, name), "wb") as fh:
            fh.write(b"PAR1 half a block")
    assert cache.done_blocks(storage) == {0}
    assert cache.missing_blocks(storage, 8) == [1, 2, 3]
    assert storage.list(folder) == ["block-000000.parquet", "block-000002.parquet.tmp",
                                    "block-3.parquet"]


# -- integration tier: a local Ray cluster ------------------------------------------------------


@pytest.mark.ray
def test_one_and_two_actors_write_the_reference_bytes(ray_cluster, make_cfg, tmp_path, reference,
                                                      capsys, caplog):
    one = make_cfg(workspace=str(tmp_path / "one"), prior={"num_class_images": 8, "concurrency": 1})
    two = make_cfg(workspace=str(tmp_path / "two"), prior={"num_class_images": 8, "concurrency": 2})
    stats_one = ensure_prior_images(one, quiet=True)  # use_ray=None: Ray is running
    capsys.readouterr()
    with caplog.at_level("INFO", logger="raydb"):
        stats_two = ensure_prior_images(two, use_ray=True)
    out = capsys.readouterr()

    assert (stats_one.actors, stats_two.actors) == (1, 2)
    assert stats_one.key == stats_two.key and stats_one.cache_uri != stats_two.cache_uri
    assert stats_one.images_generated == stats_two.images_generated == 8
    assert sorted(stats_two.blocks) == [0, 1, 2, 3]
    assert _pngs(one, 8) == _pngs(two, 8) == reference[:8]
    _assert_only_published_blocks(two, 4)
    # The driver's progress bar and the closing throughput line.
    assert "prior images: 100%" in out.err and "8/8" in out.err
    assert re.search(r"generated 8 in [\d.]+s \([\d.]+ images/s, 2 actor\(s\)\)", caplog.text)


@pytest.mark.ray
def test_rerun_is_free_and_top_up_generates_only_new_images(ray_cluster, make_cfg):
    cfg = make_cfg(prior={"num_class_images": 8, "sample_batch_size": 4})
    # The first fill runs in-process (its bytes are the same; saves an actor start-up).
    assert ensure_prior_images(cfg, use_ray=False, quiet=True).images_generated == 8
    first = _block_mtimes(cfg)
    first_pngs = _pngs(cfg, 8)

    rerun = ensure_prior_images(cfg, use_ray=True, quiet=True)
    assert (rerun.images_generated, rerun.blocks_generated, rerun.blocks) == (0, 0, [])
    assert _block_mtimes(cfg) == first  # nothing rewritten

    cfg = make_cfg(prior={"num_class_images": 12, "sample_batch_size": 4})  # same workspace
    top_up = ensure_prior_images(cfg, use_ray=True, quiet=True)
    assert (top_up.images_generated, top_up.blocks) == (4, [2])
    after = _block_mtimes(cfg)
    assert {k: after[k] for k in first} == first and len(after) == 3
    assert _pngs(cfg, 12)[:8] == first_pngs

    images = resolve_prior_cache(cfg, Storage()).read_images(Storage(), 12)
    assert len(images) == 12
    for png in _pngs(cfg, 12):
        with Image.open(io.BytesIO(png)) as img:
            img.verify()  # a complete, valid PNG
    assert {img.size for img in images} == {(64, 64)}
    assert len(set(_pngs(cfg, 12))) == 12  # distinct seeds, distinct images
    manifest = Storage().read_json(join(top_up.cache_uri, "manifest.json"))
    assert manifest["blocks"] == [0, 1, 2] and manifest["num_images"] == 12


@pytest.mark.ray
def test_lost_actor_is_restarted_and_the_set_is_complete(ray_cluster, make_cfg, tmp_path, reference,
                                                         monkeypatch):
    cfg = make_cfg(prior={"num_class_images": 8, "concurrency": 1})
    os.makedirs(_blocks_dir(cfg))
    stale = join(_blocks_dir(cfg), ".block-000000.parquet.dead.tmp")  # left by an earlier crash
    with open(stale, "wb") as fh:
        fh.write(b"PAR1 half")
    marker = str(tmp_path / "failed-once")

    # the generator dies (SIGKILL) after its first block, once (raydb.faults)
    monkeypatch.setenv(faults.ENV, json.dumps({"prior_block": {"after": 1, "once": marker}}))
    stats = ensure_prior_images(cfg, use_ray=True, quiet=True)

    assert os.path.exists(marker)  # the actor did die after its first block
    assert sorted(stats.blocks) == [0, 1, 2, 3]  # every block reported once
    assert _pngs(cfg, 8) == reference[:8]
    os.unlink(stale)
    _assert_only_published_blocks(cfg, 4)


@pytest.mark.ray
def test_concurrent_fills_publish_each_block_once(ray_cluster, make_cfg, reference):
    cfg = make_cfg(prior={"num_class_images": 8, "concurrency": 1})
    ensure_prior_images(cfg, use_ray=False, count=4, quiet=True)  # blocks 0-1 already there
    results: dict[str, object] = {}

    def fill(name: str, use_ray: bool) -> None:
        try:
            results[name] = ensure_prior_images(cfg, use_ray=use_ray, quiet=True)
        except BaseException as exc:  # surfaced below
            results[name] = exc

    threads = [threading.Thread(target=fill, args=("ray", True)),
               threading.Thread(target=fill, args=("local", False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    stats = [results["ray"], results["local"]]
    assert all(not isinstance(s, BaseException) for s in stats), stats
    # Both jobs saw blocks 2-3 missing; each was published by exactly one of them.
    assert sum(s.blocks_generated for s in stats) == 2
    assert _pngs(cfg, 8) == reference[:8]
    _assert_only_published_blocks(cfg, 4)
