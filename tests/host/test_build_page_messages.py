"""What the Build Noise Library node tells the page: its report on the very first build (with the built batch),
and, offline without CLIP weights, that clip_model `none` builds a colour-only library right now (issue 13)."""
from __future__ import annotations

import uuid

import comfy_harness
import nq_graphs as g
import pytest

pytestmark = pytest.mark.skipif(comfy_harness.find_comfyui() is None, reason=comfy_harness.SKIP_REASON)


def test_first_build_sends_its_report_with_the_batch(comfy_runner: comfy_harness.InProcessRunner,
                                                     tiny_ckpt_name: str) -> None:
    name = f"first_{uuid.uuid4().hex[:8]}"
    graph = {**g.base(tiny_ckpt_name), "4": g.build(name, count=2, batch_size=2)}
    entry = comfy_runner.run(graph)
    assert comfy_harness.execution_error(entry) is None, str(entry)[:2000]
    ui = entry["outputs"]["4"]
    assert ui.get("images"), f"no built batch shown: {ui}"
    text = "\n".join(ui.get("text", []))
    assert name in text and "2 entries in" in text, f"first build sent no report: {ui}"


def test_offline_clip_error_offers_none(comfy_runner: comfy_harness.InProcessRunner, tiny_ckpt_name: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no download attempt: the machine is offline
    graph = {**g.base(tiny_ckpt_name), "4": g.build(f"offline_{uuid.uuid4().hex[:8]}", count=1, batch_size=1,
                                                    clip_model="ViT-B-16:openai")}  # no weights for it in the session
    err = comfy_harness.execution_error(comfy_runner.run(graph))
    assert err is not None, "the build ran without CLIP weights"
    msg = str(err.get("exception_message", err))
    assert "not on this machine" in msg and "'none'" in msg and "colour-only library right now" in msg, msg
