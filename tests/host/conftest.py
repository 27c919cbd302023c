"""Session fixtures for host tests: ComfyUI checkout, tiny SD1.5 checkpoint, ComfyUI in-process and as a server."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import comfy_harness
import family_models
import pytest

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "NoiseQuery"  # name the project pack is loaded under (module name, /extensions/<name>/ URL)


@pytest.fixture(scope="session")
def comfy_path() -> Path:
    """The ComfyUI checkout ($COMFYUI_PATH or ~/ComfyUI); skips the test when there is none."""
    path = comfy_harness.find_comfyui()
    if path is None:
        pytest.skip(comfy_harness.SKIP_REASON)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(comfy_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the tiny random SD1.5 checkpoint (<tmp>/checkpoints/tiny_sd15.safetensors), made once per session."""
    ckpt_dir = tmp_path_factory.mktemp("models") / "checkpoints"
    return comfy_harness.make_tiny_sd15_checkpoint(ckpt_dir / comfy_harness.TINY_CKPT_NAME, comfy_path)


@pytest.fixture(scope="session")
def tiny_ckpt_name(tiny_checkpoint: Path) -> str:
    """The ckpt_name CheckpointLoaderSimple knows the tiny checkpoint by."""
    return tiny_checkpoint.name


@pytest.fixture(scope="session")
def tiny_family_factory(comfy_path: Path, tiny_checkpoint: Path) -> Callable[[str], family_models.TinyFamily]:
    """family -> TinyFamily: its tiny checkpoint linked into the session's checkpoints folder (next to the SD1.5
    one, so in-process ComfyUI and the servers list it), made on first use from the per-machine cache
    (family_models.cached_family_checkpoint; the Flux file alone is 1.1 GB)."""
    made: dict[str, family_models.TinyFamily] = {}

    def get(family: str) -> family_models.TinyFamily:
        if family not in made:
            src = family_models.cached_family_checkpoint(family, comfy_path)
            path = family_models.link_checkpoint(src, tiny_checkpoint.parent)
            made[family] = family_models.TinyFamily(family_models.SPECS[family], path)
        return made[family]

    return get


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_family_factory: Callable[[str], family_models.TinyFamily]) -> family_models.TinyFamily:
    """Tiny random SDXL checkpoint (detected as comfy.supported_models.SDXL; CLIP from NQTestTinyCLIPLoader)."""
    return tiny_family_factory("sdxl")


@pytest.fixture(scope="session")
def tiny_sd3(tiny_family_factory: Callable[[str], family_models.TinyFamily]) -> family_models.TinyFamily:
    """Tiny random SD3 (MMDiT) checkpoint (detected as SD3; CLIP-L + CLIP-G + T5 from NQTestTinyCLIPLoader)."""
    return tiny_family_factory("sd3")


@pytest.fixture(scope="session")
def tiny_flux(tiny_family_factory: Callable[[str], family_models.TinyFamily]) -> family_models.TinyFamily:
    """Tiny random Flux-dev checkpoint (one double- and one single-stream block; CLIP-L + T5 from
    NQTestTinyCLIPLoader; positive conditioning through FluxGuidance)."""
    return tiny_family_factory("flux")


@pytest.fixture(scope="session", params=family_models.FAMILIES)
def tiny_family(request: pytest.FixtureRequest,
                tiny_family_factory: Callable[[str], family_models.TinyFamily]) -> family_models.TinyFamily:
    """Each test using it runs once per family: sdxl, sd3, flux."""
    return tiny_family_factory(request.param)


@pytest.fixture(scope="session")
def dummy_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-node V3 pack (node NQHarnessEcho) proving that pack loading works."""
    return comfy_harness.write_dummy_pack(tmp_path_factory.mktemp("packs") / comfy_harness.DUMMY_PACK_NAME)


@pytest.fixture(scope="session")
def family_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Test-only pack with NQTestTinyCLIPLoader(family): tiny SDXL / SD3 / Flux text encoders (family_models)."""
    return family_models.write_family_pack(tmp_path_factory.mktemp("packs") / family_models.FAMILY_PACK_NAME)


@pytest.fixture(scope="session")
def comfy_packs(dummy_pack: Path, family_pack: Path) -> dict[str, Path]:
    """Packs to load, name -> dir: the dummy pack, the tiny-text-encoder test pack, plus this repo as PACK_NAME
    once it has an __init__.py."""
    packs = {comfy_harness.DUMMY_PACK_NAME: dummy_pack, family_models.FAMILY_PACK_NAME: family_pack}
    if (REPO_ROOT / "__init__.py").is_file():
        packs[PACK_NAME] = REPO_ROOT
    return packs


@pytest.fixture(scope="session")
def nq_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's "noisequery_clip" model folder (CLIP weights), shared by in-process ComfyUI and the server."""
    return tmp_path_factory.mktemp("noisequery_clip")


@pytest.fixture(scope="session")
def nq_libraries_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The in-process ComfyUI's "noise_libraries" model folder (first in its search list)."""
    return tmp_path_factory.mktemp("noise_libraries_inproc")


@pytest.fixture(scope="session")
def server_libraries_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The headless server's "noise_libraries" model folder (from its extra_model_paths yaml)."""
    return tmp_path_factory.mktemp("noise_libraries_server")


@pytest.fixture(scope="session")
def nq_noiseclr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The in-process ComfyUI's "noiseclr_directions" model folder (NoiseCLR directions files)."""
    return tmp_path_factory.mktemp("noiseclr_inproc")


@pytest.fixture(scope="session")
def server_noiseclr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The headless server's "noiseclr_directions" model folder."""
    return tmp_path_factory.mktemp("noiseclr_server")


@pytest.fixture(scope="session")
def clip_weights(nq_clip_dir: Path) -> Path:
    """RANDOM ViT-B-32 weights at <noisequery_clip>/ViT-B-32/openai.safetensors: the pack loads them offline for
    clip_model "ViT-B-32:openai". Text-query results are meaningless; only the plumbing is tested."""
    return comfy_harness.write_random_open_clip_weights(nq_clip_dir / "ViT-B-32" / "openai.safetensors",
                                                        "ViT-B-32", seed=0)


@pytest.fixture(scope="session")
def comfy_nodes(comfy_path: Path, tiny_checkpoint: Path, comfy_packs: dict[str, Path], nq_clip_dir: Path,
                nq_libraries_dir: Path, nq_noiseclr_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """ComfyUI's `nodes` module, booted in this process (builtin nodes + comfy_packs, tiny checkpoint listed,
    noise_libraries -> nq_libraries_dir, noisequery_clip -> nq_clip_dir)."""
    return comfy_harness.boot_inprocess(
        comfy_path,
        extra_model_dirs={"checkpoints": tiny_checkpoint.parent, "noise_libraries": nq_libraries_dir,
                          "noisequery_clip": nq_clip_dir, "noiseclr_directions": nq_noiseclr_dir},
        custom_node_paths=comfy_packs,
        io_dir=tmp_path_factory.mktemp("comfy_io"),
    )


@pytest.fixture(scope="session")
def nq_embeddings_dir(comfy_nodes: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The in-process ComfyUI's "noisequery_embeddings" folder (seed-invariant prompts), first in its list (the pack
    registered the default one inside the ComfyUI checkout)."""
    return comfy_harness.add_model_folder("noisequery_embeddings", tmp_path_factory.mktemp("embeddings_inproc"))


@pytest.fixture(scope="session")
def comfy_runner(comfy_nodes: ModuleType) -> comfy_harness.InProcessRunner:
    """Runs API-format graphs in-process through ComfyUI's validate_prompt + PromptExecutor."""
    return comfy_harness.InProcessRunner(comfy_nodes)


@pytest.fixture(scope="session")
def comfy_server(comfy_path: Path, tiny_checkpoint: Path, comfy_packs: dict[str, Path], nq_clip_dir: Path,
                 server_libraries_dir: Path, server_noiseclr_dir: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[comfy_harness.ComfyServer]:
    """A running headless ComfyUI (--cpu) with comfy_packs and the tiny checkpoint (noise_libraries ->
    server_libraries_dir, noisequery_clip -> nq_clip_dir); stopped at session end."""
    server = comfy_harness.ComfyServer(
        comfy_path,
        packs=comfy_packs,
        model_dirs={"checkpoints": tiny_checkpoint.parent, "noise_libraries": server_libraries_dir,
                    "noisequery_clip": nq_clip_dir, "noiseclr_directions": server_noiseclr_dir},
        workdir=tmp_path_factory.mktemp("comfy_server"),
    )
    with server:
        yield server


@pytest.fixture(scope="session")
def embeddings_server(comfy_path: Path, tiny_checkpoint: Path, comfy_packs: dict[str, Path],
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[comfy_harness.ComfyServer, Path]]:
    """(server, its noisequery_embeddings folder): a headless ComfyUI for the seed-invariant prompt's POST /prompt
    tests, with that folder in a temp dir (comfy_server has none, and the default one is inside the ComfyUI
    checkout); stopped at session end."""
    emb = tmp_path_factory.mktemp("embeddings_server")
    server = comfy_harness.ComfyServer(
        comfy_path, packs=comfy_packs,
        model_dirs={"checkpoints": tiny_checkpoint.parent, "noisequery_embeddings": emb},
        workdir=tmp_path_factory.mktemp("comfy_server_embeddings"))
    with server:
        yield server, emb


@pytest.fixture(scope="session", params=comfy_harness.FRONTENDS)
def frontend(request: pytest.FixtureRequest) -> comfy_harness.Frontend:
    """Each browser test runs once per frontend; "newest" skips (a failure in CI) when it was not downloaded."""
    if request.param == "pinned":
        return comfy_harness.Frontend("pinned", None, comfy_harness.frontend_version())
    root = comfy_harness.newest_frontend_root()
    if root is None:
        pytest.skip(comfy_harness.NEWEST_FRONTEND_SKIP_REASON)
    return comfy_harness.Frontend("newest", root, comfy_harness.frontend_version(root))


@pytest.fixture(scope="module")
def frontend_server(frontend: comfy_harness.Frontend, request: pytest.FixtureRequest, comfy_path: Path,
                    tiny_checkpoint: Path, comfy_packs: dict[str, Path], nq_clip_dir: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[comfy_harness.ComfyServer]:
    """A headless ComfyUI serving `frontend`: the session's comfy_server for "pinned"; for "newest" a second server
    like it (own noise_libraries/noiseclr folders) started with --front-end-root, stopped after the module."""
    if frontend.root is None:
        yield request.getfixturevalue("comfy_server")
        return
    server = comfy_harness.ComfyServer(
        comfy_path,
        packs=comfy_packs,
        model_dirs={"checkpoints": tiny_checkpoint.parent,
                    "noise_libraries": tmp_path_factory.mktemp("noise_libraries_newest_fe"),
                    "noisequery_clip": nq_clip_dir,
                    "noiseclr_directions": tmp_path_factory.mktemp("noiseclr_newest_fe")},
        workdir=tmp_path_factory.mktemp("comfy_server_newest_fe"),
        front_end_root=frontend.root,
    )
    with server:
        log.info("ComfyUI with the newest frontend %s at %s", frontend.version, server.url)
        yield server
