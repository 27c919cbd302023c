#!/usr/bin/env python3
"""Run an API-format workflow on a running ComfyUI and download its images (stdlib only).

    python scripts/comfy_api_run.py example_workflows/api/text_query_ksampler.json \
        --server http://127.0.0.1:8188 --set 6.text="a snowy forest" --set 1.ckpt_name=sd15.safetensors --out results/

--set NODE.INPUT=VALUE overrides a widget value (VALUE is parsed as JSON when it can be, else
taken as a string; an input that holds a string in the workflow always gets the string, so a JSON
text such as an explorer history stays text). Exits 0 on success, 1 when ComfyUI rejects or fails the prompt (its error
is printed), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any


def _request(server: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(server.rstrip("/") + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        raw = r.read()
    return json.loads(raw) if raw[:1] in (b"{", b"[") else raw


def apply_overrides(graph: dict[str, Any], sets: list[str]) -> None:
    for item in sets:
        target, sep, value = item.partition("=")
        node, dot, inp = target.partition(".")
        if not sep or not dot or node not in graph:
            raise SystemExit(f"error: --set {item!r}: write NODE.INPUT=VALUE with a node id of the workflow ({', '.join(graph)})")
        parsed: Any = value
        if not isinstance(graph[node]["inputs"].get(inp), str):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                pass
        graph[node]["inputs"][inp] = parsed


def run(server: str, graph: dict[str, Any], out: Path, timeout: float) -> int:
    client_id = uuid.uuid4().hex
    try:
        resp = _request(server, "/prompt", {"prompt": graph, "client_id": client_id})
    except urllib.error.HTTPError as exc:
        print(f"ComfyUI refused the workflow (HTTP {exc.code}):\n{exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        print(f"error: cannot reach ComfyUI at {server}: {exc.reason}", file=sys.stderr)
        return 2
    prompt_id = resp["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        hist = _request(server, f"/history/{prompt_id}")
        entry = hist.get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None and (entry["status"]["completed"] or entry["status"]["status_str"] == "error"):
            break
        time.sleep(0.5)
    else:
        print(f"error: prompt {prompt_id} did not finish within {timeout:.0f} s", file=sys.stderr)
        return 1
    for event, data in entry["status"].get("messages", []):
        if event in ("execution_error", "execution_interrupted"):
            print(f"{event} in node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_message', '').strip()}", file=sys.stderr)
            return 1
    out.mkdir(parents=True, exist_ok=True)
    for node_id, ui in entry.get("outputs", {}).items():
        for text in ui.get("text", []):
            print(f"[{node_id}] {text}")
        for text in ui.get("noisequery_history", []):  # NoiseQueryVariations: send it back as --set N.history=...
            print(f"[{node_id}] history: {text}")
        # "images", and image lists under other keys (the Variant Picker's "noisequery_variants")
        records = [r for v in ui.values() if isinstance(v, list) for r in v if isinstance(r, dict) and "filename" in r]
        for img in records:
            q = urllib.parse.urlencode({"filename": img["filename"], "subfolder": img.get("subfolder", ""), "type": img.get("type", "output")})
            data = _request(server, f"/view?{q}")
            dest = out / f"{node_id}_{img['filename']}"
            dest.write_bytes(data)
            print(f"[{node_id}] saved {dest}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflow", type=Path, help="API-format workflow JSON (Export (API) in ComfyUI)")
    ap.add_argument("--server", default="http://127.0.0.1:8188")
    ap.add_argument("--set", action="append", default=[], help="NODE.INPUT=VALUE override; repeatable")
    ap.add_argument("--out", type=Path, default=Path("comfy_results"))
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args()
    try:
        graph = json.loads(args.workflow.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"error: cannot read workflow {args.workflow}: {exc}", file=sys.stderr)
        return 2
    graph = {k: v for k, v in graph.items() if isinstance(v, dict) and "class_type" in v}
    apply_overrides(graph, args.set)
    return run(args.server, graph, args.out, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
