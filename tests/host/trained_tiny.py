"""A tiny SD1.5-architecture checkpoint trained briefly on CPU, so that its renders and its VAE mean something.

The random tiny checkpoint (comfy_harness.make_tiny_sd15_checkpoint) is good for plumbing only: its sampler runs
away and its random TAESD does not round-trip, so no render can move toward any image. This one has the same
architecture and key set (ComfyUI's CheckpointLoaderSimple loads it as SD15) with two parts trained:

  * the VAE (ComfyUI's own comfy.taesd.taesd.TAESD, encoder + decoder) as an autoencoder on crops of
    scikit-image's bundled colour photographs, its vae_scale / vae_shift set so SD15's latent format
    (scale 0.18215) sees zero-mean, unit-variance latents;
  * the UNet (ComfyUI's own UNetModel, comfy_harness._tiny_unet_config) with the eps objective, weighted toward
    x0-space errors (TrainConfig.x0_weight_max), on ComfyUI's own SD15 model_sampling sigmas, on the VAE latents
    of PHOTOS (a few whole photographs, squared and resized), conditioned on the checkpoint's own random, fixed
    CLIP-L: the shared caption SHARED_CAPTION 30 % of the time, each photo's own caption 60 %, the empty caption
    10 % (for CFG).

With this few images the UNet memorises them: different seeds with SHARED_CAPTION render different photos, the
situation the seed-invariant prompt is for (one seed gave the liked image; carry it to the others), and each own
caption renders its photo at cfg 4 for most captions (measured: 20 of 28 caption x seed renders; cfg 1: 13 of 28).
The CLIP-L weights are the random tiny checkpoint's (comfy_harness.tiny_sd15_state_dict, fixed seed).

Deterministic on one machine (fixed seeds, fixed thread count, fp32); another CPU may differ in the last bits,
so tests assert margins, not values. Cached per machine in ~/.cache/noisequery/trained_tiny/<key>/ (key: the
config, MAKER_VERSION and the ComfyUI version), written atomically.

    COMFYUI_PATH=~/ComfyUI .venv/bin/python tests/host/trained_tiny.py     # make (or reuse) it, print its sanity
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import comfy_harness

log = logging.getLogger("noisequery.trained_tiny")

TRAINED_CKPT_NAME = "tiny_sd15_trained.safetensors"
MAKER_VERSION = 2  # bump when the training code changes what it writes (invalidates the cache)
SD15_LATENT_SCALE = 0.18215  # comfy.latent_formats.SD15.scale_factor
SHARED_CAPTION = "a photo"
# (skimage.data loader, caption): colour photographs with distinct palettes and layouts.
PHOTOS = (
    ("astronaut", "a photo of an astronaut"),
    ("chelsea", "a photo of a cat"),
    ("coffee", "a photo of a cup of coffee"),
    ("rocket", "a photo of a rocket"),
    ("immunohistochemistry", "a photo of stained cells"),
    ("hubble_deep_field", "a photo of galaxies"),
    ("retina", "a photo of a retina"),
)
PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (hashed into the cache key)."""

    size: int = 32  # training images are size x size pixels (latents size/8: 4x4, cheap on 2 CPU cores)
    photos: tuple[tuple[str, str], ...] = PHOTOS
    seed: int = 20251130
    threads: int = 2  # torch threads while training (fixed: the summation order decides the last bits)
    bf16: bool = True  # bf16 autocast for the forward passes (fp32 weights, Adam and losses): ~1.5x on CPU
    # VAE: random crops of every photo at random scales, plus the training images themselves
    vae_steps: int = 30  # from the colour pass-through start (_init_taesd)
    vae_batch: int = 8
    vae_crop: int = 32  # TAESD is fully convolutional: trained on crops, used at `size`
    vae_lr: float = 5e-4
    vae_latent_noise: float = 0.1  # noise added to latents while training: the decoder must tolerate near misses
    # UNet
    unet_steps: int = 2000  # 150 renders photos by seed but ignores the captions; 2000 follows them at cfg 4
    unet_batch: int = 8
    unet_lr: float = 1.5e-3
    p_shared: float = 0.3  # share of samples captioned SHARED_CAPTION
    p_empty: float = 0.1  # share captioned "" (unconditional, for CFG); the rest get their photo's own caption
    # The eps loss weighted by min(sigma^2, x0_weight_max) (x0-space MSE, capped) and normalised per batch; 0: plain
    # eps. The plain eps loss scales x0 errors by 1/sigma^2, so at the high noise levels where only the caption can
    # tell the photos apart it barely rewards listening to it (measured: 1200 plain steps followed 1 caption of 7).
    x0_weight_max: float = 25.0


DEFAULT_CONFIG = TrainConfig()


@contextmanager
def _threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _autocast(cfg: TrainConfig) -> Any:
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16)


def _square(img: Any, size: int) -> Any:
    """Centre-crop to a square and resize (PIL box filter) to size x size uint8 RGB."""
    import numpy as np
    from PIL import Image

    a = np.asarray(img)[..., :3]
    h, w = a.shape[:2]
    s = min(h, w)
    y, x = (h - s) // 2, (w - s) // 2
    pic = Image.fromarray(np.ascontiguousarray(a[y:y + s, x:x + s]))
    return np.asarray(pic.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def photo(name: str) -> Any:
    """A scikit-image bundled photograph as uint8 HxWx3 (stereo pairs: the left image)."""
    import numpy as np
    import skimage.data

    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):
        img = img[0]
    return np.asarray(img)[..., :3]


def training_images(cfg: TrainConfig = DEFAULT_CONFIG) -> Any:
    """[N, size, size, 3] uint8: the UNet's training set, one per entry of cfg.photos."""
    import numpy as np

    return np.stack([_square(photo(name), cfg.size) for name, _ in cfg.photos])


def _vae_batch(photos: list[Any], images: Any, cfg: TrainConfig, gen: Any) -> Any:
    """[B, 3, crop, crop] float 0..1: half random crops of the photos at random scales, half crops of the
    training images at their own scale (the images the UNet's latents come from must round-trip best)."""
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for b in range(cfg.vae_batch):
        r = torch.rand(4, generator=gen).tolist()
        if b % 2:
            src = images[int(r[0] * len(images)) % len(images)]
            c = cfg.vae_crop
            y, x = int(r[1] * (src.shape[0] - c + 1)), int(r[2] * (src.shape[1] - c + 1))
            crop = src[y:y + c, x:x + c]
        else:
            src = photos[int(r[0] * len(photos)) % len(photos)]
            # a square window of 1/4 to the full shorter side, resized to the crop size
            s = int(min(src.shape[:2]) * (0.25 + 0.75 * r[3]))
            y, x = int(r[1] * (src.shape[0] - s + 1)), int(r[2] * (src.shape[1] - s + 1))
            crop = np.asarray(Image.fromarray(np.ascontiguousarray(src[y:y + s, x:x + s])).resize(
                (cfg.vae_crop, cfg.vae_crop), Image.Resampling.BOX))
        if r[3] > 0.5:
            crop = crop[:, ::-1]
        out.append(torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 255.0)
    return torch.stack(out)


def _init_taesd(taesd: Any, gen: Any) -> None:
    """A colour pass-through start, so that a short run suffices: every residual Block starts as the identity
    (its last conv zero), the strided / upsampling convs carry each channel to itself (a 3x3 box average down,
    the centre tap up), and the first and last convs route RGB into latent channels 0-2 and back; the other 61
    feature channels and latent channel 3 start random / unused and are what training puts to work. Decoded at
    the start, a latent is its 8x8 block's blurred mean colour."""
    import torch

    def he(p: Any) -> None:
        fan_in = p.shape[1] * p.shape[2] * p.shape[3]
        p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / fan_in) ** 0.5)

    def route(p: Any, pairs: range, kernel: Any = None) -> None:
        """out channel c <- in channel c (centre tap 1, or `kernel`) for c in pairs; other weights of those rows 0."""
        for c in pairs:
            p[c].zero_()
            if kernel is None:
                p[c, c, 1, 1] = 1.0
            else:
                p[c, c] = kernel

    box = torch.full((3, 3), 1.0 / 9.0)
    with torch.no_grad():
        for p in taesd.parameters():
            if p.dim() == 4:
                he(p)
            elif p.dim() == 1:
                p.zero_()
        enc, dec = taesd.taesd_encoder, taesd.taesd_decoder
        for seq in (enc, dec):
            for m in seq:
                if type(m).__name__ == "Block":
                    m.conv[4].weight.zero_()
        route(enc[0].weight, range(3))
        for i in (2, 6, 10):
            route(enc[i].weight, range(64), box)
        enc[14].weight.zero_()
        route(enc[14].weight, range(3))
        route(dec[1].weight, range(3))
        for i in (7, 12, 17):
            route(dec[i].weight, range(64))
        dec[19].weight.zero_()
        route(dec[19].weight, range(3))
        taesd.vae_scale.fill_(1.0)
        taesd.vae_shift.fill_(0.0)


def _optimiser_step(opt: Any, sched: Any, loss: Any, losses: list[float], what: str, total: int, t0: float,
                    clip: Any = None) -> None:
    """One Adam step (gradient norm clipped to 1 when clip holds the parameters), the loss kept, a log line per 25."""
    import numpy as np
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()
    sched.step()
    losses.append(float(loss.detach()))
    if len(losses) % 25 == 0:
        log.info("%s step %d/%d loss %.4f (%.0f s)", what, len(losses), total, np.mean(losses[-25:]),
                 time.perf_counter() - t0)


def train_vae(cfg: TrainConfig, images: Any) -> tuple[Any, dict[str, float]]:
    """ComfyUI's TAESD trained as an autoencoder (L1 + MSE on 0..1 pixels); returns it (vae_scale / vae_shift set
    for SD15's latent format) and figures of the run."""
    import comfy.taesd.taesd
    import numpy as np
    import torch

    gen = torch.Generator().manual_seed(cfg.seed)
    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    _init_taesd(taesd, gen)
    photos = [photo(name) for name in _vae_photo_names(cfg)]
    params = [p for n, p in taesd.named_parameters() if n not in ("vae_scale", "vae_shift")]
    opt = torch.optim.Adam(params, lr=cfg.vae_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.1)
    t0 = time.perf_counter()
    losses = []
    for _ in range(cfg.vae_steps):
        x = _vae_batch(photos, images, cfg, gen)
        with _autocast(cfg):
            z = taesd.taesd_encoder(x)
            z = z + cfg.vae_latent_noise * torch.randn(z.shape, generator=gen)
            y = taesd.taesd_decoder(z)
        z, y = z.float(), y.float()
        loss = (y - x).abs().mean() + ((y - x) ** 2).mean() + 1e-3 * (z ** 2).mean()
        _optimiser_step(opt, sched, loss, losses, "VAE", cfg.vae_steps, t0)
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        z = taesd.taesd_encoder(x)
        std, mean = float(z.std()), float(z.mean())
        # VAE.encode gives enc(x)/vae_scale + vae_shift and SD15 multiplies by 0.18215: unit variance, zero mean.
        taesd.vae_scale.fill_(std * SD15_LATENT_SCALE)
        taesd.vae_shift.fill_(-mean / (std * SD15_LATENT_SCALE))
        round_trip = float((taesd.taesd_decoder(z).clamp(0, 1) - x).abs().mean())
    return taesd, {"vae_seconds": time.perf_counter() - t0, "vae_loss_first": float(np.mean(losses[:10])),
                   "vae_loss_last": float(np.mean(losses[-10:])), "vae_round_trip_train": round_trip,
                   "vae_raw_latent_std": std, "vae_raw_latent_mean": mean}


def _vae_photo_names(cfg: TrainConfig) -> list[str]:
    # the training photos plus a few more, so the autoencoder is not tied to eight palettes
    extra = ("colorwheel", "cat", "stereo_motorcycle")
    return [name for name, _ in cfg.photos] + [e for e in extra if e not in {n for n, _ in cfg.photos}]


def _zero_residual_outputs(unet: Any) -> None:
    """Zero the resblocks' last convs and the UNet's output conv (as the original LDM code does): those blocks
    start as the identity, which trains fast and stable. The transformers' proj_out stay random: zeroed, the text
    has no say at the start and a short run never learns to listen to it (measured: a 150-step run with them zeroed
    gave the same loss under every caption)."""
    import torch

    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".out_layers.3." in name or name.startswith("out.2."):
                p.zero_()


def text_contexts(clip: Any, texts: list[str]) -> Any:
    """[len(texts), 77, 768] float32: the CLIP's conditioning of each text, as CLIPTextEncode makes it."""
    import torch

    rows = []
    for t in texts:
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(t))
        rows.append(cond[0][0][0].float())
    return torch.stack(rows)


def train_unet(cfg: TrainConfig, unet: Any, model_sampling: Any, latents: Any, contexts: Any
               ) -> dict[str, float]:
    """Train ``unet`` in place with the eps objective on ComfyUI's SD15 sampling (x_t = x_0 + σ·n, input
    x_t/√(σ²+1), timestep from σ), uniform timesteps. latents: [N, 4, h, w] already in the model's space
    (process_in applied); contexts: [N + 2, 77, 768]: per-image captions, then the shared, then the empty."""
    import numpy as np
    import torch

    gen = torch.Generator().manual_seed(cfg.seed + 1)
    n = latents.shape[0]
    sigmas = model_sampling.sigmas.float()
    opt = torch.optim.Adam(unet.parameters(), lr=cfg.unet_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.unet_lr, total_steps=cfg.unet_steps, pct_start=0.1)
    t0 = time.perf_counter()
    losses = []
    for _ in range(cfg.unet_steps):
        img = torch.randint(0, n, (cfg.unet_batch,), generator=gen)
        u = torch.rand(cfg.unet_batch, generator=gen)
        cap = torch.where(u < cfg.p_shared, torch.full_like(img, n),
                          torch.where(u < cfg.p_shared + cfg.p_empty, torch.full_like(img, n + 1), img))
        t = torch.randint(0, sigmas.shape[0], (cfg.unet_batch,), generator=gen)
        noise = torch.randn((cfg.unet_batch, *latents.shape[1:]), generator=gen)
        sigma = sigmas[t]
        x0 = latents[img]
        # random horizontal flips of the latents would change the images: none (the UNet must memorise them)
        xt = x0 + sigma.view(-1, 1, 1, 1) * noise
        x_in = model_sampling.calculate_input(sigma, xt)
        with _autocast(cfg):
            eps = unet(x_in, model_sampling.timestep(sigma).float(), context=contexts[cap])
        err = ((eps.float() - noise) ** 2).mean(dim=(1, 2, 3))
        if cfg.x0_weight_max > 0:
            w = (sigma ** 2).clamp(max=cfg.x0_weight_max)
            loss = (err * w).sum() / w.sum()
        else:
            loss = err.mean()
        _optimiser_step(opt, sched, loss, losses, "UNet", cfg.unet_steps, t0, clip=unet.parameters())
    return {"unet_seconds": time.perf_counter() - t0, "unet_loss_first": float(np.mean(losses[:10])),
            "unet_loss_last": float(np.mean(losses[-20:]))}


def trained_state_dict(cfg: TrainConfig = DEFAULT_CONFIG, comfy_path: PathLike | None = None
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(checkpoint state dict, training figures): the random tiny SD1.5 with UNet and VAE trained (see module)."""
    comfy_harness.prepare_comfy_imports(comfy_path)
    import comfy.model_base
    import comfy.ops
    import comfy.sd
    import comfy.supported_models
    import comfy.utils
    import numpy as np
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    base = comfy_harness.tiny_sd15_state_dict(comfy_path)
    figures: dict[str, Any] = {}
    with _threads(cfg.threads), torch.inference_mode(False), torch.enable_grad():
        torch.set_flush_denormal(True)  # zero-initialised branches grow through denormals: 10x slower without
        images = training_images(cfg)
        taesd, f = train_vae(cfg, images)
        figures.update(f)

        # the random checkpoint's CLIP-L (fixed weights): conditioning exactly as CLIPTextEncode will make it
        clip_sd = {k: v for k, v in base.items() if k.startswith("cond_stage_model.")}
        model_config = comfy.supported_models.SD15(comfy_harness._tiny_unet_config())
        clip_sd = model_config.process_clip_state_dict(clip_sd)  # as comfy.sd.load_state_dict_guess_config
        clip = comfy.sd.CLIP(model_config.clip_target(state_dict=clip_sd), tokenizer_data=clip_sd,
                             parameters=comfy.utils.calculate_parameters(clip_sd), state_dict=clip_sd)
        texts = [c for _, c in cfg.photos] + [SHARED_CAPTION, ""]
        with torch.no_grad():
            contexts = text_contexts(clip, texts).cpu()
            x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
            latents = taesd.encode(x * 2 - 1) * SD15_LATENT_SCALE  # VAE.encode then SD15 process_in
        del clip
        figures["latent_std"], figures["latent_mean"] = float(latents.std()), float(latents.mean())

        unet = UNetModel(**model_config.unet_config, device="cpu", operations=comfy.ops.disable_weight_init)
        prefix = "model.diffusion_model."
        unet.load_state_dict({k[len(prefix):]: v.float() for k, v in base.items() if k.startswith(prefix)})
        _zero_residual_outputs(unet)
        model_sampling = comfy.model_base.model_sampling(model_config, comfy.model_base.ModelType.EPS)
        figures.update(train_unet(cfg, unet, model_sampling, latents, contexts))

    sd = dict(base)
    for k, v in unet.state_dict().items():
        sd[prefix + k] = v.detach().float().contiguous()
    for k, v in taesd.state_dict().items():
        sd["first_stage_model." + k] = v.detach().float().contiguous()
    return sd, figures


def cache_key(cfg: TrainConfig, comfy_path: PathLike | None = None) -> str:
    """Hash of (MAKER_VERSION, the config, ComfyUI's version): the cache folder's name."""
    root = comfy_harness._require_comfy_path(comfy_path)
    version = ""
    vfile = root / "comfyui_version.py"
    if vfile.is_file():
        version = vfile.read_text(encoding="utf-8", errors="replace")
    blob = json.dumps({"maker": MAKER_VERSION, "config": dataclasses.asdict(cfg), "comfyui": version}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """$NOISEQUERY_TRAINED_TINY_CACHE or ~/.cache/noisequery/trained_tiny."""
    env = os.environ.get("NOISEQUERY_TRAINED_TINY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "noisequery" / "trained_tiny"


def cached_trained_checkpoint(comfy_path: PathLike | None = None, cfg: TrainConfig = DEFAULT_CONFIG,
                              cache_dir: PathLike | None = None) -> Path:
    """The trained checkpoint from the per-machine cache, trained and written (atomically) when missing.
    Its training figures are in the safetensors metadata (read_figures)."""
    from safetensors.torch import save_file

    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = base / cache_key(cfg, comfy_path) / TRAINED_CKPT_NAME
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    sd, figures = trained_state_dict(cfg, comfy_path)
    figures["train_seconds"] = time.perf_counter() - t0
    figures["train_cpu_seconds"] = time.process_time() - c0  # all threads: ~ wall x cores on an idle machine
    figures["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else []
    tmp = out.with_name(f"{out.name}.{os.getpid()}.part")
    # One metadata entry: safetensors writes a multi-key metadata map in hash order (random per process).
    save_file(sd, str(tmp), metadata={"noisequery_trained_tiny": json.dumps(
        {"config": dataclasses.asdict(cfg), "figures": figures}, sort_keys=True)})
    os.replace(tmp, out)
    log.info("trained %s in %.0f s: %s", out, figures["train_seconds"], figures)
    return out


def read_figures(path: PathLike) -> dict[str, Any]:
    """The training figures stored in a trained checkpoint's metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return dict(json.loads(meta.get("noisequery_trained_tiny", "{}")).get("figures", {}))


def sanity(nodes: Any, ckpt_name: str, cfg: TrainConfig = DEFAULT_CONFIG, seeds: range = range(8),
           steps: int = 20, cfg_scale: float = 1.0) -> dict[str, Any]:
    """What the trained model does, through ComfyUI's own nodes (CheckpointLoaderSimple, CLIPTextEncode,
    KSampler euler/normal, VAEDecode/Encode), on the booted in-process host ``nodes``:

      vae_round_trip: mean |decode(encode(x)) - x| over the training images, 0..1 pixels;
      nearest: per seed, (index, mean |render - image|) of the training image nearest the SHARED_CAPTION render;
      latent_rms: RMS of the rendered latents (the liked image's encoding is ~1: a runaway sampler gives 10s);
      distinct: how many different training images the seeds landed nearest to.
    """
    import numpy as np
    import torch

    images = training_images(cfg)
    x = torch.from_numpy(images).float() / 255.0
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt_name)[:3]
        rt = vae.decode(vae.encode(x))[..., :3].float().cpu()
        round_trip = float((rt - x).abs().mean())
        cond = nodes.CLIPTextEncode().encode(clip, SHARED_CAPTION)[0]
        empty = nodes.EmptyLatentImage().generate(cfg.size, cfg.size, 1)[0]
        nearest, rms = [], []
        for seed in seeds:
            lat = nodes.common_ksampler(model, seed, steps, cfg_scale, "euler", "normal", cond, cond, empty)[0]
            rms.append(float(model.model.latent_format.process_in(lat["samples"].float()).pow(2).mean().sqrt()))
            img = vae.decode(lat["samples"])[..., :3].float().cpu()[0]
            d = (img.unsqueeze(0) - x).abs().mean(dim=(1, 2, 3))
            nearest.append((int(d.argmin()), float(d.min())))
    return {"vae_round_trip": round_trip, "nearest": nearest, "latent_rms": float(np.mean(rms)),
            "distinct": len({i for i, _ in nearest})}


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    comfy_path = comfy_harness.find_comfyui()
    if comfy_path is None:
        print(comfy_harness.SKIP_REASON, file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    path = cached_trained_checkpoint(comfy_path)
    print(f"checkpoint {path} ({time.perf_counter() - t0:.0f} s)")
    print(json.dumps(read_figures(path), indent=2))
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="nq_trained_tiny_"))
    (work / "ckpt").mkdir()
    os.symlink(path, work / "ckpt" / TRAINED_CKPT_NAME)
    nodes = comfy_harness.boot_inprocess(comfy_path, extra_model_dirs={"checkpoints": work / "ckpt"},
                                         io_dir=work / "io")
    print(json.dumps(sanity(nodes, TRAINED_CKPT_NAME), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
