"""What the training-node host tests share (NoiseCLR on SD1.5 and the other families, the seed-invariant prompt).

Result checks that say why a graph failed, the frozen-model check (every diffusion-model tensor bit-identical after
a run), an Interrupt at a chosen iteration as ComfyUI's Cancel button does it, and the pack's modules by name.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import comfy_harness
import nq_graphs as G


def ok(entry: dict[str, Any]) -> dict[str, Any]:
    """``entry`` (a run's history entry) when the graph was accepted and ran; else fails naming the node."""
    assert "error" not in entry, f"graph refused: {json.dumps(entry)[:3000]}"
    err = comfy_harness.execution_error(entry)
    assert err is None, f"{err['node_type']} failed: {err.get('exception_message')}"
    return entry


def run_error(entry: dict[str, Any]) -> str:
    """The message of a graph that passed validation and failed while running."""
    assert "error" not in entry, f"refused at validation instead of failing at run time: {entry}"
    err = comfy_harness.execution_error(entry)
    assert err is not None, "the graph should have failed"
    return str(err["exception_message"])


def refused(entry: dict[str, Any]) -> str:
    """The node errors (as JSON text) of a graph refused at validation (queue time)."""
    assert "error" in entry, f"the graph should have been refused at validation: {json.dumps(entry)[:2000]}"
    return json.dumps(entry["node_errors"])


def weights(model: Any) -> dict[str, Any]:
    """A copy of every tensor of a MODEL's diffusion model (to compare after a run)."""
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def changed_weights(before: dict[str, Any], model: Any) -> list[str]:
    """Names of the diffusion-model tensors that differ from ``before`` (all of them if the layout changed)."""
    import torch

    after = model.model.diffusion_model.state_dict()
    if before.keys() != after.keys():
        return sorted(set(before) ^ set(after))
    return [k for k in before if not torch.equal(before[k], after[k])]


@contextlib.contextmanager
def interrupt_at_check(node_module: ModuleType, call: int) -> Iterator[None]:
    """Interrupt as ComfyUI's Cancel button does, at the ``call``-th interrupt check of the node's work (the check
    before iteration ``call - 1``), by wrapping ``node_module._host.raise_if_interrupted``; restored on exit."""
    import comfy.model_management

    real = node_module._host.raise_if_interrupted
    count = {"n": 0}

    def interrupting() -> None:
        count["n"] += 1
        if count["n"] == call:
            comfy.model_management.interrupt_current_processing(True)
        real()

    node_module._host.raise_if_interrupted = interrupting
    try:
        yield
    finally:
        node_module._host.raise_if_interrupted = real


def noiseclr_core(comfy_nodes: ModuleType) -> ModuleType:
    return G.pack_module(comfy_nodes, "noisequery_core.directions.noiseclr")


def noiseclr_runtime(comfy_nodes: ModuleType) -> ModuleType:
    return G.pack_module(comfy_nodes, "nodes.directions_runtime")


def invariant_core(comfy_nodes: ModuleType) -> ModuleType:
    return G.pack_module(comfy_nodes, "noisequery_core.exploration.invariant")


def invariant_nodes(comfy_nodes: ModuleType) -> ModuleType:
    return G.pack_module(comfy_nodes, "nodes.exploration_invariant_nodes")
