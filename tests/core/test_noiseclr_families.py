"""NoiseCLR core for model families: a pooled part trained with the tokens, injected noising (flow models),
the family recorded in the file, version-1 files still read, resume with a pooled part equal to an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from noisequery_core.directions.noiseclr import (
    Directions,
    TrainSettings,
    evaluate_loss,
    load_directions,
    save_directions,
    train_directions,
)
from noisequery_core.errors import NoiseCLRError

D = 16  # context width of the fake model
P = 8  # pooled width of the fake model
T0 = 6


class PooledDenoiser:
    """eps = A·x + tanh(x)·(U·mean_tokens(context) + V·pooled): the pooled vector steers the edit too."""

    def __init__(self, token_weight: float = 1.0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.a = torch.randn(4, 4, generator=g) * 0.3
        self.u = torch.randn(4, D, generator=g) * token_weight
        self.v = torch.randn(4, P, generator=g)
        self.arity: set[int] = set()
        self.seen_x: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        self.arity.add(3 + len(rest))
        self.seen_x.append(x.detach().clone())
        (pooled,) = rest
        assert pooled.shape == (x.shape[0], P)
        lin = torch.einsum("ij,bjhw->bihw", self.a, x)
        c = context.float().mean(dim=1) @ self.u.T + pooled.float() @ self.v.T  # [B, 4]
        return lin + torch.tanh(x) * c.view(*c.shape, 1, 1)


def _domain(m: int = 6) -> torch.Tensor:
    return torch.randn(m, 4, 8, 8, generator=torch.Generator().manual_seed(3))


def _empty() -> torch.Tensor:
    return torch.randn(T0, D, generator=torch.Generator().manual_seed(9))


def _empty_pooled() -> torch.Tensor:
    return torch.randn(P, generator=torch.Generator().manual_seed(10))


SIGMAS = torch.linspace(0.001, 0.999, 1000)  # a flow model's σ in (0, 1)
SETTINGS = TrainSettings(num_directions=4, directions_per_iteration=3, iterations=40, batch_size=3,
                         learning_rate=0.05, temperature=0.5, t_min=100, t_max=900, seed=7, token_count=4,
                         init_noise=0.1, checkpoint_every=10)


def flow_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.view(-1, 1, 1, 1)
    return (1 - s) * x0 + s * noise


def _train(fake: PooledDenoiser, settings: TrainSettings = SETTINGS, **kw: object) -> Directions:
    return train_directions(_domain(), _empty(), fake, SIGMAS, settings, empty_pooled=_empty_pooled(),
                            add_noise=flow_noise, family="sdxl", **kw)  # type: ignore[arg-type]


def test_the_pooled_part_is_trained_and_used() -> None:
    # Tokens have no effect on this model: only the pooled part can lower the loss.
    fake = PooledDenoiser(token_weight=0.0)
    d = _train(fake)
    assert fake.arity == {4}, "the denoiser gets the pooled vectors as a 4th argument"
    assert d.pooled is not None and d.pooled.shape == (4, P) and d.pooled_dim == P and d.family == "sdxl"
    assert d.empty_pooled is not None and torch.equal(d.empty_pooled, _empty_pooled())
    init = _train(PooledDenoiser(token_weight=0.0), dataclasses.replace(SETTINGS, iterations=0))
    assert init.pooled is not None
    # the tokens got no gradient, so they did not move; the pooled part did, and the loss fell
    assert torch.equal(d.directions, init.directions)
    assert float((d.pooled - init.pooled).abs().max()) > 0.05
    kw = {"empty_pooled": _empty_pooled(), "add_noise": flow_noise}
    before = evaluate_loss(_domain(), _empty(), fake, SIGMAS, SETTINGS, init.directions, range(8), pooled=init.pooled, **kw)  # type: ignore[arg-type]
    after = evaluate_loss(_domain(), _empty(), fake, SIGMAS, SETTINGS, d.directions, range(8), pooled=d.pooled, **kw)  # type: ignore[arg-type]
    assert after < before - 0.1, (before, after)
    # the initial pooled parts are the empty prompt's, plus 10 % of its spread
    spread = float((init.pooled - _empty_pooled()).std())
    assert 0.03 < spread / float(_empty_pooled().std()) < 0.3


def test_the_injected_noising_is_what_the_model_sees() -> None:
    """add_noise gets clean training images and σ from t_min..t_max, and its x_t is what the denoiser is fed."""
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def recording(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x_t = flow_noise(x0, noise, sigma)
        calls.append((x0, sigma, x_t))
        return x_t

    fake = PooledDenoiser()
    train_directions(_domain(), _empty(), fake, SIGMAS, dataclasses.replace(SETTINGS, iterations=2),
                     empty_pooled=_empty_pooled(), add_noise=recording)
    assert len(calls) == 2
    domain = _domain()
    for x0, sigma, _ in calls:
        assert x0.shape == (3, 4, 8, 8) and all(any(torch.equal(img, d) for d in domain) for img in x0)
        assert float(SIGMAS[100]) <= float(sigma.min()) and float(sigma.max()) <= float(SIGMAS[900])
    # per iteration: the ∅ pass sees x_t, the direction pass sees it once per sampled direction
    assert torch.equal(fake.seen_x[0], calls[0][2]) and torch.equal(fake.seen_x[2], calls[1][2])
    assert torch.equal(fake.seen_x[1], calls[0][2].repeat(3, 1, 1, 1))


def test_resume_with_a_pooled_part_equals_uninterrupted(tmp_path: Path) -> None:
    full = _train(PooledDenoiser())
    ckpt = tmp_path / "run.safetensors.checkpoint"

    class Stop(Exception):
        pass

    calls = {"n": 0}

    def cancel_at_17() -> None:
        calls["n"] += 1
        if calls["n"] == 18:
            raise Stop

    with pytest.raises(Stop):
        _train(PooledDenoiser(), checkpoint_path=ckpt, check_cancel=cancel_at_17)
    saved = load_directions(ckpt)
    assert saved.iterations_done == 17 and saved.pooled is not None and saved.family == "sdxl"
    resumed = _train(PooledDenoiser(), checkpoint_path=ckpt)
    assert resumed.pooled is not None and full.pooled is not None
    assert torch.equal(resumed.directions, full.directions) and torch.equal(resumed.pooled, full.pooled)
    assert resumed.loss_history == full.loss_history
    # a checkpoint of another family is not resumed
    with pytest.raises(NoiseCLRError, match="sdxl family, this run is flux"):
        train_directions(_domain(), _empty(), PooledDenoiser(), SIGMAS, SETTINGS, empty_pooled=_empty_pooled(),
                         add_noise=flow_noise, family="flux", checkpoint_path=ckpt)
    # nor one without the pooled part this run needs
    with pytest.raises(NoiseCLRError, match="pooled part 8 wide, this run needs 0"):
        train_directions(_domain(), _empty(), lambda x, s, c: x, SIGMAS, SETTINGS, family="sdxl",
                         checkpoint_path=ckpt)


def test_file_records_family_and_pooled_part(tmp_path: Path) -> None:
    d = Directions(directions=torch.randn(3, 4, D), empty=_empty(), pooled=torch.randn(3, P),
                   empty_pooled=_empty_pooled(), family="sdxl", settings=SETTINGS)
    path = save_directions(tmp_path / "x.safetensors", d)
    got = load_directions(path)
    assert got.family == "sdxl" and got.pooled is not None and got.empty_pooled is not None
    assert torch.equal(got.pooled, d.pooled) and torch.equal(got.empty_pooled, _empty_pooled())
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["noiseclr"])
        assert set(f.keys()) == {"directions", "empty", "pooled", "empty_pooled"}
    assert meta["format_version"] == 2 and meta["family"] == "sdxl" and meta["pooled_dim"] == P


def test_version_1_files_read_as_sd_without_pooled_part(tmp_path: Path) -> None:
    """A file written before families: format_version 1, no family, no pooled tensors."""
    from safetensors.torch import save_file

    meta = {"format": "noisequery.noiseclr", "format_version": 1, "kind": "directions", "names": ["a", "b"],
            "token_count": 4, "context_dim": D, "base_model": {"model_class": "SD15", "context_dim": D},
            "settings": SETTINGS.to_dict(), "iterations_done": 40, "loss_history": [1.0], "data": {}, "created": ""}
    old = tmp_path / "old.safetensors"
    save_file({"directions": torch.ones(2, 4, D), "empty": _empty()}, str(old), metadata={"noiseclr": json.dumps(meta)})
    got = load_directions(old)
    assert got.family == "sd" and got.pooled is None and got.pooled_dim == 0 and got.names == ["a", "b"]


@pytest.mark.parametrize(("change", "words"), [
    ({"pooled_dim": P}, "'pooled' is missing"),
    ({"pooled_dim": -1}, "pooled_dim -1 is not a width"),
    ({"pooled_dim": True}, "pooled_dim True is not a width"),
    ({"family": 7}, "family 7 is not a name"),
    ({"family": "../x"}, "is not a family name"),
])
def test_damaged_family_metadata_is_refused(tmp_path: Path, change: dict[str, object], words: str) -> None:
    from safetensors.torch import save_file

    meta = {"format": "noisequery.noiseclr", "format_version": 2, "family": "sdxl", "pooled_dim": 0,
            "settings": SETTINGS.to_dict()}
    meta.update(change)
    path = tmp_path / "bad.safetensors"
    save_file({"directions": torch.ones(2, 4, D), "empty": _empty()}, str(path), metadata={"noiseclr": json.dumps(meta)})
    with pytest.raises(NoiseCLRError, match=words):
        load_directions(path)


def test_pooled_values_are_checked_like_the_tokens(tmp_path: Path) -> None:
    d = Directions(directions=torch.randn(3, 4, D), empty=_empty(), pooled=torch.randn(3, P),
                   empty_pooled=_empty_pooled(), family="flux", settings=SETTINGS)
    assert d.pooled is not None
    d.pooled[1, 2] = float("nan")
    path = save_directions(tmp_path / "nan.safetensors", d)
    with pytest.raises(NoiseCLRError, match="'pooled' holds NaN"):
        load_directions(path)
    with pytest.raises(NoiseCLRError, match="both"):
        Directions(directions=torch.randn(3, 4, D), empty=_empty(), pooled=torch.randn(3, P))
    with pytest.raises(NoiseCLRError, match="do not fit 3 directions"):
        Directions(directions=torch.randn(3, 4, D), empty=_empty(), pooled=torch.randn(2, P),
                   empty_pooled=_empty_pooled())
