"""Metric ranking (noisequery_core.exploration.rank): CLIP score, z-score combination, aesthetic heads (LAION shapes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from noisequery_core.errors import ModelError, QueryError
from noisequery_core.exploration.rank import AestheticHead, clip_scores, rank


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def test_clip_score_orders_by_cosine() -> None:
    text = np.zeros(8, np.float32)
    text[0] = 1.0
    imgs = _unit(np.array([[0.1, 1, 0, 0, 0, 0, 0, 0], [1, 0.1, 0, 0, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 0, 0, 0, 0]],
                          np.float32))
    s = clip_scores(imgs, text)
    r = rank({"clip": s}, {"clip": 1.0})
    assert r.order == [1, 2, 0] and r.best == 1
    assert "#0 image 1" in r.report()
    with pytest.raises(QueryError, match="nothing to rank"):
        rank({}, {})


def test_weights_trade_metrics_in_standard_deviations() -> None:
    clip = np.array([0.30, 0.20, 0.25])
    aesthetic = np.array([4.0, 8.0, 6.0])
    assert rank({"clip": clip, "aesthetic": aesthetic}, {"clip": 1.0, "aesthetic": 0.1}).best == 0
    assert rank({"clip": clip, "aesthetic": aesthetic}, {"clip": 0.1, "aesthetic": 1.0}).best == 1
    # a constant metric contributes nothing (no division by zero)
    assert rank({"clip": clip, "flat": np.ones(3)}, {"clip": 1.0, "flat": 5.0}).best == 0


def _laion_mlp_state_dict(dim: int = 768, seed: int = 0) -> dict[str, torch.Tensor]:
    """Same keys and shapes as LAION's improved-aesthetic-predictor (sac+logos+ava1-l14-linearMSE.pth)."""
    mlp = torch.nn.Sequential(torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                              torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                              torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    torch.manual_seed(seed)
    for m in mlp:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.05)
    return {f"layers.{k}": v for k, v in mlp.state_dict().items()}, mlp  # type: ignore[return-value]


def test_laion_shaped_mlp_loads_from_safetensors_and_matches_torch(tmp_path: Path) -> None:
    sd, mlp = _laion_mlp_state_dict()
    path = tmp_path / "aesthetic.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    head = AestheticHead.load(path)
    assert head.in_dim == 768 and len(head.layers) == 5
    emb = _unit(np.random.default_rng(0).standard_normal((4, 768)).astype(np.float32))
    got = head(emb)
    mlp.eval()
    with torch.no_grad():
        want = mlp(torch.from_numpy(emb))[:, 0].numpy()
    assert np.allclose(got, want, atol=1e-5)
    with pytest.raises(ModelError, match="expects 768-wide CLIP embeddings"):
        head(emb[:, :512])


def test_linear_head_and_pth(tmp_path: Path) -> None:
    w, b = torch.randn(1, 512), torch.tensor([0.5])
    torch.save({"weight": w, "bias": b}, tmp_path / "lin.pth")
    head = AestheticHead.load(tmp_path / "lin.pth")
    emb = _unit(np.random.default_rng(1).standard_normal((3, 512)).astype(np.float32))
    assert np.allclose(head(emb), emb @ w[0].numpy() + 0.5, atol=1e-5)


def test_bad_aesthetic_files_say_what(tmp_path: Path) -> None:
    save_file({"foo": torch.zeros(3)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ModelError, match="layers.<i>.weight"):
        AestheticHead.load(tmp_path / "x.safetensors")
    save_file({"layers.0.weight": torch.zeros(4, 8)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(ModelError, match="end in one"):
        AestheticHead.load(tmp_path / "y.safetensors")
    with pytest.raises(ModelError, match="does not exist"):
        AestheticHead.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("sd", [
    {"weight": torch.tensor([[float("nan"), 0.0, 0.0, 0.0]])},
    {"weight": torch.tensor([[float("inf"), 0.0, 0.0, 0.0]])},
    {"weight": torch.zeros(1, 4, dtype=torch.int64)},
    {"weight": torch.zeros(1, 4), "bias": torch.zeros(3)},
])
def test_aesthetic_file_that_is_not_a_finite_head_is_refused(sd: dict) -> None:
    with pytest.raises(ModelError, match="aesthetic model x"):
        AestheticHead.from_state_dict(sd, "x")
