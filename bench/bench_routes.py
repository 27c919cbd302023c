"""Latency of the library browser's HTTP routes (nodes/server_routes.py) on a real ComfyUI, side by side in one run.

    .venv/bin/python bench/bench_routes.py [--n 100000] [--queries 30] [--workdir DIR] [--json OUT]

What it does:

1. writes a synthetic N-entry library (bench/bench_query.py's ``SyntheticRows``: clustered CLIP vectors, plausible
   colour columns) whose CLIP identity is ViT-B-32/openai, builds its ANN index, and starts a headless ComfyUI
   (tests/host/comfy_harness.py, --cpu) with this repo as the NoiseQuery pack, the library in its noise_libraries
   folder and RANDOM-weight ViT-B-32 weights in noisequery_clip — the real architecture, so text encoding costs
   what it costs with real weights; the hits themselves mean nothing;
2. over HTTP (one keep-alive session, as a page would): colour/statistic queries, first page of 48, each one new
   (no result cache); text queries with a new text each time (the CLIP text encoder runs); text queries repeating
   one text with a new weight each time (the encoded text is cached, the ranking is not); a page of 48
   thumbnails (256 px webp, written for the hits) fetched over 6 connections like a browser: time until all 48
   have arrived; the server's own ``elapsed_ms`` next to the HTTP time says what dominates;
3. GET /object_info latency idle, during a burst of queries (4 client threads) and during a library build
   (BuildNoiseLibrary with the tiny random SD1.5 checkpoint running in the prompt queue).
Prints a markdown table with PASS/FAIL per target and writes JSON (bench/results/bench_routes.json by default).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench", ROOT / "tests" / "host"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import comfy_harness  # noqa: E402
from bench_env import environment  # noqa: E402
from bench_query import CHUNK_ROWS, SyntheticRows  # noqa: E402

from noisequery_core.library.manifest import ClipIdentity, FeatureSet, GenerationKey  # noqa: E402
from noisequery_core.library.storage import Library, encode_thumbnail, write_thumbnail  # noqa: E402
from noisequery_core.search import color, index  # noqa: E402

LIBRARY = "bench/routes"
PAGE = 48
TARGETS_MS = {"colour_p50": 50.0, "text_new_p50": 150.0, "text_repeated_p50": 50.0, "thumbs_page_p50": 300.0}
COLOURS = ["#ff8800", "#3366ff", "#22aa44", "#dd2222", "#aa44cc", "#eeeeee", "#111111", "#ffcc00"]
WORDS = ["red", "blue", "forest", "sunset", "city", "cat", "portrait", "ocean", "mountain", "night", "snow", "desert"]


def log(msg: str) -> None:
    print(f"[bench_routes {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pctl(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50": round(float(np.percentile(a, 50)), 2), "p95": round(float(np.percentile(a, 95)), 2),
            "max": round(float(a.max()), 2), "n": len(ms)}


def write_library(folder: Path, n: int) -> float:
    gen = GenerationKey(model="bench", latent_shape=(4, 64, 64), sampler="euler", steps=20, cfg=7.0)
    feats = FeatureSet(clip=ClipIdentity("ViT-B-32", "openai", 512), color_version=color.COLOR_VERSION,
                       thumbnail_size=256, thumbnail_format="webp")
    lib = Library.create(folder, gen, feats, exist_ok=False)
    synth = SyntheticRows(n, 512, clusters=max(1000, n // 200), noise=0.6)
    t0 = time.perf_counter()
    with lib.writer(durable=False) as w:
        for s in range(0, n, CHUNK_ROWS):
            seeds, cols = synth.chunk(s, min(n, s + CHUNK_ROWS))
            w.append(seeds, cols)
        index.maintain_index(lib)
    return time.perf_counter() - t0


def thumbnail_for(seed: int, features: FeatureSet) -> bytes:
    """A 256 px smooth-noise picture (compresses like a real render, not like white noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed % (2**32))
    small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((256, 256), Image.Resampling.BICUBIC)
    data = encode_thumbnail(im, features)
    assert data is not None
    return data


class Client:
    def __init__(self, url: str):
        import requests

        self.url = url
        self.s = requests.Session()

    def query(self, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        t0 = time.perf_counter()
        r = self.s.post(f"{self.url}/api/noisequery/query", data=json.dumps(body), timeout=120)
        ms = (time.perf_counter() - t0) * 1000
        if r.status_code != 200:
            raise SystemExit(f"query {body} → {r.status_code}: {r.text[:500]}")
        return ms, r.json()


def thumbs_page(url: str, seeds: list[str], sessions: list[Any]) -> float:
    """Time until all thumbnails of a page have arrived, over len(sessions) keep-alive connections."""
    def get(i_seed: tuple[int, str]) -> int:
        i, seed = i_seed
        r = sessions[i % len(sessions)].get(f"{url}/api/noisequery/thumbnail", params={"library": LIBRARY, "seed": seed},
                                             timeout=60)
        r.raise_for_status()
        return len(r.content)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(sessions)) as pool:
        list(pool.map(get, enumerate(seeds)))
    return (time.perf_counter() - t0) * 1000


def object_info_during(url: str, seconds: float, busy: threading.Event | None = None) -> list[float]:
    import requests

    s = requests.Session()
    out: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and (busy is None or not busy.is_set()):
        t0 = time.perf_counter()
        s.get(f"{url}/object_info", timeout=120).raise_for_status()
        out.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="library entries")
    ap.add_argument("--queries", type=int, default=30, help="timed requests per kind")
    ap.add_argument("--workdir", type=Path, help="keep the library, checkpoint and server files here")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "bench_routes.json")
    args = ap.parse_args()
    comfy = comfy_harness.find_comfyui()
    if comfy is None:
        raise SystemExit(comfy_harness.SKIP_REASON)
    work = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="nq_bench_routes_"))
    models = work / "models"
    libs = models / "noise_libraries"
    import os

    # the machine is shared: the load average says how many other runnable processes competed for the cores
    res: dict[str, Any] = {"n": args.n, "page": PAGE, "env": environment(), "loadavg_start": os.getloadavg()}
    try:
        lib_dir = libs / LIBRARY
        if not (lib_dir / "manifest.json").is_file():
            shutil.rmtree(lib_dir, ignore_errors=True)
            lib_dir.parent.mkdir(parents=True, exist_ok=True)
            res["library_write_s"] = round(write_library(lib_dir, args.n), 1)
            log(f"wrote {args.n:,} entries + index in {res['library_write_s']}s")
        lib = Library.open(lib_dir)
        weights = models / "noisequery_clip" / "ViT-B-32" / "openai.safetensors"
        if not weights.is_file():
            comfy_harness.write_random_open_clip_weights(weights, "ViT-B-32", seed=0)
        ckpt = models / "checkpoints" / comfy_harness.TINY_CKPT_NAME
        if not ckpt.is_file():
            comfy_harness.make_tiny_sd15_checkpoint(ckpt, comfy)
        server = comfy_harness.ComfyServer(comfy, packs={"NoiseQuery": ROOT}, workdir=work / "server",
                                           model_dirs={"checkpoints": ckpt.parent, "noise_libraries": libs,
                                                       "noisequery_clip": models / "noisequery_clip"},
                                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
        with server:
            url = server.url
            c = Client(url)
            # warm-up: open the library, load the text encoder, map the columns and the index
            t0 = time.perf_counter()
            c.query({"library": LIBRARY, "text": "warm up", "limit": PAGE})
            res["first_text_query_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            c.query({"library": LIBRARY, "colors": [{"color": "#808080"}], "limit": PAGE})
            log(f"warm: first text query (loads ViT-B-32) {res['first_text_query_ms']} ms")

            # the floor: a route whose work is tiny (list one library), same executor hop, same client
            floor = []
            for _ in range(args.queries):
                t0 = time.perf_counter()
                c.s.get(f"{url}/api/noisequery/libraries", timeout=60).raise_for_status()
                floor.append((time.perf_counter() - t0) * 1000)
            res["libraries_route"] = {"http_ms": pctl(floor)}
            log(f"GET /noisequery/libraries (the HTTP + worker-thread floor): p50 {res['libraries_route']['http_ms']['p50']} ms")
            rng = np.random.default_rng(0)
            kinds: dict[str, list[tuple[float, float]]] = {"colour": [], "text_new": [], "text_repeated": []}
            pages: list[list[str]] = []
            for i in range(args.queries):
                body = {"library": LIBRARY, "limit": PAGE,
                        "colors": [{"color": COLOURS[i % len(COLOURS)], "weight": 1.0 + i / 100}],
                        "stats": [{"name": "brightness", "target": round(float(rng.uniform(0.2, 0.8)), 3)}]}
                ms, got = c.query(body)
                kinds["colour"].append((ms, got["elapsed_ms"]))
                pages.append([h["seed"] for h in got["hits"]])
                text = f"a {WORDS[i % len(WORDS)]} {WORDS[(i * 5 + 3) % len(WORDS)]} number {i}"
                ms, got = c.query({"library": LIBRARY, "text": text, "limit": PAGE})
                kinds["text_new"].append((ms, got["elapsed_ms"]))
                ms, got = c.query({"library": LIBRARY, "text": "a red sunset over the sea", "text_weight": 1.0 + i / 100,
                                   "limit": PAGE})
                kinds["text_repeated"].append((ms, got["elapsed_ms"]))
            for k, v in kinds.items():
                res[k] = {"http_ms": pctl([a for a, _ in v]), "server_ms": pctl([b for _, b in v])}
                log(f"{k}: HTTP p50 {res[k]['http_ms']['p50']} ms (server {res[k]['server_ms']['p50']} ms)")

            # thumbnails: written for the hits of the colour queries, fetched a page at a time
            for seeds in pages:
                for s in seeds:
                    write_thumbnail(thumbnail_for(int(s), lib.features), lib_dir, int(s), lib.features)
            import requests

            sessions = [requests.Session() for _ in range(6)]
            thumbs_page(url, pages[0], sessions)  # connections up
            times = [thumbs_page(url, seeds, sessions) for seeds in pages[1:]]
            sizes = [len(thumbnail_for(int(s), lib.features)) for s in pages[0]]
            res["thumbs_page"] = {"http_ms": pctl(times), "bytes_per_thumb_mean": int(statistics.mean(sizes))}
            log(f"thumbnails: a page of {PAGE} in p50 {res['thumbs_page']['http_ms']['p50']} ms")

            # /object_info: idle, during a query burst, during a build
            res["object_info_idle"] = pctl(object_info_during(url, 6))
            stop = threading.Event()

            def burst(j: int) -> int:
                cl, n = Client(url), 0
                while not stop.is_set():
                    cl.query({"library": LIBRARY, "text": f"burst {j} {n}", "colors": [{"color": COLOURS[n % 8]}],
                              "limit": PAGE})
                    n += 1
                return n

            with ThreadPoolExecutor(4) as pool:
                futs = [pool.submit(burst, j) for j in range(4)]
                time.sleep(1.0)
                res["object_info_query_burst"] = pctl(object_info_during(url, 10))
                stop.set()
                res["burst_queries"] = sum(f.result() for f in futs)
            graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt.name}},
                     "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
                     "3": {"class_type": "BuildNoiseLibrary", "inputs": {
                         "model": ["1", 0], "vae": ["1", 2], "positive": ["2", 0], "negative": ["2", 0],
                         "library_name": "bench/build_during", "width": 64, "height": 64, "seed_start": 0,
                         "count": 64, "batch_size": 8, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
                         "scheduler": "normal", "clip_model": "none", "thumbnail_size": 64}}}
            pid = server.post_prompt(graph)
            assert isinstance(pid, str), pid
            server.wait_running(pid, timeout=60)
            done = threading.Event()
            waiter = threading.Thread(target=lambda: (server.wait(pid, timeout=600), done.set()))
            waiter.start()
            res["object_info_build"] = pctl(object_info_during(url, 60, done))
            waiter.join()
            log(f"/object_info p50 idle {res['object_info_idle']['p50']} ms, query burst "
                f"{res['object_info_query_burst']['p50']} ms ({res['burst_queries']} queries in 10 s), build "
                f"{res['object_info_build']['p50']} ms")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    res["loadavg_end"] = os.getloadavg()
    rows = [("colour/statistic query, page of 48", "colour", TARGETS_MS["colour_p50"]),
            ("text query, new text (ViT-B-32 encode)", "text_new", TARGETS_MS["text_new_p50"]),
            ("text query, repeated text", "text_repeated", TARGETS_MS["text_repeated_p50"])]
    lines = [f"N = {args.n:,}, {PAGE} hits per page, HTTP over one keep-alive connection; server = the route's own "
             f"elapsed_ms; load average {res['loadavg_start'][0]:.1f} → {res['loadavg_end'][0]:.1f} on "
             f"{os.cpu_count()} cores", "", "| request | HTTP p50 | p95 | server p50 | target p50 | |", "|---|---|---|---|---|---|"]
    res["pass"] = {}
    for label, k, target in rows:
        h, s = res[k]["http_ms"], res[k]["server_ms"]
        ok = h["p50"] <= target
        res["pass"][k] = ok
        lines.append(f"| {label} | {h['p50']} ms | {h['p95']} ms | {s['p50']} ms | ≤ {target:g} ms | {'PASS' if ok else 'FAIL'} |")
    t = res["thumbs_page"]["http_ms"]
    ok = t["p50"] <= TARGETS_MS["thumbs_page_p50"]
    res["pass"]["thumbs_page"] = ok
    lines.append(f"| 48 thumbnails (256 px webp, ~{res['thumbs_page']['bytes_per_thumb_mean'] // 1024} KB), 6 connections "
                 f"| {t['p50']} ms | {t['p95']} ms | – | ≤ {TARGETS_MS['thumbs_page_p50']:g} ms | {'PASS' if ok else 'FAIL'} |")
    f = res["libraries_route"]["http_ms"]
    lines.append(f"| GET /noisequery/libraries (floor: HTTP + worker thread) | {f['p50']} ms | {f['p95']} ms | – | – | |")
    lines += ["", "| GET /object_info | p50 | p95 | max |", "|---|---|---|---|"]
    for label, k in (("idle", "object_info_idle"), ("during a query burst (4 clients)", "object_info_query_burst"),
                     ("during BuildNoiseLibrary", "object_info_build")):
        o = res[k]
        lines.append(f"| {label} | {o['p50']} ms | {o['p95']} ms | {o['max']} ms |")
    print("\n".join(lines))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {args.json}")
    return 0 if all(res["pass"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
