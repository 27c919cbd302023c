"""NoiseCLR core: the contrastive loss on hand-made edits, training with a fake denoiser, resume, the file format."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from noisequery_core.directions.noiseclr import (
    Directions,
    TrainSettings,
    check_directions_name,
    checkpoint_path_for,
    contrastive_loss,
    evaluate_loss,
    load_directions,
    loss_summary,
    parse_names,
    rename_directions,
    save_directions,
    train_directions,
)
from noisequery_core.errors import NoiseCLRError, NoiseQueryError

D = 16  # context width of the fake model
T0 = 6  # tokens of the fake empty prompt


def _aligned_edits(n: int, k: int, f: int, noise: float, seed: int = 0) -> torch.Tensor:
    """Δ[n, k] = direction k's own vector + per-image noise: what a good set of directions looks like."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(k, f, generator=g)
    return base.unsqueeze(0) + noise * torch.randn(n, k, f, generator=g)


def test_loss_prefers_aligned_positives() -> None:
    deltas = _aligned_edits(n=4, k=5, f=64, noise=0.3)
    aligned = float(contrastive_loss(deltas, 0.5))
    # Same vectors, but each image's directions shuffled: positives no longer agree.
    g = torch.Generator().manual_seed(1)
    shuffled = torch.stack([d[torch.randperm(5, generator=g)] for d in deltas])
    mixed = float(contrastive_loss(shuffled, 0.5))
    assert aligned < mixed - 0.5, (aligned, mixed)
    # Perfect alignment with orthogonal directions is close to the lower bound, log of nothing lost.
    ortho = torch.eye(4, 64).unsqueeze(0).repeat(3, 1, 1)
    assert float(contrastive_loss(ortho, 0.1)) < 1e-3


def test_loss_value_by_hand() -> None:
    # N=2 images, K=2 directions, 2-D edits: Δ00=(1,0) Δ10=(1,0) (positives agree), Δ01=(0,1) Δ11=(-1,0).
    deltas = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [-1.0, 0.0]]])
    tau = 1.0
    e = torch.exp
    one = torch.tensor(1.0)
    # anchor (0,0): pos cos=1, neg cos(Δ00,Δ01)=0 ; (1,0): pos 1, neg cos(Δ10,Δ11)=-1
    # anchor (0,1): pos cos(Δ01,Δ11)=0, neg 0 ; (1,1): pos 0, neg -1
    terms = [
        -torch.log(e(one) / (e(one) + e(0 * one))),
        -torch.log(e(one) / (e(one) + e(-one))),
        -torch.log(e(0 * one) / (e(0 * one) + e(0 * one))),
        -torch.log(e(0 * one) / (e(0 * one) + e(-one))),
    ]
    want = float(sum(terms) / 4)
    assert float(contrastive_loss(deltas, tau)) == pytest.approx(want, rel=1e-6)


def test_loss_needs_pairs() -> None:
    with pytest.raises(NoiseCLRError, match="at least 2 images and 2 directions"):
        contrastive_loss(torch.randn(1, 3, 8), 0.5)
    with pytest.raises(NoiseCLRError):
        contrastive_loss(torch.randn(3, 1, 8), 0.5)


class FakeDenoiser:
    """eps = A·x + tanh(x)·(U·mean_tokens(context)): linear in the context, image-dependent edits."""

    def __init__(self, c: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.a = torch.randn(c, c, generator=g) * 0.3
        self.u = torch.randn(c, D, generator=g)
        self.calls = 0
        self.rows = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += x.shape[0]
        xs = x / torch.sqrt(sigma.view(-1, 1, 1, 1) ** 2 + 1)
        lin = torch.einsum("ij,bjhw->bihw", self.a, xs)
        c = context.float().mean(dim=1) @ self.u.T  # [B, C]
        return lin + torch.tanh(xs) * c.view(*c.shape, 1, 1)


def _domain(m: int = 6, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, 4, 8, 8, generator=g)


def _empty() -> torch.Tensor:
    return torch.randn(T0, D, generator=torch.Generator().manual_seed(9))


SIGMAS = torch.linspace(0.03, 14.6, 1000)
SETTINGS = TrainSettings(num_directions=4, directions_per_iteration=3, iterations=60, batch_size=3,
                         learning_rate=0.05, temperature=0.5, t_min=100, t_max=900, seed=7, token_count=4,
                         init_noise=0.1, checkpoint_every=10)


def test_training_decreases_loss_and_reports_progress() -> None:
    seen: list[tuple[int, int, str]] = []
    fake = FakeDenoiser()
    d = train_directions(_domain(), _empty(), fake, SIGMAS, SETTINGS, progress=lambda a, b, m="": seen.append((a, b, m)))
    assert d.directions.shape == (4, 4, D) and d.iterations_done == 60 and len(d.loss_history) == 60
    first, last = sum(d.loss_history[:10]) / 10, sum(d.loss_history[-10:]) / 10
    assert last < first - 0.1, loss_summary(d.loss_history)
    assert seen[-1][:2] == (60, 60) and len(seen) == 61
    assert seen[0] == (0, 60, "") and seen[-1][2] == f"loss {d.loss_history[-1]:.4f}"  # the loss is the message
    # one no-grad call for ∅ and one batched call for all sampled directions per iteration
    assert fake.calls == 2 * 60 and fake.rows == 60 * (3 + 3 * 3)
    # the directions started from the empty prompt's first tokens
    assert torch.allclose(d.empty, _empty())
    # on the same fixed batches, the trained directions score better than the initial ones
    init = train_directions(_domain(), _empty(), fake, SIGMAS, dataclasses.replace(SETTINGS, iterations=0))
    before = evaluate_loss(_domain(), _empty(), fake, SIGMAS, SETTINGS, init.directions, range(10))
    after = evaluate_loss(_domain(), _empty(), fake, SIGMAS, SETTINGS, d.directions, range(10))
    assert after < before - 0.1, (before, after)


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    full = train_directions(_domain(), _empty(), FakeDenoiser(), SIGMAS, SETTINGS)

    ckpt = tmp_path / "run.checkpoint.safetensors"
    calls = {"n": 0}

    class Stop(Exception):
        pass

    def cancel_at_25() -> None:
        calls["n"] += 1
        if calls["n"] == 26:  # before iteration 25 (0-based): 25 done, not on a checkpoint boundary
            raise Stop

    with pytest.raises(Stop):
        train_directions(_domain(), _empty(), FakeDenoiser(), SIGMAS, SETTINGS, checkpoint_path=ckpt,
                         check_cancel=cancel_at_25)
    assert load_directions(ckpt).iterations_done == 25
    resumed = train_directions(_domain(), _empty(), FakeDenoiser(), SIGMAS, SETTINGS, checkpoint_path=ckpt)
    assert torch.equal(resumed.directions, full.directions)
    assert resumed.loss_history == full.loss_history

    # the run can also be extended: 60 -> 80 iterations continues from the checkpoint
    more = dataclasses.replace(SETTINGS, iterations=80)
    extended = train_directions(_domain(), _empty(), FakeDenoiser(), SIGMAS, more, checkpoint_path=ckpt)
    assert extended.loss_history[:60] == full.loss_history and len(extended.loss_history) == 80

    # other settings refuse to resume, and say how to get out
    with pytest.raises(NoiseCLRError, match="temperature 0.5 -> 0.25.*resume off"):
        train_directions(_domain(), _empty(), FakeDenoiser(), SIGMAS, dataclasses.replace(SETTINGS, temperature=0.25),
                         checkpoint_path=ckpt)
    with pytest.raises(NoiseCLRError, match="other images"):
        train_directions(_domain(), _empty(), FakeDenoiser(), SIGMAS, more, checkpoint_path=ckpt,
                         data={"fingerprint": "zzz"})


def test_a_progress_that_raises_checkpoints_the_finished_iterations(tmp_path: Path) -> None:
    """ComfyUI's progress hook raises its interrupt: the iteration just finished is checkpointed all the same."""
    ckpt = tmp_path / "run.checkpoint.safetensors"

    class Stop(Exception):
        pass

    def progress(done: int, total: int, message: str = "") -> None:
        if done == 13:  # not on a checkpoint boundary (checkpoint_every is 10)
            raise Stop

    with pytest.raises(Stop):
        train_directions(_domain(), _empty(), FakeDenoiser(), SIGMAS, SETTINGS, checkpoint_path=ckpt, progress=progress)
    saved = load_directions(ckpt)
    first_13 = train_directions(_domain(), _empty(), FakeDenoiser(), SIGMAS, dataclasses.replace(SETTINGS, iterations=13))
    assert saved.iterations_done == 13 and saved.loss_history == first_13.loss_history
    assert torch.equal(saved.directions, first_13.directions)


def test_settings_are_checked() -> None:
    bad = [dict(num_directions=1), dict(directions_per_iteration=9), dict(batch_size=1), dict(t_min=5, t_max=4),
           dict(t_max=1000), dict(token_count=T0 + 1)]
    for change in bad:
        s = dataclasses.replace(SETTINGS, **change)  # type: ignore[arg-type]
        with pytest.raises(NoiseCLRError):
            train_directions(_domain(), _empty(), FakeDenoiser(), SIGMAS, s)
    with pytest.raises(NoiseCLRError, match="at least 2"):
        train_directions(_domain(1), _empty(), FakeDenoiser(), SIGMAS, SETTINGS)


def test_file_round_trip(tmp_path: Path) -> None:
    d = Directions(directions=torch.randn(3, 4, D), empty=_empty(), names=["smile", "age", "light"],
                   base_model={"name": "tiny.safetensors", "fingerprint": "abc", "model_class": "SD15", "context_dim": D},
                   settings=SETTINGS, iterations_done=60, loss_history=[2.5, 2.0, 1.25], data={"images": 6},
                   created="2026-01-01T00:00:00+00:00")
    path = save_directions(tmp_path / "sub" / "x.safetensors", d)
    got = load_directions(path)
    assert torch.equal(got.directions, d.directions) and torch.equal(got.empty, d.empty)
    assert got.names == d.names and got.base_model == d.base_model and got.settings == SETTINGS
    assert got.loss_history == [2.5, 2.0, 1.25] and got.iterations_done == 60 and got.data == {"images": 6}
    # the same directions give the same bytes (one metadata key: no hash-order differences)
    again = save_directions(tmp_path / "y.safetensors", d)
    assert again.read_bytes() == path.read_bytes()
    # names can be attached later
    rename_directions(path, parse_names("1=old age"))
    assert load_directions(path).names == ["smile", "old age", "light"]
    assert parse_names("a, , c") == {0: "a", 2: "c"}
    with pytest.raises(NoiseCLRError, match="index=name"):
        parse_names("0=a, b")
    assert checkpoint_path_for(path).name == "x.safetensors.checkpoint"


def test_bad_files_say_what_is_wrong(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(NoiseCLRError, match="does not exist"):
        load_directions(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(NoiseCLRError, match="not a readable safetensors"):
        load_directions(junk)
    lora = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, str(lora))
    with pytest.raises(NoiseCLRError, match="without NoiseCLR metadata"):
        load_directions(lora)
    newer = tmp_path / "newer.safetensors"
    meta = {"format": "noisequery.noiseclr", "format_version": 99}
    save_file({"directions": torch.zeros(2, 1, D), "empty": torch.zeros(1, D)}, str(newer),
              metadata={"noiseclr": json.dumps(meta)})
    with pytest.raises(NoiseCLRError, match="newer NoiseQuery"):
        load_directions(newer)
    partial = tmp_path / "partial.safetensors"
    save_file({"directions": torch.zeros(2, 1, D)}, str(partial),
              metadata={"noiseclr": json.dumps({"format": "noisequery.noiseclr", "format_version": 1})})
    with pytest.raises(NoiseCLRError, match="'empty' is missing"):
        load_directions(partial)
    assert issubclass(NoiseCLRError, NoiseQueryError)


def test_checkpoint_names_never_collide_with_directions_names(tmp_path: Path) -> None:
    """B5: directions named 't1.checkpoint' used to overwrite t1's resume checkpoint, and were hidden from the list."""
    names = ["t1", "t1.checkpoint", "t1.safetensors", "t1.safetensors.checkpoint", "t1.checkpoint.safetensors",
             "a/b", "x.checkpoint"]
    directions = {tmp_path / (check_directions_name(n) + ".safetensors") for n in names}
    checkpoints = {checkpoint_path_for(p) for p in directions}
    assert len(checkpoints) == len(directions), "one checkpoint per directions file"
    assert not directions & checkpoints
    # the apply list shows every ".safetensors" file, and no checkpoint ends that way
    assert all(p.name.endswith(".safetensors") for p in directions)
    assert not any(p.name.endswith(".safetensors") for p in checkpoints)


@pytest.mark.parametrize(("name", "words"), [("a" * 300, "at most 100"), ("x\x00y", "NUL"), ("", "plain file name"),
                                             ("a//b", "plain file name")])
def test_directions_names_that_cannot_be_files_are_refused(name: str, words: str) -> None:
    with pytest.raises(NoiseCLRError, match=words):
        check_directions_name(name)


@pytest.mark.parametrize(("tensor", "value", "words"), [
    ("directions", float("nan"), "'directions' holds NaN or infinite values"),
    ("empty", float("inf"), "'empty' holds NaN or infinite values"),
    ("directions", 1e30, "'directions' holds values up to 1e+30"),
])
def test_directions_with_non_finite_or_absurd_values_are_refused(tmp_path: Path, tensor: str, value: float,
                                                                 words: str) -> None:
    """Such a file samples black images; it is refused when loaded, naming the tensor."""
    d = Directions(directions=torch.randn(3, 4, D), empty=_empty(), settings=SETTINGS)
    getattr(d, tensor).view(-1)[5] = value
    path = save_directions(tmp_path / "bad.safetensors", d)
    with pytest.raises(NoiseCLRError, match=re.escape(words)) as info:
        load_directions(path)
    assert str(path) in str(info.value) and "damaged" in str(info.value)


@pytest.mark.parametrize(("setting", "value"), [("learning_rate", float("nan")), ("temperature", float("inf")),
                                                ("init_noise", float("-inf"))])
def test_non_finite_settings_are_refused(tmp_path: Path, setting: str, value: float) -> None:
    d = Directions(directions=torch.randn(3, 4, D), empty=_empty(), settings=dataclasses.replace(SETTINGS, **{setting: value}))
    path = save_directions(tmp_path / "bad.safetensors", d)
    with pytest.raises(NoiseCLRError, match=f"setting {setting} is"):
        load_directions(path)
    with pytest.raises(NoiseCLRError, match=f"{setting} is"):
        dataclasses.replace(SETTINGS, **{setting: value}).validate()
