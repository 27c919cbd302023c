"""The core contract, in a real ComfyUI: a library entry is exactly what a standard KSampler gives for that seed at
batch size 1 with the library's settings -- for every sampler ComfyUI offers.

Each case runs one API graph through ComfyUI's own validator and executor (InProcessRunner): BuildNoiseLibrary
over seeds 0..1 in ONE batch (item 1 is where naive batching goes wrong) -- for one sampler per strategy also
seeds 0..2 and seed 2**64-2 -- next to standard KSampler -> VAEDecode graphs at batch size 1 for those seeds.
The KSampler image must equal the corresponding item of the node's `last_batch` IMAGE output, and the library's
stored colour statistics must equal those of the KSampler image.
"""
from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import comfy_harness
import nq_graphs as G
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(comfy_harness.find_comfyui() is None, reason=comfy_harness.SKIP_REASON)

log = logging.getLogger(__name__)


def _sampler_names() -> list[str]:
    """comfy.samplers.KSampler.SAMPLERS, read without importing ComfyUI at collection time."""
    path = comfy_harness.find_comfyui()
    if path is None:
        return ["euler"]  # the whole module is skipped anyway
    import ast

    src = (path / "comfy" / "samplers.py").read_text(encoding="utf-8")
    tree = ast.parse(src)
    values: dict[str, list[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name == "KSAMPLER_NAMES":
                values[name] = ast.literal_eval(node.value)
            elif name == "SAMPLER_NAMES" and isinstance(node.value, ast.BinOp):
                values[name] = values["KSAMPLER_NAMES"] + ast.literal_eval(node.value.right)
    return values.get("SAMPLER_NAMES", ["euler"])


SAMPLERS = _sampler_names()
# (sampler, cfg, negative prompt): every sampler unconditional at cfg 1, plus real guidance with a non-empty
# negative for a deterministic, an ancestral and a Brownian-tree SDE sampler.
CASES = [(s, 1.0, "") for s in SAMPLERS] + [
    ("euler", 3.0, "blurry, dark"), ("euler_ancestral", 3.0, "blurry, dark"), ("dpmpp_2m_sde", 3.0, "blurry, dark")]
# Every sampler: seeds 0..1 built as one batch of 2, KSampler on seed 1 (batch item 1). One sampler per strategy
# (batched, default-noise, Brownian, per-seed) and the cfg 3 cases: seeds 0..2 as one batch of 3 (items 1 and 2
# checked) plus the large seed 2**64-2 -- fewer model calls elsewhere keep the tier fast on a 2-core CPU.
EXTENDED = {"euler", "euler_ancestral", "dpmpp_2m_sde", "ddim"}
# dpm_adaptive ignores `steps` and integrates to a tolerance: ~50 model calls with most schedulers at 2 steps, 3 with
# linear_quadratic (whose middle sigma stays close to sigma_max). Any scheduler is fine for the contract.
SCHEDULER = {"dpm_adaptive": "linear_quadratic"}

IMAGE_ATOL = 2.0 / 255.0
STATS_ATOL = 1e-2
# Measured max abs differences, printed at the end of the module (for the report).
MEASURED: dict[str, tuple[float, int, float]] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_measured() -> Any:
    yield
    if MEASURED:
        lines = [f"  {k:<50} image {v[0]:.5f} ({v[0] * 255:.2f}/255; {v[1]} uint8 levels)  stats {v[2]:.2e}"
                 for k, v in MEASURED.items()]
        print("\nBuildNoiseLibrary vs KSampler, max abs diff per case:\n" + "\n".join(lines))


def test_sampler_list_is_comfyuis(comfy_nodes: ModuleType) -> None:
    import comfy.samplers

    assert SAMPLERS == list(comfy.samplers.KSampler.SAMPLERS)


def test_strategy_sets_name_real_samplers(comfy_nodes: ModuleType) -> None:
    """Every sampler the pack batches is one ComfyUI has (a typo would silently fall back to per-seed), and
    strategy() is total over ComfyUI's list."""
    import comfy.samplers

    sampling = G.pack_module(comfy_nodes, "nodes.sampling")
    known = set(comfy.samplers.KSampler.SAMPLERS)
    for group in ("BATCH_PLAIN", "BATCH_DEFAULT_NOISE", "BATCH_BROWNIAN"):
        names = getattr(sampling, group)
        assert names <= known, f"{group} names samplers ComfyUI does not have: {sorted(names - known)}"
    assert not (sampling.BATCH_PLAIN & sampling.BATCH_DEFAULT_NOISE)
    assert not (sampling.BATCH_PLAIN & sampling.BATCH_BROWNIAN)
    valid = {"batched", "batched+default-noise", "batched+brownian", "per-seed"}
    assert {sampling.strategy(s) for s in known} <= valid
    # Samplers with per-step noise from their own sources must never be batched plainly.
    for s in ("euler_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "ddpm", "lcm", "er_sde", "sa_solver", "seeds_2",
              "ddim", "dpmpp_sde_gpu", "dpmpp_2m_sde_gpu", "res_multistep_ancestral", "exp_heun_2_x0_sde"):
        if s in known:
            assert sampling.strategy(s) != "batched", s


@pytest.mark.parametrize(("sampler", "cfg", "negative"), CASES,
                         ids=[f"{s}-cfg{c:g}" for s, c, _ in CASES])
def test_library_entry_equals_ksampler(sampler: str, cfg: float, negative: str, comfy_nodes: ModuleType,
                                       comfy_runner: comfy_harness.InProcessRunner, tiny_ckpt_name: str,
                                       nq_libraries_dir: Path) -> None:
    from noisequery_core import Library, verify
    from noisequery_core.search import color

    sampling = G.pack_module(comfy_nodes, "nodes.sampling")
    lib_name = f"repro/{sampler}-cfg{cfg:g}"
    extended = sampler in EXTENDED or cfg != 1.0
    graph = G.base(tiny_ckpt_name, positive="", negative=negative)
    neg = G.NEG if negative else G.POS
    common = {"sampler": sampler, "cfg": cfg, "negative": neg, "scheduler": SCHEDULER.get(sampler, "normal")}
    # Seeds in ONE batch: items >= 1 are where plain batching would differ from batch-1 runs.
    n = 3 if extended else 2
    graph["10"] = G.build(lib_name, seed_start=0, count=n, batch_size=n, thumbnail_size=0, **common)
    checks = {1: ("10", 1)}  # seed -> (build node, item of that node's last_batch output)
    if extended:
        graph["11"] = G.build(lib_name, seed_start=G.BIG_SEED, count=1, batch_size=3, thumbnail_size=0, **common)
        checks = {1: ("10", 1), 2: ("10", 2), G.BIG_SEED: ("11", 0)}
    for i, seed in enumerate(checks):
        graph.update(G.ksampler_image(f"3{i}", seed, **common))

    entry = comfy_runner.run(graph)
    assert "error" not in entry, f"{sampler}: graph refused: {entry}"
    err = comfy_harness.execution_error(entry)
    assert err is None, f"{sampler} (cfg {cfg}) failed in {err['node_type']}: {err.get('exception_message')}"

    lib = Library.open(nq_libraries_dir / "repro" / f"{sampler}-cfg{cfg:g}")
    expected_seeds = [0, 1, 2, G.BIG_SEED] if extended else [0, 1]
    assert sorted(int(s) for s in lib.seeds) == expected_seeds
    assert verify(lib.path).ok

    for node in ("10", "11") if extended else ("10",):
        report = comfy_runner.node_outputs(node)[2]
        assert f"sampling strategy: {sampling.strategy(sampler)}" in report, report

    worst_img = worst_stats = 0.0
    worst_levels = 0
    problems = []
    for i, (seed, (build_node, item)) in enumerate(checks.items()):
        ks = comfy_runner.node_outputs(f"3{i}2")[0]  # KSampler -> VAEDecode IMAGE [1, 64, 64, 3]
        batch = comfy_runner.node_outputs(build_node)[1]  # last_batch IMAGE
        assert tuple(ks.shape) == (1, G.SIZE, G.SIZE, 3)
        assert batch.shape[0] == (n if build_node == "10" else 1), batch.shape
        img_diff = float((ks[0].float().clamp(0, 1) - batch[item].float()).abs().max())
        levels = int(((ks[0].float().clamp(0, 1) * 255 + 0.5).floor() - (batch[item].float() * 255).round()).abs().max())
        worst_levels = max(worst_levels, levels)
        stored = np.asarray(lib.column("stats")[int(lib.rows_of([seed])[0])], dtype=np.float32)
        fresh = color.analyse([ks[0].float().clamp(0, 1).numpy()]).stats[0]
        stats_diff = float(np.abs(stored - fresh).max())
        worst_img, worst_stats = max(worst_img, img_diff), max(worst_stats, stats_diff)
        if img_diff >= IMAGE_ATOL:
            problems.append(f"seed {seed}: image differs from KSampler by {img_diff:.4f} ({img_diff * 255:.1f}/255)")
        if stats_diff >= STATS_ATOL:
            problems.append(f"seed {seed}: stored stats differ by {stats_diff:.4f}: {stored} vs {fresh}")
    MEASURED[f"{sampler} cfg {cfg:g} ({sampling.strategy(sampler)})"] = (worst_img, worst_levels, worst_stats)
    assert not problems, f"{sampler} (cfg {cfg}, strategy {sampling.strategy(sampler)}): " + "; ".join(problems)
