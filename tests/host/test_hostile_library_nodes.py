"""A hostile shared library inside a real ComfyUI (in-process): the Info node and the query nodes' thumbnails never
read through a link, a garbage or oversized thumbnail becomes a blank tile (the node still succeeds), and a tampered
manifest fails the node with the pack's error naming the field."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import comfy_harness
import nq_graphs as G
import numpy as np
import pytest
from comfy_harness import InProcessRunner
from PIL import Image

from noisequery_core import import_folder

pytestmark = pytest.mark.skipif(comfy_harness.find_comfyui() is None, reason=comfy_harness.SKIP_REASON)

TILES = "hostile/tiles"  # seeds 0..7; thumbnails of seeds 1, 2, 3 are a link, garbage and oversized
TAMPERED = "hostile/tampered"
BAD_SEEDS = (1, 2, 3)


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def decoy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("outside")
    Image.new("RGB", (32, 32), (255, 0, 0)).save(d / "private.webp")  # pure red: visible if it were served
    return d


@pytest.fixture(scope="module")
def hostile(comfy_nodes: Any, nq_libraries_dir: Path, decoy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("tiles_src")
    for s in range(8):
        Image.new("RGB", (48, 32), (40 + 20 * s, 90, 160)).save(src / f"{s}.png")
    for name in (TILES, TAMPERED):
        import_folder(src, nq_libraries_dir / name, embedder=None, thumbnail_size=32)
    thumbs = nq_libraries_dir / TILES / "thumbs"
    (thumbs / "1.webp").unlink()
    os.symlink(decoy / "private.webp", thumbs / "1.webp")
    (thumbs / "2.webp").write_bytes(os.urandom(500))
    Image.new("RGB", (2000, 2000), (255, 0, 0)).save(thumbs / "3.webp")  # far over the library's 32 px
    manifest = nq_libraries_dir / TAMPERED / "manifest.json"
    m = json.loads(manifest.read_text())
    m["features"]["thumbnail_format"] = "x/../../../outside/private"
    manifest.write_text(json.dumps(m))
    return nq_libraries_dir


def _tiles_blank_exactly_for_bad_seeds(seeds: list[int], thumbs: Any) -> None:
    arr = np.asarray(thumbs)
    assert arr.shape[0] == len(seeds)
    for seed, tile in zip(seeds, arr):
        if seed in BAD_SEEDS:
            assert float(np.abs(tile).max()) == 0.0, f"seed {seed}: a refused thumbnail is a blank tile"
        else:
            assert float(tile.mean()) > 0.1, f"seed {seed}: a good thumbnail is shown"
        assert not (tile[..., 0].mean() > 0.9 and tile[..., 1].mean() < 0.1), f"seed {seed}: the outside image leaked"


def test_info_node_survives_links_and_bad_thumbnails(comfy_runner: InProcessRunner, hostile: Path, decoy: Path) -> None:
    before = _files(decoy)
    graph = {"1": {"class_type": "NoiseQueryLibraryInfo", "inputs": {"library": TILES, "preview_count": 8}}}
    entry = comfy_runner.run(graph)
    assert comfy_harness.execution_error(entry) is None, comfy_harness.execution_error(entry)
    info, thumbs = comfy_runner.node_outputs("1")
    assert "8 entries" in info
    _tiles_blank_exactly_for_bad_seeds(list(range(8)), thumbs)
    assert _files(decoy) == before


def test_colour_query_thumbnails_survive_bad_ones(comfy_runner: InProcessRunner, tiny_ckpt_name: str, hostile: Path) -> None:
    graph = G.base(tiny_ckpt_name)
    graph["20"] = G.color_query(TILES, top_k=8, color="#808080")
    graph["21"] = G.preview_thumbnails("20")
    entry = comfy_runner.run(graph)
    assert comfy_harness.execution_error(entry) is None, comfy_harness.execution_error(entry)
    outs = comfy_runner.node_outputs("20")
    assert outs is not None
    _tiles_blank_exactly_for_bad_seeds(list(outs[1].seeds), outs[3])


def test_tampered_manifest_is_a_pack_error_naming_the_field(comfy_runner: InProcessRunner, hostile: Path) -> None:
    graph = {"1": {"class_type": "NoiseQueryLibraryInfo", "inputs": {"library": TAMPERED, "preview_count": 4}}}
    err = comfy_harness.execution_error(comfy_runner.run(graph))
    assert err is not None and err["node_type"] == "NoiseQueryLibraryInfo"
    assert err["exception_type"].endswith("LibraryError"), err["exception_type"]
    msg = err["exception_message"]
    assert "features.thumbnail_format" in msg and "manifest.json" in msg and "webp, jpg" in msg, msg
