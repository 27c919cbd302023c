"""Shared fixtures: synthetic seed images, tiny libraries, a deterministic fake CLIP.

Also the CI rule: with CI set (any value but empty/0/false/no) or NOISEQUERY_REQUIRE_HOST=1 (scripts/test.sh
exports it when it sets the host up), a test under tests/host/ that skips -- no ComfyUI, no Chromium, no
playwright, no newest frontend -- FAILS with its skip reason, so that CI can never pass without running them.
Outside CI those tests skip with the reason shown in the summary (-ra). tests/core/ has no skips.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from noisequery_core.library.manifest import ClipIdentity

HOST_TESTS = Path(__file__).resolve().parent / "host"


def require_host() -> bool:
    """True in CI (CI set, as .ci/run is run) or with NOISEQUERY_REQUIRE_HOST=1: host/browser skips then fail."""
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return ci or os.environ.get("NOISEQUERY_REQUIRE_HOST", "").strip() == "1"


def pytest_report_header(config: pytest.Config) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    env = os.environ.get("COMFYUI_PATH", "").strip()
    host = Path(env).expanduser() if env else Path.home() / "ComfyUI"
    found = (host / "main.py").is_file() and (host / "comfy").is_dir()
    try:
        pinned = version("comfyui-frontend-package")
    except PackageNotFoundError:
        pinned = "not installed"
    newest = os.environ.get("NOISEQUERY_NEWEST_FRONTEND", "")
    newest_v = os.environ.get("NOISEQUERY_NEWEST_FRONTEND_VERSION", "?")
    return [f"host: ComfyUI {'at ' + str(host) if found else 'NOT found at ' + str(host)}; "
            f"host/browser skips {'FAIL (CI / NOISEQUERY_REQUIRE_HOST=1)' if require_host() else 'allowed'}",
            f"frontends: pinned comfyui-frontend-package {pinned}; newest "
            + (f"{newest_v} ({newest})" if newest else "not downloaded (NOISEQUERY_NEWEST_FRONTEND unset)")]


_TIERS: dict[str, dict[str, float]] = {}
_ROOT: list[Path] = []


def pytest_configure(config: pytest.Config) -> None:
    _ROOT[:] = [config.rootpath]


def _tier(path: Path) -> str:
    if not path.is_absolute() and _ROOT:
        path = _ROOT[0] / path
    if not path.resolve().is_relative_to(HOST_TESTS):
        return "core"
    if path.stem == "test_harness_smoke":  # the harness testing itself, not the pack
        return "harness"
    return "browser" if path.stem.endswith("_browser") else "host"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Per tier (core, host, browser; harness = the test harness's own self-tests): outcome counts and the time spent in setup + call + teardown."""
    t = _TIERS.setdefault(_tier(Path(report.fspath)), {})
    t["seconds"] = t.get("seconds", 0.0) + report.duration
    if report.when == "call" or (report.when == "setup" and not report.passed) or (
            report.when == "teardown" and report.failed):
        key = "xfailed" if hasattr(report, "wasxfail") else ("error" if report.when != "call" and report.failed
                                                              else report.outcome)
        t[key] = t.get(key, 0) + 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for name in ("core", "host", "browser", "harness"):
        t = _TIERS.get(name)
        if t:
            counts = ", ".join(f"{int(v)} {k}" for k, v in t.items() if k != "seconds")
            terminalreporter.write_line(f"tier {name}: {counts} ({t['seconds']:.0f} s in its tests)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """In CI, a skipped host or browser test is reported as failed, with the skip reason."""
    outcome = yield
    rep = outcome.get_result()
    if not rep.skipped or hasattr(rep, "wasxfail") or not require_host():
        return
    if not Path(str(item.path)).resolve().is_relative_to(HOST_TESTS):
        return
    reason = str(rep.longrepr[2] if isinstance(rep.longrepr, tuple) else rep.longrepr).removeprefix("Skipped: ")
    rep.outcome = "failed"
    # one line: it is what the short summary shows. `CI=true bash scripts/test.sh` sets the host up.
    rep.longrepr = f"skipped, a failure in CI (CI / NOISEQUERY_REQUIRE_HOST=1): {reason}"


def solid(rgb: tuple[int, int, int], size: int = 64) -> Image.Image:
    return Image.new("RGB", (size, size), rgb)


def halves(top: tuple[int, int, int], bottom: tuple[int, int, int], size: int = 64) -> Image.Image:
    a = np.zeros((size, size, 3), np.uint8)
    a[: size // 2] = top
    a[size // 2 :] = bottom
    return Image.fromarray(a)


COLOR_WORDS = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple")


class FakeEmbedder:
    """Deterministic stand-in for CLIP: text "red" ↦ the unit vector of the word's index.

    Image rows in tests are built with ``FakeEmbedder.vector(word)`` too, so a text query
    for a colour word must rank rows of that word first. Same interface as ClipEmbedder.
    """

    dim = 16

    def __init__(self, identity: ClipIdentity | None = None):
        self.identity = identity or ClipIdentity("fake", "v1", self.dim)

    @classmethod
    def vector(cls, word: str, noise: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
        v = np.zeros(cls.dim, np.float32)
        for w in word.split():
            if w in COLOR_WORDS:
                v[COLOR_WORDS.index(w)] += 1.0
        if not v.any():
            v[-1] = 1.0
        if noise and rng is not None:
            v = v + rng.standard_normal(cls.dim).astype(np.float32) * noise
        return v / np.linalg.norm(v)

    def encode_text(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.vector(t) for t in texts])


@pytest.fixture
def fake_embedder() -> FakeEmbedder:
    return FakeEmbedder()


@pytest.fixture(scope="session")
def tiny_clip_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny open_clip architecture (real CLIP class, small widths) and random weights on disk."""
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("tinyclip")
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    cfg_path = d / "tiny-clip.json"
    cfg_path.write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(1234)
    model = open_clip.create_model("tiny-clip")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    st = d / "tiny.safetensors"
    save_file(sd, str(st))
    pt = d / "tiny.pt"
    torch.save(sd, pt)
    return {"config": cfg_path, "safetensors": st, "pt": pt, "dir": d}


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_files: dict[str, Path]):  # type: ignore[no-untyped-def]
    from noisequery_core.search.clip import ClipSpec, load_clip

    f = tiny_clip_files
    return load_clip(ClipSpec("", str(f["safetensors"]), str(f["config"])), allow_download=False)
