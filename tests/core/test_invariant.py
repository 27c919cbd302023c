"""Seed-invariant prompt core: held-out loss drops with a stand-in denoiser, only the tokens learn, resume, the file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from noisequery_core.errors import Cancelled, NoiseQueryError
from noisequery_core.exploration.invariant import (
    HELD_OUT_SEEDS,
    Embedding,
    InvariantSettings,
    SeedInvariantError,
    appearance_distance,
    check_embedding_name,
    check_fits_model,
    checkpoint_for,
    denoising_loss,
    held_out_loss,
    held_out_summary,
    load_embedding,
    optimise_prompt,
    save_embedding,
)

C, H, W = 2, 4, 4  # 32 latent values: the 60 token values can reach any of them
T, D = 5, 12


class StandIn(torch.nn.Module):
    """A denoiser whose clean-image guess depends on the context: denoised = c_skip·x + c_out·(P·ctx + k·x).

    At high σ the guess is mostly the context's image, so the tokens decide what every seed denoises toward
    (as cross-attention does for colour and layout in a real UNet)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.proj = torch.nn.Parameter(torch.randn(C * H * W, T * D, generator=g) / (T * D) ** 0.5)
        self.k = torch.nn.Parameter(torch.tensor(0.01))
        self.calls = 0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        s2 = (sigma**2).view(-1, 1, 1, 1)
        img = (context.flatten(1) @ self.proj.T).view(-1, C, H, W)
        denoised = x / (s2 + 1) + s2 / (s2 + 1) * (img + self.k * x)
        return (x - denoised) / sigma.view(-1, 1, 1, 1)  # eps, as make_predict_noise returns it


SIGMAS = torch.linspace(0.03, 14.6, 1000)


def _liked(seed: int = 3, m: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, C, H, W, generator=g)


def _prompt(seed: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=g)


def _settings(**kw: object) -> InvariantSettings:
    base = dict(iterations=60, batch_size=4, learning_rate=0.05, prompt_weight=0.0, t_min=0, t_max=999, seed=1,
                checkpoint_every=7)
    base.update(kw)
    return InvariantSettings(**base)  # type: ignore[arg-type]


def test_held_out_loss_drops_and_only_tokens_learn() -> None:
    model = StandIn()
    before_params = {k: v.detach().clone() for k, v in model.named_parameters()}
    latents, tokens = _liked(), _prompt()
    e = optimise_prompt(latents, tokens, model, SIGMAS, _settings())
    # Seeds never drawn in training, every timestep of a fixed grid.
    seeds = [424242, 31337, 99, 123456789]
    steps = [0, 250, 500, 750, 999]
    before = held_out_loss(latents, tokens, model, SIGMAS, seeds, steps)
    after = held_out_loss(latents, e.tokens, model, SIGMAS, seeds, steps)
    assert after < 0.5 * before, (before, after)
    assert e.held_out["after"] < e.held_out["before"]
    assert e.held_out["seeds"] == list(HELD_OUT_SEEDS)
    assert "held-out denoising loss" in held_out_summary(e)
    # The model is frozen: no gradient reached its parameters and none changed.
    for k, v in model.named_parameters():
        assert v.grad is None, k
        assert torch.equal(v.detach(), before_params[k]), k
    assert not torch.equal(e.tokens, tokens)
    assert torch.equal(e.original, tokens)
    assert e.iterations_done == 60 and len(e.loss_history) == 60


def test_prompt_weight_keeps_tokens_near_the_prompt() -> None:
    latents, tokens = _liked(), _prompt()
    free = optimise_prompt(latents, tokens, StandIn(), SIGMAS, _settings(iterations=40))
    held = optimise_prompt(latents, tokens, StandIn(), SIGMAS, _settings(iterations=40, prompt_weight=50.0))
    assert float((held.tokens - tokens).norm()) < 0.5 * float((free.tokens - tokens).norm())


def test_denoising_loss_is_x0_mse() -> None:
    model = StandIn()
    x0, noise = _liked(1, 2), _liked(2, 2)
    sigma = torch.tensor([0.5, 3.0])
    ctx = _prompt().unsqueeze(0).expand(2, -1, -1)
    with torch.no_grad():
        x_t = x0 + sigma.view(-1, 1, 1, 1) * noise
        x0_hat = x_t - sigma.view(-1, 1, 1, 1) * model(x_t, sigma, ctx)
        want = float(((x0_hat - x0) ** 2).mean())
        assert float(denoising_loss(model, x0, noise, sigma, ctx)) == pytest.approx(want, rel=1e-5)


class Stop(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    latents, tokens = _liked(m=2), _prompt()
    s = _settings(iterations=20, checkpoint_every=3)
    ident = dict(base_model={"fingerprint": "abc"}, prompt={"hash": "p1"}, data={"fingerprint": "d1"})
    whole = optimise_prompt(latents, tokens, StandIn(), SIGMAS, s, **ident)

    ckpt = tmp_path / "a.safetensors.checkpoint"
    calls = {"n": 0}

    def stop_at_12() -> None:
        calls["n"] += 1
        if calls["n"] == 13:  # before iteration 12 (0-based): 12 finished, a checkpoint mid-interval (12 % 3 == 0 too)
            raise Stop()

    with pytest.raises(Stop):
        optimise_prompt(latents, tokens, StandIn(), SIGMAS, s, checkpoint_path=ckpt, check_cancel=stop_at_12, **ident)
    assert load_embedding(ckpt).iterations_done == 12

    seen: list[int] = []

    def progress_raises_at_14(done: int, total: int, message: str = "") -> None:
        seen.append(done)
        if done == 14:
            raise Cancelled("stop")  # ComfyUI's progress hook raises its interrupt like this

    with pytest.raises(Cancelled):
        optimise_prompt(latents, tokens, StandIn(), SIGMAS, s, checkpoint_path=ckpt, progress=progress_raises_at_14,
                        **ident)
    assert seen[0] == 12 and load_embedding(ckpt).iterations_done == 14  # resumed, then stopped off the interval

    resumed = optimise_prompt(latents, tokens, StandIn(), SIGMAS, s, checkpoint_path=ckpt, **ident)
    assert torch.equal(resumed.tokens, whole.tokens)
    assert resumed.loss_history == whole.loss_history
    assert resumed.held_out == whole.held_out


def test_resume_refuses_another_run(tmp_path: Path) -> None:
    latents, tokens = _liked(), _prompt()
    ckpt = tmp_path / "b.safetensors.checkpoint"
    s = _settings(iterations=4, checkpoint_every=2)
    optimise_prompt(latents, tokens, StandIn(), SIGMAS, s, checkpoint_path=ckpt, base_model={"fingerprint": "m1"})
    for kw, word in ((dict(settings=dataclasses.replace(s, learning_rate=0.01)), "learning_rate"),
                     (dict(settings=s, base_model={"fingerprint": "m2"}), "model"),
                     (dict(settings=s, base_model={"fingerprint": "m1"}, prompt={"hash": "other"}), "prompt")):
        with pytest.raises(SeedInvariantError, match=word):
            optimise_prompt(latents, tokens, StandIn(), SIGMAS, checkpoint_path=ckpt, **kw)  # type: ignore[arg-type]
    # resume off starts over instead
    again = optimise_prompt(latents, tokens, StandIn(), SIGMAS, s, checkpoint_path=ckpt, resume=False,
                            base_model={"fingerprint": "m2"})
    assert again.iterations_done == 4


@pytest.mark.parametrize("kw, word", [
    (dict(iterations=0), "iterations"),
    (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(prompt_weight=float("nan")), "prompt_weight"),
    (dict(prompt_weight=-1.0), "prompt_weight"),
    (dict(batch_size=0), "batch_size"),
    (dict(t_min=500, t_max=100), "timestep range"),
    (dict(t_max=1000), "t_max"),
])
def test_bad_settings_refused(kw: dict[str, object], word: str) -> None:
    with pytest.raises(SeedInvariantError, match=word):
        optimise_prompt(_liked(), _prompt(), StandIn(), SIGMAS, _settings(**kw))


def test_bad_inputs_refused() -> None:
    with pytest.raises(SeedInvariantError, match="NaN"):
        optimise_prompt(_liked(), _prompt() * float("nan"), StandIn(), SIGMAS, _settings(iterations=1))
    with pytest.raises(SeedInvariantError, match=r"\[T, D\]"):
        optimise_prompt(_liked(), _prompt().unsqueeze(0), StandIn(), SIGMAS, _settings(iterations=1))


def test_file_round_trip_and_model_check(tmp_path: Path) -> None:
    e = optimise_prompt(_liked(), _prompt(), StandIn(), SIGMAS, _settings(iterations=3),
                        base_model={"fingerprint": "m1", "model_class": "SD15", "name": "tiny"}, prompt={"hash": "p"})
    path = save_embedding(tmp_path / "x.safetensors", e)
    got = load_embedding(path)
    assert torch.equal(got.tokens, e.tokens) and torch.equal(got.original, e.original)
    assert got.settings == e.settings and got.loss_history == e.loss_history
    meta = json.loads(__import__("safetensors").safe_open(str(path), "pt").metadata()["noisequery_embedding"])
    assert meta["seeds"]["run_seed"] == 1 and meta["seeds"]["noise_draws"] == 3 * 4
    assert meta["base_model"]["fingerprint"] == "m1" and meta["prompt"]["hash"] == "p"
    check_fits_model(got, "m1", D, "x.safetensors")
    with pytest.raises(SeedInvariantError, match="another model.*fingerprint m1.*m2"):
        check_fits_model(got, "m2", D, "x.safetensors")
    with pytest.raises(SeedInvariantError, match="another model family"):
        check_fits_model(got, "m1", 768, "x.safetensors")


def test_damaged_and_foreign_files_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(SeedInvariantError, match="does not exist"):
        load_embedding(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(SeedInvariantError, match="not a readable safetensors"):
        load_embedding(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(SeedInvariantError, match="without NoiseQuery embedding metadata"):
        load_embedding(tmp_path / "lora.safetensors")
    e = Embedding(tokens=torch.full((T, D), float("nan")), original=torch.zeros(T, D))
    save_embedding(tmp_path / "nan.safetensors", e)
    with pytest.raises(SeedInvariantError, match="NaN"):
        load_embedding(tmp_path / "nan.safetensors")
    assert issubclass(SeedInvariantError, NoiseQueryError)


@pytest.mark.parametrize("name", ["../x", "/abs", "a/../b", "c:evil", "", "a//b", "x" * 101])
def test_bad_names_refused(name: str) -> None:
    with pytest.raises(SeedInvariantError):
        check_embedding_name(name)


def test_names_and_checkpoint_path() -> None:
    assert check_embedding_name(" red/barn.safetensors ") == "red/barn"
    assert checkpoint_for("/m/red.safetensors").name == "red.safetensors.checkpoint"


def test_appearance_distance() -> None:
    g = np.random.default_rng(0)
    liked = np.zeros((64, 64, 3), np.uint8)
    liked[:32] = (200, 40, 40)
    liked[32:] = (30, 60, 200)
    near = np.clip(liked.astype(int) + g.integers(-10, 10, liked.shape), 0, 255).astype(np.uint8)
    flipped = liked[::-1].copy()  # same colours, other layout
    assert appearance_distance(liked, liked) == (pytest.approx(0.0, abs=1e-6), pytest.approx(0.0, abs=1e-6))
    c_near, l_near = appearance_distance(near, liked)
    c_flip, l_flip = appearance_distance(flipped, liked)
    assert l_near < 5 < l_flip and c_near < c_flip


def test_loss_curve_picture() -> None:
    from noisequery_core.exploration.invariant import loss_curve

    pic = loss_curve([3.0, 2.0, 1.5, 1.0], {"before": 2.0, "after": 1.0}, width=200, height=100)
    assert pic.shape == (100, 200, 3) and pic.dtype == np.uint8
    assert len(np.unique(pic.reshape(-1, 3), axis=0)) > 3  # background, the curves and the title were drawn
    assert loss_curve([1.0]).shape == (256, 512, 3)
