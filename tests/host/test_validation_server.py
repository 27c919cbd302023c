"""No bad number passes silently: NaN, infinities and out-of-range values sent to a real ComfyUI server are
refused at queue time with a message naming the node and input, for every node family, and the server keeps
serving. NaN is valid JSON for API clients (Python's json writes it), and it passes ComfyUI's own min/max
comparisons; ComfyUI also skips those comparisons for every input a node's validate_inputs names.
"""
from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import comfy_harness
import nq_graphs as G
import pytest
import requests
from comfy_harness import ComfyServer

pytestmark = pytest.mark.skipif(comfy_harness.find_comfyui() is None, reason=comfy_harness.SKIP_REASON)

NAN, INF = math.nan, math.inf
LIBRARY = "numbers/lib"
DIRECTIONS = "numbers/ok.safetensors"
BAD_DIRECTIONS = "numbers/nan_values.safetensors"
STROKES = json.dumps({"version": 1, "strokes": [{"phrase": "a cat", "width": 0.1, "points": [[0.2, 0.5], [0.6, 0.5]]}]})


@pytest.fixture(scope="module")
def served_files(server_libraries_dir: Path, server_noiseclr_dir: Path) -> None:
    """A (colour-only, empty) library and two directions files the server lists, so only the numbers are wrong."""
    import torch

    from noisequery_core import FeatureSet, GenerationKey, Library
    from noisequery_core.directions.noiseclr import Directions, save_directions
    from noisequery_core.search.color import COLOR_VERSION

    Library.create(server_libraries_dir / LIBRARY, GenerationKey(model="x", latent_shape=(4, 8, 8)),
                   FeatureSet(None, COLOR_VERSION, 0))
    save_directions(server_noiseclr_dir / DIRECTIONS, Directions(torch.randn(2, 3, 768), torch.randn(77, 768)))
    bad = Directions(torch.randn(2, 3, 768), torch.randn(77, 768))
    bad.directions[1, 2, 5] = math.nan
    save_directions(server_noiseclr_dir / BAD_DIRECTIONS, bad)


def _graph(ckpt: str, node: dict[str, Any], output: int, image: bool = False) -> dict[str, Any]:
    """Node "20" with an output node "21" on its output ``output`` (PreviewImage for an IMAGE, else PreviewAny)."""
    graph = G.base(ckpt, positive="a cat and a red ball")
    graph["20"] = node
    graph["21"] = ({"class_type": "PreviewImage", "inputs": {"images": ["20", output]}} if image
                   else {"class_type": "PreviewAny", "inputs": {"source": ["20", output]}})
    return graph


def build(ckpt: str, **kw: Any) -> dict[str, Any]:
    graph = G.base(ckpt)
    graph["20"] = G.build("numbers/build", count=2, batch_size=2, **kw)
    return graph


def text_query(ckpt: str, **kw: Any) -> dict[str, Any]:
    return _graph(ckpt, G.text_query(LIBRARY, **kw), 4)


def color_query(ckpt: str, **kw: Any) -> dict[str, Any]:
    return _graph(ckpt, G.color_query(LIBRARY, **kw), 4)


def guide(ckpt: str, **kw: Any) -> dict[str, Any]:
    inputs = {"model": [G.CKPT, 0], "clip": [G.CKPT, 1], "prompt": "a cat and a red ball", "highlights": STROKES,
              "width": 64, "height": 64, "strength": 1.0, "start_percent": 0.0, "end_percent": 0.6,
              "schedule": "cosine", "edge_softness": 0.5, "refocus_percent": 0.0, "refocus_iterations": 2,
              "refocus_step_size": 0.05, **kw}
    return _graph(ckpt, {"class_type": "HighlightScribbleGuide", "inputs": inputs}, 2, image=True)


def slerp(ckpt: str, **kw: Any) -> dict[str, Any]:
    inputs = {"seed_a": 1, "seed_b": 2, "steps": 3, "t_start": 0.0, "t_end": 1.0, "width": 64, "height": 64, **kw}
    return _graph(ckpt, {"class_type": "NoiseQuerySeedSlerp", "inputs": inputs}, 2)


def cond_interp(ckpt: str, **kw: Any) -> dict[str, Any]:
    inputs = {"conditioning_a": [G.POS, 0], "conditioning_b": [G.NEG, 0], "mode": "slerp", "t_start": 0.5,
              "t_end": 1.0, "steps": 1, **kw}
    return _graph(ckpt, {"class_type": "NoiseQueryConditioningInterpolate", "inputs": inputs}, 1)


def explorer(ckpt: str, **kw: Any) -> dict[str, Any]:
    inputs = {"seed": 5, "positive": [G.POS, 0], "variants": 2, "strength": 0.3, "cond_strength": 0.0,
              "width": 64, "height": 64, "pick": -1, "history": "", **kw}
    return _graph(ckpt, {"class_type": "NoiseQueryVariations", "inputs": inputs}, 5)


def rank(ckpt: str, **kw: Any) -> dict[str, Any]:
    inputs = {"images": ["30", 0], "text": "a cat", "clip_model": "ViT-B-32:openai", "clip_weight": 1.0,
              "aesthetic_model": "none", "aesthetic_weight": 1.0, **kw}
    graph = _graph(ckpt, {"class_type": "NoiseQueryRank", "inputs": inputs}, 5)
    graph["30"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 0}}
    return graph


def train(ckpt: str, **kw: Any) -> dict[str, Any]:
    inputs = {"model": [G.CKPT, 0], "clip": [G.CKPT, 1], "vae": [G.CKPT, 2], "image_folder": "", "name": "numbers",
              "resolution": 64, "num_directions": 4, "directions_per_iteration": 3, "iterations": 1, "batch_size": 2,
              "learning_rate": 0.05, "temperature": 0.5, "t_min": 100, "t_max": 900, "seed": 1, "token_count": 77,
              "checkpoint_every": 4, "resume": True, "names": "", **kw}
    graph = G.base(ckpt)
    graph["20"] = {"class_type": "NoiseCLRTrainDirections", "inputs": inputs}
    return graph


def apply_directions(ckpt: str, directions: str = DIRECTIONS, **kw: Any) -> dict[str, Any]:
    inputs: dict[str, Any] = {"model": [G.CKPT, 0], "directions": directions, "cfg": 1.0}
    for n in range(1, 5):
        inputs.update({f"index_{n}": 0 if n == 1 else -1, f"scale_{n}": 1.0, f"start_{n}": 0.0, f"end_{n}": 1.0})
    inputs.update(kw)
    return _graph(ckpt, {"class_type": "NoiseCLRApplyDirections", "inputs": inputs}, 2)


# (graph builder, input, value, words in the message): one or more per node family
CASES = [
    (build, "cfg", NAN, "is NaN"), (build, "cfg", INF, "is +infinity"), (build, "cfg", -1.0, "below the minimum 0"),
    (text_query, "text_weight", NAN, "is NaN"), (text_query, "diversity", INF, "is +infinity"),
    (color_query, "brightness", NAN, "is NaN"), (color_query, "stats_weight", INF, "is +infinity"),
    (color_query, "region_lightness", -INF, "is -infinity"), (color_query, "diversity", 1.5, "above the maximum 1"),
    (guide, "strength", NAN, "is NaN"), (guide, "edge_softness", NAN, "is NaN"),
    (guide, "refocus_step_size", INF, "is +infinity"), (guide, "end_percent", NAN, "is NaN"),
    (guide, "start_percent", -5.0, "below the minimum 0"), (guide, "refocus_percent", 7.0, "above the maximum 1"),
    (slerp, "t_start", NAN, "is NaN"), (slerp, "t_end", INF, "is +infinity"),
    (cond_interp, "t_start", NAN, "is NaN"), (cond_interp, "t_end", 100.0, "above the maximum 8"),
    (explorer, "strength", NAN, "is NaN"), (explorer, "cond_strength", INF, "is +infinity"),
    (rank, "clip_weight", NAN, "is NaN"), (rank, "aesthetic_weight", -1.0, "below the minimum 0"),
    (train, "learning_rate", NAN, "is NaN"), (train, "temperature", INF, "is +infinity"),
    (train, "num_directions", 1000, "above the maximum 64"),  # an INT its validate_inputs names: range re-applied
    (apply_directions, "scale_1", NAN, "is NaN"), (apply_directions, "start_2", NAN, "is NaN"),
    (apply_directions, "end_3", 1e30, "above the maximum 1"), (apply_directions, "cfg", INF, "is +infinity"),
]


def post(server: ComfyServer, graph: dict[str, Any]) -> str | dict[str, Any]:
    """POST /prompt with the body written by Python's json (NaN / Infinity literals, as `json.dumps` and
    urllib-based API clients send them; requests' own json= refuses them); the prompt id, or the 400 error body."""
    body = json.dumps({"prompt": graph, "client_id": server.client_id})
    r = requests.post(f"{server.url}/prompt", data=body, headers={"Content-Type": "application/json"}, timeout=60)
    if r.status_code == 400:
        return r.json()
    r.raise_for_status()
    return str(r.json()["prompt_id"])


def _refused(server: ComfyServer, graph: dict[str, Any], node_id: str = "20") -> list[dict[str, Any]]:
    """Queue a graph validation must refuse (HTTP 400); return node_id's errors. An accepted graph is waited for
    (so it cannot disturb later tests) and fails the test."""
    body = post(server, graph)
    if isinstance(body, str):
        entry = server.wait(body, timeout=120)
        err = comfy_harness.execution_error(entry)
        pytest.fail("validation accepted the graph; it then "
                    + (f"failed at run time: {err['exception_message'].strip()}" if err else "ran"))
    assert body["error"]["type"] == "prompt_outputs_failed_validation", body
    assert node_id in body["node_errors"], body
    return body["node_errors"][node_id]["errors"]


@pytest.mark.parametrize(("make", "name", "value", "words"), CASES,
                         ids=[f"{c[0].__name__}-{c[1]}-{c[2]}" for c in CASES])
def test_bad_numbers_are_refused_at_queue_time(make: Any, name: str, value: float, words: str,
                                               comfy_server: ComfyServer, tiny_ckpt_name: str,
                                               served_files: None) -> None:
    graph = make(tiny_ckpt_name, **{name: value})
    node_type = graph["20"]["class_type"]
    errors = _refused(comfy_server, graph)
    ours = [e for e in errors if e["extra_info"]["input_name"] == name]
    assert ours, f"no error on input {name}: {errors}"
    details = ours[0]["details"]
    assert f"{node_type}: input '{name}' " in details and words in details, ours[0]
    assert comfy_server.alive, comfy_server.log_tail()


def test_a_good_graph_is_accepted_and_the_server_still_renders(comfy_server: ComfyServer, tiny_ckpt_name: str,
                                                               served_files: None) -> None:
    """The same graphs with good numbers pass validation (so the refusals above are about the numbers)."""
    for make in (slerp, cond_interp, explorer):
        pid = post(comfy_server, make(tiny_ckpt_name))
        assert isinstance(pid, str), pid
        entry = comfy_server.wait(pid, timeout=120)
        assert comfy_harness.execution_error(entry) is None, entry["status"]
    entry = comfy_server.run(comfy_harness.txt2img_graph(tiny_ckpt_name, seed=4343, steps=2), timeout=60)
    assert comfy_harness.execution_error(entry) is None and comfy_harness.output_images(entry, "7")


def test_a_nan_pick_in_the_history_is_refused(comfy_server: ComfyServer, tiny_ckpt_name: str) -> None:
    history = json.dumps({"format": "noisequery.explore", "version": 1, "start_seed": 5,
                          "picks": [{"index": 0, "seed": 9, "strength": NAN}]})
    errors = _refused(comfy_server, explorer(tiny_ckpt_name, history=history))
    assert any("pick 0 strength is NaN" in e["details"] for e in errors), errors


def test_a_linked_nan_is_refused_when_the_node_runs(comfy_server: ComfyServer, tiny_ckpt_name: str) -> None:
    """A value from another node is not known at queue time (ComfyUI checks no linked value): the node refuses it
    before computing anything, naming the input."""
    graph = slerp(tiny_ckpt_name, t_start=["30", 0])
    graph["30"] = {"class_type": "PrimitiveFloat", "inputs": {"value": NAN}}
    pid = post(comfy_server, graph)
    assert isinstance(pid, str), pid
    err = comfy_harness.execution_error(comfy_server.wait(pid, timeout=120))
    assert err is not None and err["node_type"] == "NoiseQuerySeedSlerp", err
    assert "NoiseQuerySeedSlerp: input 't_start' is NaN" in err["exception_message"], err


def test_a_directions_file_with_nan_values_is_refused(comfy_server: ComfyServer, tiny_ckpt_name: str,
                                                      served_files: None) -> None:
    pid = post(comfy_server, apply_directions(tiny_ckpt_name, directions=BAD_DIRECTIONS))
    assert isinstance(pid, str), pid
    err = comfy_harness.execution_error(comfy_server.wait(pid, timeout=120))
    assert err is not None and "'directions' holds NaN or infinite values" in err["exception_message"], err
    assert comfy_server.alive


# --------------------------------------------------------------------------------------------- every node


def _pack_nodes(comfy_nodes: ModuleType) -> dict[str, type]:
    lib_mod = comfy_nodes.NODE_CLASS_MAPPINGS["BuildNoiseLibrary"].__module__
    pack = lib_mod.rsplit(".", 2)[0]
    return {k: v for k, v in comfy_nodes.NODE_CLASS_MAPPINGS.items() if v.__module__.startswith(pack + ".")}


def test_every_number_input_of_every_node_is_checked(comfy_nodes: ModuleType) -> None:
    """Every FLOAT input is named in its node's validate_inputs (the only place ComfyUI lets a node see NaN at queue
    time), and every number input it names gets NaN and its declared range checked."""
    from comfy_api.latest import io

    nodes = _pack_nodes(comfy_nodes)
    assert len(nodes) >= 14, sorted(nodes)
    checked = 0
    for node_id, cls in nodes.items():
        schema = cls.define_schema()
        named = set(inspect.getfullargspec(cls.validate_inputs).args)
        floats = [i for i in schema.inputs if isinstance(i, io.Float.Input)]
        missing = [i.id for i in floats if i.id not in named]
        assert not missing, f"{node_id}: FLOAT inputs not checked by validate_inputs: {missing}"
        for inp in schema.inputs:
            if not isinstance(inp, (io.Float.Input, io.Int.Input)) or inp.id not in named:
                continue
            if isinstance(inp, io.Float.Input):
                got = cls.validate_inputs(**{inp.id: NAN})
                assert isinstance(got, str) and f"input '{inp.id}' is NaN" in got, (node_id, inp.id, got)
            if inp.max is not None:
                got = cls.validate_inputs(**{inp.id: inp.max + 1})
                assert isinstance(got, str) and f"input '{inp.id}'" in got and "above the maximum" in got, (node_id, inp.id, got)
            if inp.min is not None:
                got = cls.validate_inputs(**{inp.id: inp.min - 1})
                assert isinstance(got, str) and f"input '{inp.id}'" in got and "below the minimum" in got, (node_id, inp.id, got)
            assert cls.validate_inputs(**{inp.id: inp.default}) is True, (node_id, inp.id)
            checked += 1
    assert checked >= 40, checked
