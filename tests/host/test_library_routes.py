"""The library browser's HTTP routes (nodes/server_routes.py over noisequery_core/search/service.py) on a real ComfyUI.

The session's headless ComfyUI (`comfy_server`, this repo loaded as the NoiseQuery pack) serves the routes; the
libraries are built by the test through POST /prompt (BuildNoiseLibrary, tiny random SD1.5, 64x64): one with CLIP
ViT-B-32 (random weights: text scores are meaningless, the plumbing is what is tested) and one colour-only. Good
requests must answer what the library holds; every bad one — traversal and absolute names, a symlink out of the
folder, unknown libraries, seeds out of range, bad pages, malformed JSON, wrong types, NaN, bad colours — a 400
with a message, after which the server still answers. No route may read a file the client chose: a thumbnail
link pointing out of the library and a library link pointing out of the folder are refused, not followed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import comfy_harness
import nq_graphs as G
import pytest
from comfy_harness import ComfyServer

pytestmark = pytest.mark.skipif(comfy_harness.find_comfyui() is None, reason=comfy_harness.SKIP_REASON)

CLIP_LIB = "browser/routes_clip"
COLOUR_LIB = "browser/routes_colour"
CLIP_SEEDS = list(range(20, 26))
COLOUR_SEEDS = list(range(40, 43))


def _ok(entry: dict[str, Any]) -> dict[str, Any]:
    err = comfy_harness.execution_error(entry)
    assert err is None, json.dumps(err)[:2000]
    return entry


@pytest.fixture(scope="module")
def libs(comfy_server: ComfyServer, tiny_ckpt_name: str, clip_weights: Path, server_libraries_dir: Path) -> Path:
    graph = G.base(tiny_ckpt_name)
    graph["10"] = G.build(CLIP_LIB, seed_start=CLIP_SEEDS[0], count=len(CLIP_SEEDS), batch_size=3,
                          clip_model="ViT-B-32:openai")
    graph["11"] = G.build(COLOUR_LIB, seed_start=COLOUR_SEEDS[0], count=len(COLOUR_SEEDS), batch_size=3)
    _ok(comfy_server.run(graph, timeout=300))
    return server_libraries_dir


def _post(server: ComfyServer, body: Any, *, raw: bytes | None = None, api: bool = False) -> Any:
    data = raw if raw is not None else json.dumps(body).encode()
    return server._http().post(f"{server.url}{'/api' if api else ''}/noisequery/query", data=data,
                               headers={"Content-Type": "application/json"}, timeout=60)


def _thumb(server: ComfyServer, params: Any) -> Any:
    return server._http().get(f"{server.url}/noisequery/thumbnail", params=params, timeout=30)


def _still_serving(server: ComfyServer) -> None:
    r = server._http().get(f"{server.url}/noisequery/libraries", timeout=30)
    assert r.status_code == 200, r.text[:500]
    assert server._http().get(f"{server.url}/object_info/KSampler", timeout=30).status_code == 200


# ------------------------------------------------------------------------------------------- good requests


def test_libraries_lists_what_each_library_can_answer(comfy_server: ComfyServer, libs: Path) -> None:
    got = {d["name"]: d for d in comfy_server.get_json("/noisequery/libraries")["libraries"]}
    c, k = got[CLIP_LIB], got[COLOUR_LIB]
    assert (c["status"], c["count"], c["width"], c["height"], c["text"], c["color"]) == ("ok", 6, 64, 64, True, True)
    assert c["clip"].startswith("ViT-B-32")
    assert (k["count"], k["text"], k["clip"]) == (3, False, None)
    assert any("Colour-only" in n for n in k["notes"])  # the panel explains why text is off
    # the same route under the frontend's /api prefix
    assert CLIP_LIB in {d["name"] for d in comfy_server.get_json("/api/noisequery/libraries")["libraries"]}


def test_colour_query_pages_through_the_library(comfy_server: ComfyServer, libs: Path) -> None:
    body = {"library": CLIP_LIB, "colors": [{"color": "#ff8800", "weight": 1.0}],
            "stats": [{"name": "brightness", "lo": 0.2, "hi": 0.9}], "limit": 4}
    first = _post(comfy_server, body, api=True)
    assert first.status_code == 200, first.text
    p1 = first.json()
    assert p1["count"] == 6 and p1["has_more"] and [h["rank"] for h in p1["hits"]] == [0, 1, 2, 3]
    p2 = _post(comfy_server, {**body, "offset": 4}).json()
    assert [h["rank"] for h in p2["hits"]] == [4, 5] and not p2["has_more"]
    assert _post(comfy_server, body).json()["cached"]  # the same page again: from the result cache
    seeds = [int(h["seed"]) for h in p1["hits"] + p2["hits"]]
    assert sorted(seeds) == CLIP_SEEDS  # every entry once, in score order
    scores = [h["score"] for h in p1["hits"] + p2["hits"]]
    assert scores == sorted(scores, reverse=True)
    names = sorted(p1["hits"][0]["terms"])  # the hover breakdown: one entry per term
    assert len(names) == 2 and names[0].startswith("brightness") and "#ff8800" in names[1], names


def test_text_and_like_queries(comfy_server: ComfyServer, libs: Path) -> None:
    r = _post(comfy_server, {"library": CLIP_LIB, "text": "a red apple", "negative_text": "blue", "limit": 3})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert len(hits) == 3 and {"text", "negative_text"} <= set(hits[0]["terms"])
    # more like this: the entry itself is its own best match (cosine 1 with its own embedding)
    like = _post(comfy_server, {"library": CLIP_LIB, "like": {"seed": hits[1]["seed"]}, "limit": 2}).json()
    assert like["hits"][0]["seed"] == hits[1]["seed"] and "image" in like["hits"][0]["terms"]
    # colour-only library: like by colour layout works, text explains itself
    like = _post(comfy_server, {"library": COLOUR_LIB, "like": {"seed": COLOUR_SEEDS[1]}}).json()
    assert like["hits"][0]["seed"] == str(COLOUR_SEEDS[1]) and {"layout", "palette"} <= set(like["hits"][0]["terms"])
    r = _post(comfy_server, {"library": COLOUR_LIB, "text": "a cat"})
    assert r.status_code == 400 and "colour-only" in r.json()["error"]


def test_thumbnail_is_the_stored_file(comfy_server: ComfyServer, libs: Path) -> None:
    r = _thumb(comfy_server, {"library": CLIP_LIB, "seed": str(CLIP_SEEDS[2]), "v": "x"})
    assert r.status_code == 200, r.text[:300]
    assert r.headers["Content-Type"] == "image/webp"
    assert r.content == (libs / CLIP_LIB / "thumbs" / f"{CLIP_SEEDS[2]}.webp").read_bytes()
    r = _thumb(comfy_server, {"library": CLIP_LIB, "seed": "999999"})
    assert r.status_code == 404 and "999999" in r.json()["error"]


def _upload(server: ComfyServer, data: bytes, content_type: str = "image/webp") -> Any:
    return server._http().post(f"{server.url}/noisequery/example", data=data, headers={"Content-Type": content_type},
                               timeout=60)


@pytest.mark.parametrize("lib,seeds,by", [pytest.param(CLIP_LIB, CLIP_SEEDS, ["clip", "colour", "palette"], id="clip"),
                                          pytest.param(COLOUR_LIB, COLOUR_SEEDS, ["colour", "palette"], id="colour-only")])
def test_like_an_uploaded_image(comfy_server: ComfyServer, libs: Path, lib: str, seeds: list[int], by: list[str]) -> None:
    # the entry's own thumbnail, uploaded as a user's file: the entry must come first
    for seed in (seeds[1], seeds[-1]):
        data = (libs / lib / "thumbs" / f"{seed}.webp").read_bytes()
        up = _upload(comfy_server, data)
        assert up.status_code == 200, up.text[:500]
        ex = up.json()
        assert ex["format"] == "WEBP" and ex["width"] > 0 and len(ex["id"]) == 32
        r = _post(comfy_server, {"library": lib, "like_image": {"id": ex["id"]}, "limit": 3}, api=True)
        assert r.status_code == 200, r.text[:500]
        got = r.json()
        assert got["hits"][0]["seed"] == str(seed), got["hits"]
        assert got["example_by"] == by and ("image" in got["hits"][0]["terms"]) is ("clip" in by)
        assert "layout" in got["hits"][0]["terms"] and "palette" in got["hits"][0]["terms"]
    # combined with a colour term; the same bytes give the same handle
    assert _upload(comfy_server, data).json()["id"] == ex["id"]
    r = _post(comfy_server, {"library": lib, "like_image": {"id": ex["id"], "weight": 2}, "colors": [{"color": "#ff8800"}]})
    assert r.status_code == 200 and len(r.json()["hits"][0]["terms"]) == len(by) + 1, r.text[:500]


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, 0).save(buf, "PNG")
    return buf.getvalue()


def test_bad_uploads_are_refused_with_a_message(comfy_server: ComfyServer, libs: Path) -> None:
    thumb = (libs / CLIP_LIB / "thumbs" / f"{CLIP_SEEDS[0]}.webp").read_bytes()
    photo = _png((64, 64))
    for data, kind, word in [
        (b"<html>not an image</html>", "image/png", "not an image"),
        (thumb[: len(thumb) // 2], "image/webp", "cannot be decoded"),
        (_png((15_000, 5_000), "1"), "image/png", "megapixels"),
        (_png((20_000, 20_000), "1"), "image/png", "too large"),
        (b"\x89PNG" + b"\0" * (8 * 1024 * 1024), "image/png", "8 MB"),
        (photo, "application/json", "Content-Type"),
        (photo, "text/plain", "Content-Type"),
        (b"", "image/png", "empty"),
    ]:
        r = _upload(comfy_server, data, kind)
        assert r.status_code == 400, f"{kind} {len(data)}: {r.status_code} {r.text[:300]}"
        assert word in r.json()["error"], r.json()["error"]
        _still_serving(comfy_server)
    # a handle the server never gave (or forgot): 400 with a code the panel acts on (it uploads again)
    r = _post(comfy_server, {"library": CLIP_LIB, "like_image": {"id": "0" * 32}})
    assert r.status_code == 400 and r.json()["code"] == "example_gone" and "again" in r.json()["error"]
    r = _post(comfy_server, {"library": CLIP_LIB, "like_image": {"id": "../../etc/passwd"}})
    assert r.status_code == 400 and "handle" in r.json()["error"]
    _still_serving(comfy_server)


# ------------------------------------------------------------------------------------------- bad requests

BAD_QUERIES: list[tuple[str, Any, str]] = [
    # (id, body, a word the message must contain)
    ("traversal", {"library": "../../etc", "text": "x"}, "'..'"),
    ("traversal-mid", {"library": "browser/../../x", "colors": [{"color": "#fff"}]}, "'..'"),
    ("backslash-traversal", {"library": "..\\..\\x", "colors": [{"color": "#fff"}]}, "'..'"),
    ("absolute", {"library": "/etc/passwd", "colors": [{"color": "#fff"}]}, "absolute"),
    ("drive", {"library": "C:/Windows", "colors": [{"color": "#fff"}]}, "absolute"),
    ("home", {"library": "~root/x", "colors": [{"color": "#fff"}]}, "absolute"),
    ("nul", {"library": "a\x00b", "colors": [{"color": "#fff"}]}, "NUL"),
    ("unknown-library", {"library": "browser/nope", "colors": [{"color": "#fff"}]}, "No noise library"),
    ("no-library", {"colors": [{"color": "#fff"}]}, "library"),
    ("library-type", {"library": 5, "colors": [{"color": "#fff"}]}, "string"),
    ("empty-query", {"library": CLIP_LIB}, "empty"),
    ("unknown-field", {"library": CLIP_LIB, "text": "x", "path": "/etc/passwd"}, "unknown"),
    ("text-type", {"library": CLIP_LIB, "text": 5}, "string"),
    ("text-long", {"library": CLIP_LIB, "text": "x" * 5000}, "at most"),
    ("weight-string", {"library": CLIP_LIB, "text": "x", "text_weight": "1"}, "number"),
    ("weight-bool", {"library": CLIP_LIB, "text": "x", "text_weight": True}, "number"),
    ("weight-range", {"library": CLIP_LIB, "text": "x", "negative_weight": 11}, "outside"),
    ("weight-huge", {"library": CLIP_LIB, "text": "x", "text_weight": 1e308 * 10}, "finite"),
    ("colors-type", {"library": CLIP_LIB, "colors": "#ff0000"}, "list"),
    ("colour-type", {"library": CLIP_LIB, "colors": [{"color": 16711680}]}, "string"),
    ("colour-syntax", {"library": CLIP_LIB, "colors": [{"color": "#ff88"}]}, "#RRGGBB"),
    ("colour-name", {"library": CLIP_LIB, "colors": [{"color": "red"}]}, "#RRGGBB"),
    ("colour-hex", {"library": CLIP_LIB, "colors": [{"color": "#gg0000"}]}, "#RRGGBB"),
    ("colours-many", {"library": CLIP_LIB, "colors": [{"color": "#fff"}] * 9}, "at most"),
    ("stat-name", {"library": CLIP_LIB, "stats": [{"name": "loudness", "target": 0.5}]}, "statistic"),
    ("stat-range", {"library": CLIP_LIB, "stats": [{"name": "brightness", "target": 2}]}, "outside"),
    ("stat-lo-hi", {"library": CLIP_LIB, "stats": [{"name": "contrast", "lo": 0.8, "hi": 0.2}]}, "above"),
    ("stat-none", {"library": CLIP_LIB, "stats": [{"name": "contrast"}]}, "neither"),
    ("stat-type", {"library": CLIP_LIB, "stats": [{"name": "contrast", "target": "high"}]}, "number"),
    ("region-name", {"library": CLIP_LIB, "regions": [{"region": "../top", "color": "#fff"}]}, "region"),
    ("region-lightness", {"library": CLIP_LIB, "regions": [{"region": "top", "lightness": -0.5}]}, "outside"),
    ("like-seed-negative", {"library": CLIP_LIB, "like": {"seed": -1}}, "outside"),
    ("like-seed-huge", {"library": CLIP_LIB, "like": {"seed": 2**64}}, "outside"),
    ("like-seed-text", {"library": CLIP_LIB, "like": {"seed": "12abc"}}, "seed number"),
    ("like-seed-absent", {"library": CLIP_LIB, "like": {"seed": 12345}}, "not an entry"),
    ("exclude-type", {"library": CLIP_LIB, "text": "x", "exclude_seeds": "1,2"}, "list"),
    ("exclude-range", {"library": CLIP_LIB, "text": "x", "exclude_seeds": [2**64]}, "outside"),
    ("limit-zero", {"library": CLIP_LIB, "text": "x", "limit": 0}, "outside"),
    ("limit-huge", {"library": CLIP_LIB, "text": "x", "limit": 10**9}, "outside"),
    ("limit-float", {"library": CLIP_LIB, "text": "x", "limit": 1.5}, "whole number"),
    ("offset-negative", {"library": CLIP_LIB, "text": "x", "offset": -1}, "outside"),
    ("offset-huge", {"library": CLIP_LIB, "text": "x", "offset": 10**12}, "outside"),
    ("body-list", [CLIP_LIB, "x"], "JSON object"),
    ("body-null", None, "JSON object"),
]

BAD_RAW: list[tuple[str, bytes, str]] = [
    ("truncated", b'{"library": "x", "text": ', "not valid JSON"),
    ("garbage", b"library=x&text=y", "not valid JSON"),
    ("empty", b"", "not valid JSON"),
    ("not-utf8", b'{"library": "\xff\xfe"}', "UTF-8"),
    ("nan", b'{"library": "' + CLIP_LIB.encode() + b'", "text": "x", "text_weight": NaN}', "NaN"),
    ("infinity", b'{"library": "' + CLIP_LIB.encode() + b'", "stats": [{"name": "contrast", "target": Infinity}]}',
     "Infinity"),
    ("huge-body", b'{"library": "x", "text": "' + b"a" * 70_000 + b'"}', "bytes"),
]


@pytest.mark.parametrize("body,word", [pytest.param(b, w, id=i) for i, b, w in BAD_QUERIES])
def test_bad_query_is_refused_with_a_message(comfy_server: ComfyServer, libs: Path, body: Any, word: str) -> None:
    r = _post(comfy_server, body)
    assert r.status_code == 400, f"{r.status_code}: {r.text[:500]}"
    msg = r.json()["error"]
    assert word in msg, msg
    _still_serving(comfy_server)


@pytest.mark.parametrize("raw,word", [pytest.param(b, w, id=i) for i, b, w in BAD_RAW])
def test_malformed_body_is_refused_with_a_message(comfy_server: ComfyServer, libs: Path, raw: bytes, word: str) -> None:
    r = _post(comfy_server, None, raw=raw)
    assert r.status_code == 400, f"{r.status_code}: {r.text[:500]}"
    assert word in r.json()["error"], r.json()["error"]
    _still_serving(comfy_server)


@pytest.mark.parametrize("params,word", [
    pytest.param({"library": "../../etc", "seed": "1"}, "'..'", id="traversal"),
    pytest.param({"library": "/etc", "seed": "1"}, "absolute", id="absolute"),
    pytest.param({"library": "browser/nope", "seed": "1"}, "No noise library", id="unknown-library"),
    pytest.param({"library": CLIP_LIB, "seed": "-1"}, "seed number", id="seed-negative"),
    pytest.param({"library": CLIP_LIB, "seed": str(2**64)}, "outside", id="seed-huge"),
    pytest.param({"library": CLIP_LIB, "seed": "1e3"}, "seed number", id="seed-float"),
    pytest.param({"library": CLIP_LIB, "seed": "../../x"}, "seed number", id="seed-path"),
    pytest.param({"library": CLIP_LIB}, "seed", id="no-seed"),
    pytest.param({"library": CLIP_LIB, "seed": "20", "path": "/etc/passwd"}, "takes library", id="path-param"),
    pytest.param([("library", CLIP_LIB), ("seed", "20"), ("seed", "21")], "once", id="seed-twice"),
])
def test_bad_thumbnail_request_is_refused(comfy_server: ComfyServer, libs: Path, params: Any, word: str) -> None:
    r = _thumb(comfy_server, params)
    assert r.status_code == 400, f"{r.status_code}: {r.text[:500]}"
    assert word in r.json()["error"], r.json()["error"]
    _still_serving(comfy_server)


def test_links_out_of_the_folder_are_not_followed(comfy_server: ComfyServer, libs: Path, tmp_path: Path) -> None:
    # a library folder outside noise_libraries, linked in under a valid name
    from noisequery_core import Library

    src = Library.open(libs / COLOUR_LIB)
    outside = tmp_path / "outside_lib"
    Library.create(outside, src.generation, src.features)
    link = libs / "browser" / "escape"
    link.symlink_to(outside, target_is_directory=True)
    # a thumbnail inside a real library that links to a secret file elsewhere
    secret = tmp_path / "secret.webp"
    secret.write_bytes(b"RIFF-secret-bytes")
    seed = COLOUR_SEEDS[0]
    thumb = libs / COLOUR_LIB / "thumbs" / f"{seed}.webp"
    saved = thumb.read_bytes()
    thumb.unlink()
    thumb.symlink_to(secret)
    try:
        r = _post(comfy_server, {"library": "browser/escape", "colors": [{"color": "#fff"}]})
        assert r.status_code == 400 and "outside" in r.json()["error"], r.text[:500]
        r = _thumb(comfy_server, {"library": "browser/escape", "seed": "1"})
        assert r.status_code == 400 and "outside" in r.json()["error"], r.text[:500]
        listed = {d["name"] for d in comfy_server.get_json("/noisequery/libraries")["libraries"]}
        assert "browser/escape" not in listed
        r = _thumb(comfy_server, {"library": COLOUR_LIB, "seed": str(seed)})
        assert r.status_code == 404 and b"secret" not in r.content, r.content[:200]
    finally:
        link.unlink()
        thumb.unlink()
        thumb.write_bytes(saved)
        os.utime(thumb)
    _still_serving(comfy_server)


def test_server_keeps_serving_after_a_burst_of_bad_requests(comfy_server: ComfyServer, libs: Path) -> None:
    for _, body, _ in BAD_QUERIES:
        _post(comfy_server, body)
    for _, raw, _ in BAD_RAW:
        _post(comfy_server, None, raw=raw)
    r = _post(comfy_server, {"library": COLOUR_LIB, "colors": [{"color": "#00ff00"}]})
    assert r.status_code == 200 and len(r.json()["hits"]) == 3
    _still_serving(comfy_server)
