"""The NoiseQuery nodes in a real headless ComfyUI server, over HTTP: /object_info, the example API workflows,
scripts/comfy_api_run.py, interrupting a build with POST /interrupt, and bad inputs (each refused with a clear
message while the server keeps serving).

Libraries live in the session's server_libraries_dir (the server's noise_libraries folder from its
extra_model_paths yaml); CLIP weights are the random ViT-B-32 of the clip_weights fixture.
"""
from __future__ import annotations

import copy
import json
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import comfy_harness
import nq_graphs as G
import pytest
from comfy_harness import ComfyServer

pytestmark = pytest.mark.skipif(comfy_harness.find_comfyui() is None, reason=comfy_harness.SKIP_REASON)

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "example_workflows" / "api"
EXAMPLE_LIB = "server/examples"
QUERY_NODES = ("NoiseQueryText", "NoiseQueryColor")
QUERY_OUTPUTS = ["INT", "NOISE", "LATENT", "IMAGE", "STRING", "NOISEQUERY_QUERY"]


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def _ok(entry: dict[str, Any]) -> dict[str, Any]:
    err = comfy_harness.execution_error(entry)
    assert err is None and entry["status"]["status_str"] == "success", (
        f"{err and err['node_type']} failed: {err and err.get('exception_message')}")
    return entry


def _run_error(server: ComfyServer, graph: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    """Queue a graph that must pass validation and fail when run; return its execution_error."""
    body = server.post_prompt(graph)
    assert isinstance(body, str), f"refused at validation: {json.dumps(body)[:2000]}"
    entry = server.wait(body, timeout=timeout)
    err = comfy_harness.execution_error(entry)
    assert err is not None and err["event"] == "execution_error", f"should have failed: {entry['status']}"
    return err


def _refused(server: ComfyServer, graph: dict[str, Any], node_id: str) -> list[dict[str, Any]]:
    """Queue a graph that validation must refuse (HTTP 400); return node_id's errors.

    A graph that is accepted is waited for (so it cannot disturb later tests) and the test fails, quoting what
    happened when it ran."""
    body = server.post_prompt(graph)
    if isinstance(body, str):
        entry = server.wait(body, timeout=120)
        err = comfy_harness.execution_error(entry)
        outcome = f"failed at run time: {err['exception_message'].strip()}" if err else "ran successfully"
        pytest.fail(f"validation accepted the graph; it then {outcome}")
    assert body["error"]["type"] == "prompt_outputs_failed_validation", body
    assert node_id in body["node_errors"], body
    return body["node_errors"][node_id]["errors"]


def _still_serving(server: ComfyServer) -> None:
    assert server.alive, server.log_tail()
    assert "KSampler" in server.object_info("KSampler")


def adapt_example(graph: dict[str, Any], ckpt: str, library: str) -> dict[str, Any]:
    """An example workflow shrunk for a 2-core CPU: tiny checkpoint, 64x64, 2 steps, 8 seeds, our library name."""
    g = copy.deepcopy(graph)
    for node in g.values():
        inputs, ct = node["inputs"], node["class_type"]
        if "ckpt_name" in inputs:
            inputs["ckpt_name"] = ckpt
        for key in ("width", "height"):
            if key in inputs:
                inputs[key] = G.SIZE
        if "steps" in inputs:
            inputs["steps"] = G.STEPS
        if ct == "BuildNoiseLibrary":
            inputs.update(library_name=library, count=8, batch_size=4, thumbnail_size=64)
        if ct in QUERY_NODES:
            inputs["library"] = library
    limits = {"width": G.SIZE, "height": G.SIZE, "steps": G.STEPS, "count": 8}
    big = [(nid, k, v) for nid, n in g.items() for k, v in n["inputs"].items()
           if k in limits and isinstance(v, int) and v > limits[k]]
    assert not big, f"example inputs left large: {big}"
    return g


def _load_example(name: str) -> dict[str, Any]:
    graph = json.loads((EXAMPLES / name).read_text(encoding="utf-8"))
    return {k: v for k, v in graph.items() if isinstance(v, dict) and "class_type" in v}


def _library_options(server: ComfyServer, node: str = "NoiseQueryText") -> list[str]:
    spec = server.object_info(node)[node]["input"]["required"]["library"]
    return list(spec[1]["options"]) if spec[0] == "COMBO" else list(spec[0])


# --------------------------------------------------------------------------------------------- object_info


def test_object_info_types_tooltips_descriptions(comfy_server: ComfyServer) -> None:
    info = comfy_server.object_info()
    for node in ("BuildNoiseLibrary", "NoiseQueryText", "NoiseQueryColor", "NoiseQueryLibraryInfo"):
        assert node in info, f"{node} missing from /object_info"
        d = info[node]
        assert d["description"].strip(), f"{node} has no description"
        assert d["python_module"] == "custom_nodes.NoiseQuery"
        for section in ("required", "optional"):
            for name, spec in d["input"].get(section, {}).items():
                assert isinstance(spec[1], dict) and spec[1].get("tooltip", "").strip(), f"{node}.{name}: no tooltip"
        tooltips = d.get("output_tooltips") or []
        assert len(tooltips) == len(d["output"]) and all(t and t.strip() for t in tooltips), f"{node} outputs"

    build = info["BuildNoiseLibrary"]
    req = build["input"]["required"]
    assert [req[k][0] for k in ("model", "vae", "positive", "negative")] == ["MODEL", "VAE", "CONDITIONING",
                                                                           "CONDITIONING"]
    assert build["output"] == ["STRING", "IMAGE", "STRING"] and build["output_node"] is True
    assert req["clip_model"][1]["options"][-1] == "none" and "ViT-B-32:openai" in req["clip_model"][1]["options"]
    assert req["seed_start"][1]["max"] == 2**64 - 1

    for node in QUERY_NODES:
        d = info[node]
        assert d["output"] == QUERY_OUTPUTS, d["output"]
        assert d["output_name"] == ["seed", "noise", "latent", "thumbnails", "report", "query"]
        opt = d["input"]["optional"]
        assert opt["also"][0] == "NOISEQUERY_QUERY" and opt["model"][0] == "MODEL"
        assert d["input"]["required"]["library"][0] == "COMBO"
        assert d["input"]["required"]["top_k"][1]["min"] == 1
    assert info["NoiseQueryColor"]["input"]["optional"]["layout_image"][0] == "IMAGE"
    assert info["NoiseQueryLibraryInfo"]["output"] == ["STRING", "IMAGE"]


# --------------------------------------------------------------------------------------------- examples


@pytest.fixture(scope="module")
def example_library(comfy_server: ComfyServer, tiny_ckpt_name: str, clip_weights: Path,
                    server_libraries_dir: Path) -> str:
    """example_workflows/api/build_noise_library.json, shrunk, run through POST /prompt."""
    assert EXAMPLE_LIB not in _library_options(comfy_server)
    graph = adapt_example(_load_example("build_noise_library.json"), tiny_ckpt_name, EXAMPLE_LIB)
    entry = _ok(comfy_server.run(graph, timeout=240))
    images = comfy_harness.output_images(entry, "3")
    assert len(images) == 4  # the last batch, as a preview
    assert _png_size(comfy_server.get_image(**images[0])) == (G.SIZE, G.SIZE)
    from noisequery_core import Library, verify

    lib = Library.open(server_libraries_dir / "server" / "examples")
    assert lib.count == 8 and lib.features.clip is not None and lib.features.clip.model == "ViT-B-32"
    assert lib.generation.model == tiny_ckpt_name and lib.generation.latent_shape == (4, 8, 8)
    assert verify(lib.path).ok
    return EXAMPLE_LIB


def test_example_build_lists_the_library(comfy_server: ComfyServer, example_library: str) -> None:
    for node in ("NoiseQueryText", "NoiseQueryColor", "NoiseQueryLibraryInfo"):
        assert example_library in _library_options(comfy_server, node), node


@pytest.mark.parametrize(("workflow", "save_node", "thumbs_node", "query_node"), [
    ("text_query_ksampler.json", "10", "11", "6"),
    ("colour_query_sampler_custom_advanced.json", "12", "13", "6"),
])
def test_example_query_workflows(workflow: str, save_node: str, thumbs_node: str, query_node: str,
                                 comfy_server: ComfyServer, tiny_ckpt_name: str, example_library: str) -> None:
    graph = adapt_example(_load_example(workflow), tiny_ckpt_name, example_library)
    assert graph[query_node]["class_type"] in QUERY_NODES
    entry = _ok(comfy_server.run(graph, timeout=180))
    saved = comfy_harness.output_images(entry, save_node)
    top_k = graph[query_node]["inputs"]["top_k"]
    # KSampler at batch 1 (text example) or SamplerCustomAdvanced on the query's top_k latent (colour example)
    assert len(saved) == (1 if "ksampler" in workflow else top_k)
    for img in saved:
        assert img["type"] == "output"
        assert _png_size(comfy_server.get_image(**img)) == (G.SIZE, G.SIZE)
    thumbs = comfy_harness.output_images(entry, thumbs_node)
    assert len(thumbs) == top_k
    assert _png_size(comfy_server.get_image(**thumbs[0])) == (64, 64)
    report = G.ui_text(entry, query_node)
    assert f"library {example_library}: 8 entries" in report, report
    assert "differs from the one library" not in report, report


def test_comfy_api_run_script(comfy_server: ComfyServer, tiny_ckpt_name: str, example_library: str,
                              tmp_path: Path) -> None:
    out = tmp_path / "results"
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "comfy_api_run.py"), str(EXAMPLES / "text_query_ksampler.json"),
           "--server", comfy_server.url, "--out", str(out), "--timeout", "180",
           "--set", f"1.ckpt_name={tiny_ckpt_name}", "--set", f"6.library={example_library}",
           "--set", "6.text=a snowy forest at night", "--set", "6.top_k=2", "--set", "7.steps=2",
           "--set", "8.width=64", "--set", "8.height=64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=str(REPO_ROOT))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    saved = sorted(out.glob("*.png"))
    assert {p.name.split("_", 1)[0] for p in saved} == {"10", "11"}, proc.stdout
    assert len([p for p in saved if p.name.startswith("11_")]) == 2  # top_k thumbnails
    assert all(_png_size(p.read_bytes()) == (64, 64) for p in saved)
    assert f"library {example_library}: 8 entries" in proc.stdout, proc.stdout

    bad = subprocess.run([*cmd, "--set", "1.ckpt_name=no_such_checkpoint.safetensors"], capture_output=True,
                         text=True, timeout=240, cwd=str(REPO_ROOT))
    assert bad.returncode == 1 and "refused" in bad.stderr and "value_not_in_list" in bad.stderr, (
        bad.stdout + bad.stderr)


# --------------------------------------------------------------------------------------------- interrupt


def test_interrupt_build_over_http_and_resume(comfy_server: ComfyServer, tiny_ckpt_name: str,
                                              server_libraries_dir: Path) -> None:
    from noisequery_core import Library, verify

    name, count, batch = "server/interrupted", 8, 2
    path = server_libraries_dir / "server" / "interrupted"
    graph = G.base(tiny_ckpt_name)
    graph["10"] = G.build(name, seed_start=1000, count=count, batch_size=batch, sampler="dpmpp_2m_sde",
                          thumbnail_size=0)
    prompt_id = comfy_server.post_prompt(graph)
    assert isinstance(prompt_id, str), prompt_id
    comfy_server.wait_running(prompt_id, timeout=60)
    deadline = time.monotonic() + 60
    while not ((path / "manifest.json").is_file() and Library.open(path).count >= batch):
        assert time.monotonic() < deadline, "the build committed nothing within 60 s"
        time.sleep(0.02)
    comfy_server.interrupt(prompt_id)
    entry = comfy_server.wait(prompt_id, timeout=60)
    err = comfy_harness.execution_error(entry)
    assert err is not None and err["event"] == "execution_interrupted", (
        f"the build was not interrupted (finished before /interrupt?): {entry['status']}")

    rep = verify(path)
    assert rep.ok, rep.problems
    done = Library.open(path).count
    assert 0 < done < count and done % batch == 0, f"{done} entries: not whole batches of {batch}"
    assert sorted(int(s) for s in Library.open(path).seeds) == list(range(1000, 1000 + done))

    entry = _ok(comfy_server.run(graph, timeout=240))  # re-queue the same graph
    assert "10" not in next(d["nodes"] for e, d in comfy_harness.status_messages(entry) if e == "execution_cached")
    rep = verify(path)
    assert rep.ok and rep.count == count, rep.problems
    assert sorted(int(s) for s in Library.open(path).seeds) == list(range(1000, 1000 + count))


# --------------------------------------------------------------------------------------------- bad inputs


def _query_graph(ckpt: str, node: dict[str, Any]) -> dict[str, Any]:
    graph = G.base(ckpt)
    graph["20"] = node
    graph["21"] = G.preview_thumbnails("20")
    return graph


@pytest.mark.parametrize("node_type", QUERY_NODES)
def test_unknown_library_is_refused_by_validation(node_type: str, comfy_server: ComfyServer,
                                                  tiny_ckpt_name: str) -> None:
    node = G.text_query("no_such_library") if node_type == "NoiseQueryText" else G.color_query("no_such_library")
    errors = _refused(comfy_server, _query_graph(tiny_ckpt_name, node), "20")
    assert any(e["type"] == "value_not_in_list" and e["extra_info"]["input_name"] == "library" for e in errors), errors
    _still_serving(comfy_server)


@pytest.mark.parametrize(("name", "words"), [("../escape", "'..'"), ("/abs/path", "absolute path"),
                                             ("a/../../b", "'..'"), (".hidden", "leading dot")])
def test_bad_library_names_are_refused(name: str, words: str, comfy_server: ComfyServer, tiny_ckpt_name: str,
                                       server_libraries_dir: Path) -> None:
    graph = G.base(tiny_ckpt_name)
    graph["10"] = G.build(name, count=2, batch_size=2)
    errors = _refused(comfy_server, graph, "10")
    assert all(e["type"] == "custom_validation_failed" for e in errors), errors
    named = [e for e in errors if e["extra_info"]["input_name"] == "library_name"]
    assert named and words in named[0]["details"] and repr(name) in named[0]["details"], errors
    assert not (server_libraries_dir.parent / "escape").exists()
    _still_serving(comfy_server)


def test_bad_input_errors_name_the_right_input(comfy_server: ComfyServer, tiny_ckpt_name: str) -> None:
    """A custom validation message says which input it is about. ComfyUI attaches a validate_inputs message to
    every input the function names (BuildNoiseLibrary names library_name and cfg, so that a NaN cfg is refused at
    queue time; with **kwargs it would be every input of the node), so the words must point at the input."""
    graph = G.base(tiny_ckpt_name)
    graph["10"] = G.build("../escape", count=2, batch_size=2)
    errors = _refused(comfy_server, graph, "10")
    inputs = sorted(e["extra_info"]["input_name"] for e in errors)
    assert "library_name" in inputs and set(inputs) <= {"library_name", "cfg"}, inputs
    messages = [e["details"].split(" - ", 1)[1] for e in errors]
    assert all(m.startswith("Library name '../escape'") and "cfg" not in m for m in messages), messages


@pytest.fixture(scope="module")
def outside_library(server_libraries_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A real library outside the noise_libraries folder, reachable through a symlink inside it."""
    from noisequery_core import FeatureSet, GenerationKey, Library
    from noisequery_core.search.color import COLOR_VERSION

    outside = tmp_path_factory.mktemp("outside") / "lib"
    Library.create(outside, GenerationKey(model="x", latent_shape=(4, 8, 8)), FeatureSet(None, COLOR_VERSION, 0))
    link = server_libraries_dir / "linked_out"
    link.symlink_to(outside, target_is_directory=True)
    return "linked_out", outside


def test_symlink_out_of_the_folder_is_refused(comfy_server: ComfyServer, tiny_ckpt_name: str,
                                              outside_library: tuple[str, Path]) -> None:
    name, outside = outside_library
    before = sorted(p.name for p in outside.iterdir())

    # Querying it: either not offered at all (refused by validation) or refused when run, saying why.
    body = comfy_server.post_prompt(_query_graph(tiny_ckpt_name, G.color_query(name)))
    if isinstance(body, dict):
        assert body["node_errors"]["20"]["errors"][0]["type"] == "value_not_in_list", body
    else:
        entry = comfy_server.wait(body, timeout=60)
        err = comfy_harness.execution_error(entry)
        assert err is not None and "outside" in err["exception_message"], entry["status"]
    assert name not in _library_options(comfy_server)

    # Building into it (a typed name passes validation) must be refused before anything is written.
    graph = G.base(tiny_ckpt_name)
    graph["10"] = G.build(name, count=2, batch_size=2)
    err = _run_error(comfy_server, graph)
    msg = err["exception_message"]
    assert "outside" in msg and "symbolic link" in msg, msg
    assert sorted(p.name for p in outside.iterdir()) == before
    _still_serving(comfy_server)


def test_empty_library_is_refused_clearly(comfy_server: ComfyServer, tiny_ckpt_name: str,
                                          server_libraries_dir: Path) -> None:
    from noisequery_core import FeatureSet, GenerationKey, Library
    from noisequery_core.search.color import COLOR_VERSION

    Library.create(server_libraries_dir / "server_empty", GenerationKey(model="x", latent_shape=(4, 8, 8)),
                   FeatureSet(None, COLOR_VERSION, 0))
    assert "server_empty" in _library_options(comfy_server)
    err = _run_error(comfy_server, _query_graph(tiny_ckpt_name, G.color_query("server_empty")))
    assert err["node_type"] == "NoiseQueryColor"
    assert "is empty" in err["exception_message"] and "BuildNoiseLibrary" in err["exception_message"], err
    _still_serving(comfy_server)


@pytest.mark.parametrize(("top_k", "error_type"), [(0, "value_smaller_than_min"), (100000, "value_bigger_than_max")])
def test_top_k_out_of_range_is_refused_by_validation(top_k: int, error_type: str, comfy_server: ComfyServer,
                                                     tiny_ckpt_name: str, example_library: str) -> None:
    errors = _refused(comfy_server, _query_graph(tiny_ckpt_name, G.color_query(example_library, top_k=top_k)), "20")
    assert any(e["type"] == error_type and e["extra_info"]["input_name"] == "top_k" for e in errors), errors
    _still_serving(comfy_server)


def test_rank_offset_past_the_last_hit(comfy_server: ComfyServer, tiny_ckpt_name: str, example_library: str) -> None:
    err = _run_error(comfy_server, _query_graph(tiny_ckpt_name,
                                                G.text_query(example_library, "a boat", rank_offset=20, top_k=2)))
    msg = err["exception_message"]
    assert "rank_offset 20 is past the last hit" in msg and "has 8 entries" in msg, msg
    _still_serving(comfy_server)


def test_rank_offset_at_its_widget_maximum_is_explained(comfy_server: ComfyServer, tiny_ckpt_name: str,
                                                       example_library: str) -> None:
    """rank_offset 10000 is a value the widget offers; past the last hit it must get the rank_offset message, not
    one about a top_k the user never typed (top_k + rank_offset)."""
    err = _run_error(comfy_server, _query_graph(tiny_ckpt_name,
                                                G.color_query(example_library, rank_offset=10_000, top_k=4)))
    msg = err["exception_message"]
    assert "rank_offset 10000 is past the last hit" in msg, msg


@pytest.mark.parametrize(("node_type", "field", "value", "token", "words"), [
    ("NoiseQueryColor", "color", "#GG0000", "'#GG0000'", "is not a hex colour"),
    ("NoiseQueryColor", "region_color", "red", "'red'", "is not a hex colour"),
    ("NoiseQueryColor", "exclude_seeds", "abc", "'abc'", "is not a seed number"),
    ("NoiseQueryText", "exclude_seeds", "12, x3", "'x3'", "is not a seed number"),
    # numbers that are no seeds (ComfyUI seeds are 0..2**64-1)
    ("NoiseQueryColor", "exclude_seeds", "3, -1", "-1", "seed"),
    ("NoiseQueryText", "exclude_seeds", "18446744073709551616", "18446744073709551616", "seed"),
])
def test_bad_query_strings_are_refused(node_type: str, field: str, value: str, token: str, words: str,
                                       comfy_server: ComfyServer, tiny_ckpt_name: str, example_library: str) -> None:
    make = G.color_query if node_type == "NoiseQueryColor" else G.text_query
    errors = _refused(comfy_server, _query_graph(tiny_ckpt_name, make(example_library, **{field: value})), "20")
    assert errors and all(e["type"] == "custom_validation_failed" for e in errors), errors
    assert any(words in e["details"] and token in e["details"] for e in errors), errors
    _still_serving(comfy_server)


def test_unknown_sampler_is_refused_by_validation(comfy_server: ComfyServer, tiny_ckpt_name: str) -> None:
    graph = G.base(tiny_ckpt_name)
    graph["10"] = G.build("server/bad_sampler", count=2, batch_size=2, sampler="no_such_sampler")
    errors = _refused(comfy_server, graph, "10")
    assert any(e["type"] == "value_not_in_list" and e["extra_info"]["input_name"] == "sampler_name"
               for e in errors), errors
    _still_serving(comfy_server)


def test_server_still_renders_after_bad_inputs(comfy_server: ComfyServer, tiny_ckpt_name: str) -> None:
    entry = _ok(comfy_server.run(comfy_harness.txt2img_graph(tiny_ckpt_name, seed=4242, steps=2), timeout=60))
    images = comfy_harness.output_images(entry, "7")
    assert len(images) == 1 and _png_size(comfy_server.get_image(**images[0])) == (64, 64)
