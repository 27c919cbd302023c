"""CLIP loading through open_clip on a tiny random-weight architecture (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from noisequery_core.errors import ModelError
from noisequery_core.search.clip import ClipSpec, load_clip, spec_for_identity


def test_local_safetensors_and_pt_agree(tiny_clip_files: dict[str, Path], tiny_clip) -> None:  # type: ignore[no-untyped-def]
    f = tiny_clip_files
    other = load_clip(ClipSpec("", str(f["pt"]), str(f["config"])), allow_download=False)
    assert tiny_clip.identity.model == "tiny-clip" and tiny_clip.identity.dim == 32
    assert tiny_clip.identity.pretrained.startswith("file:tiny.safetensors#")
    t1, t2 = tiny_clip.encode_text(["a red square"]), other.encode_text(["a red square"])
    assert np.allclose(t1, t2, atol=1e-6)
    assert np.linalg.norm(t1[0]) == pytest.approx(1.0, abs=1e-5)
    img = tiny_clip.encode_images(torch.stack([tiny_clip.preprocess(Image.new("RGB", (50, 40), (200, 10, 10)))]))
    assert img.shape == (1, 32) and img.dtype == np.float32


def test_pickles_are_loaded_weights_only(tiny_clip_files: dict[str, Path], tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("pwned",))

    bad = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(ModelError, match="weights_only=True"):
        load_clip(ClipSpec("", str(bad), str(tiny_clip_files["config"])), allow_download=False)


def test_offline_error_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as e:
        load_clip(ClipSpec("ViT-B-32", "openai"), cache_dir=tmp_path, allow_download=False)
    msg = str(e.value)
    assert str(tmp_path / "ViT-B-32" / "openai.safetensors") in msg
    assert "vit_base_patch32_clip_224.openai" in msg


def test_dropped_in_weights_are_used(tiny_clip_files: dict[str, Path], tiny_clip, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A file at <cache>/<model>/<tag>.safetensors serves that tag offline, with the tag's own config."""
    import shutil

    import open_clip
    from open_clip import pretrained as oc_pretrained

    open_clip.add_model_config(tiny_clip_files["config"])
    tag_cfg = oc_pretrained._pcfg(hf_hub="example/tiny-clip-mytag/", quick_gelu=False)
    monkeypatch.setitem(oc_pretrained._PRETRAINED, "tiny-clip", {"mytag": tag_cfg})
    with pytest.raises(ModelError, match="save them as .*tiny-clip/mytag.safetensors"):
        load_clip(ClipSpec("tiny-clip", "mytag"), cache_dir=tmp_path, allow_download=False)
    (tmp_path / "tiny-clip").mkdir()
    shutil.copy(tiny_clip_files["safetensors"], tmp_path / "tiny-clip" / "mytag.safetensors")
    emb = load_clip(ClipSpec("tiny-clip", "mytag"), cache_dir=tmp_path, allow_download=False)
    assert emb.identity.pretrained == "mytag"
    assert np.allclose(emb.encode_text(["a cat"]), tiny_clip.encode_text(["a cat"]), atol=1e-6)
    with pytest.raises(ModelError, match="no pretrained tag 'othertag'"):
        load_clip(ClipSpec("tiny-clip", "othertag"), cache_dir=tmp_path, allow_download=False)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ClipSpec("NoSuchNet", "openai"), "does not know the model"),
        (ClipSpec("ViT-B-32", "nosuchtag"), "no pretrained tag"),
        (ClipSpec("ViT-B-32", "/nope/w.safetensors"), "does not exist"),
        (ClipSpec("ViT-B-32", ""), "name its weights"),
        (ClipSpec("none"), "cannot embed"),
        (ClipSpec("", "random", "/nope/cfg.json"), "does not exist"),
    ],
)
def test_bad_specs(spec: ClipSpec, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        load_clip(spec, allow_download=False)


def test_random_weights_are_reproducible(tiny_clip_files: dict[str, Path]) -> None:
    a = load_clip(ClipSpec("", "random", str(tiny_clip_files["config"])))
    b = load_clip(ClipSpec("", "random", str(tiny_clip_files["config"])))
    assert np.array_equal(a.encode_text(["x"]), b.encode_text(["x"]))
    assert a.identity == b.identity and a.identity.pretrained == "random"


def test_spec_for_file_identity_needs_the_file(tiny_clip) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelError, match="pass that file again"):
        spec_for_identity(tiny_clip.identity)


def test_parse() -> None:
    assert ClipSpec.parse("ViT-B-32:openai") == ClipSpec("ViT-B-32", "openai")
    assert ClipSpec.parse("none").is_none
