"""The page driving shared by the browser check scripts: a ComfyUI with the pack, its page in Chromium, Run, verdict.

    with page_driver.session(args, "nq_explore_ui_", log) as s:    # work folder, tiny checkpoint, server, settings
        with page_driver.page(s, "explore") as page:                # headless Chromium on the page, app ready
            entry = page_driver.run_button(page, s.server)          # press Run, wait for the prompt it queued
    return page_driver.verdict(s)                                   # page problems + failures -> exit status

Built on the harness the host tests use (tests/host/comfy_harness.py: ComfyServer, the Run button's selector, the
newer frontend's known complaints) and on scripts/make_ui_workflows.py's Page (one Chromium tab that records console
errors, page errors and failed requests, with the page helpers `__nq`); each script keeps only its own checks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests" / "host"))

import comfy_harness  # noqa: E402
import make_ui_workflows as mk  # noqa: E402

# First-visit templates dialog off; minimap and canvas stats off so that they cover no node in a screenshot.
PAGE_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}

Problem = dict[str, str]  # mk.Page's record: {"page", "kind", "text"}


def logger(name: str) -> Callable[[str], None]:
    """A script's log line printer: ``[name HH:MM:SS] message``."""

    def log(msg: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    return log


class Failures(list):  # type: ignore[type-arg]
    """Failures, each also logged when it happens (the order of the checks stays readable)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        super().__init__()
        self.log = log

    def append(self, item: str) -> None:
        self.log(f"FAILED: {item}")
        super().append(item)


def add_arguments(ap: argparse.ArgumentParser, pictures_help: str) -> None:
    """The options every page check takes: --no-pictures, --workdir, --front-end-root."""
    ap.add_argument("--no-pictures", action="store_true", help=pictures_help)
    ap.add_argument("--workdir", type=Path, help="keep the checkpoint and server files here")
    ap.add_argument("--front-end-root", type=Path, help="serve this frontend (the static folder of an unzipped "
                    "comfyui-frontend-package wheel) instead of the installed one")


@dataclass
class Session:
    """A running ComfyUI with the pack and a tiny checkpoint, and what the checks found."""

    args: argparse.Namespace
    log: Callable[[str], None]
    work: Path  # the work folder (deleted afterwards unless --workdir)
    models: Path  # <work>/models: checkpoints/, noise_libraries/, noisequery_clip/
    ckpt: Path  # the tiny random SD1.5 checkpoint
    server: comfy_harness.ComfyServer
    problems: list[Problem] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def shots(self) -> Path:
        """Where the screenshots go: docs/, or the work folder with --no-pictures."""
        return self.work if self.args.no_pictures else mk.DOCS


@contextmanager
def session(args: argparse.Namespace, prefix: str, log: Callable[[str], None],
            model_dirs: Mapping[str, Path] | None = None, env: Mapping[str, str] | None = None) -> Iterator[Session]:
    """The work folder (--workdir or a fresh temporary one, removed afterwards), the tiny SD1.5 checkpoint, and a
    ComfyUI server with this repo as the NoiseQuery pack, the page settings applied. ``model_dirs`` adds or replaces
    model folders (default: <work>/models/noise_libraries and noisequery_clip, created)."""
    comfy = comfy_harness.find_comfyui()
    if comfy is None:
        raise SystemExit(comfy_harness.SKIP_REASON)
    if not Path(mk.CHROMIUM).is_file():
        raise SystemExit(f"{mk.CHROMIUM} missing: apt-get install -y --no-install-recommends chromium")
    work = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix=prefix))
    models = work / "models"
    ckpt = models / "checkpoints" / comfy_harness.TINY_CKPT_NAME
    if not ckpt.is_file():
        comfy_harness.make_tiny_sd15_checkpoint(ckpt, comfy)
    dirs = {"checkpoints": ckpt.parent, "noise_libraries": models / "noise_libraries",
            "noisequery_clip": models / "noisequery_clip", **(model_dirs or {})}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    server = comfy_harness.ComfyServer(comfy, packs={"NoiseQuery": ROOT}, workdir=work / "server", model_dirs=dirs,
                                       front_end_root=args.front_end_root,
                                       env={**os.environ, **env} if env else None)
    try:
        with server:
            log(f"ComfyUI up at {server.url} after {server.startup_seconds:.1f}s")
            http = server._http()
            for key, value in PAGE_SETTINGS.items():
                http.post(f"{server.url}/settings/{key}", data=json.dumps(value), timeout=30).raise_for_status()
            yield Session(args, log, work, models, ckpt, server, failures=Failures(log))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


@contextmanager
def page(s: Session, label: str) -> Iterator[mk.Page]:
    """Headless Chromium on the server's page, the app ready and the page helpers loaded; a failure when the page
    runs another frontend than the one asked for. Closed afterwards."""
    from playwright.sync_api import sync_playwright

    want = comfy_harness.frontend_version(s.args.front_end_root)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=mk.CHROMIUM, args=mk.CHROMIUM_FLAGS, headless=True)
        try:
            tab = mk.Page(browser, s.server.url, label, s.problems)
            served = tab.js("() => window.__COMFYUI_FRONTEND_VERSION__ ?? null")
            s.log(f"frontend: the page runs comfyui-frontend-package {served}")
            if want != "?" and served != want:
                s.failures.append(f"the page runs frontend {served}, not {want}")
            yield tab
            tab.close()
        finally:
            browser.close()


def run_button(tab: mk.Page, server: comfy_harness.ComfyServer, timeout: float = 300) -> dict[str, Any]:
    """Press the page's Run button and wait for the prompt it queued; returns its history entry."""
    known = set(server.history())
    tab.page.click(comfy_harness.RUN_BUTTON)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = set(server.history()) - known
        if new:
            return server.wait(new.pop(), timeout=timeout)
        time.sleep(0.2)
    raise SystemExit("Run queued nothing")


def widget(tab: mk.Page, node_id: int, name: str) -> Any:
    """The value of a node's widget on the page (None when the node has no such widget)."""
    return tab.js("([i, n]) => app.graph.getNodeById(i).widgets.find(w => w.name === n)?.value", [node_id, name])


def verdict(s: Session, benign: Callable[[Problem], bool] = lambda p: False,
            newer_benign: Callable[[Problem], bool] = lambda p: False) -> int:
    """Print the page's problems and the failures, then OK or FAILED; the exit status (0 when none).

    Not problems: the 404s of a fresh user folder, what ``benign`` says, and with --front-end-root (a newer frontend
    than the host's) its known complaints and what ``newer_benign`` says: those are not the pack's."""
    real = [p for p in s.problems if p["kind"] != "http-benign" and not benign(p)]
    if s.args.front_end_root is not None:
        def noise(p: Problem) -> str | None:
            return comfy_harness.newer_frontend_noise(f"{p['kind']}: {p['text']}") or (
                "script-specific" if newer_benign(p) else None)

        ignored = [p for p in real if noise(p)]
        real = [p for p in real if p not in ignored]
        if ignored:
            kinds = sorted({str(noise(p)) for p in ignored})
            print(f"{len(ignored)} known newer-frontend complaints ignored ({'; '.join(kinds)})")
    for p in real:
        print(f"page problem: [{p['page']}] {p['kind']}: {p['text']}")
    for f in s.failures:
        print("FAILED:", f)
    print("OK" if not (s.failures or real) else "FAILED")
    return 1 if s.failures or real else 0
