"""A style image (issue 19): diffusers' IP-Adapter on the Diffutoon pipeline.

The image is encoded once per call (`style_embeds`) and its embeddings, kept on the host, go to every UNet call of
every window and of both passes (`window_image_embeds`): the UNet's `encoder_hid_proj` turns them into image tokens
that the IP-Adapter's cross-attention processors attend to beside the text.

Attention processors: the IP-Adapter's own processors take the UNet's cross-attention layers (keys: 77 text tokens
+ a few image tokens, short, so nothing to gain from a memory-efficient kernel there); memory-efficient attention
keeps the self-attention layers and motion modules, and the editing branch's cross-frame processors go on the spatial
self-attention only, so the three coexist. `memory_efficient_kept` keeps memory-efficient attention and its settings
across `load_ip_adapter` / `unload_ip_adapter`, which would otherwise rebuild the processors without them.

Only torch is imported here: the module ships beside the pipeline file.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager

import numpy as np
import torch

# the CLI's default weights: `pipe.load_ip_adapter(*DEFAULT_IP_ADAPTER)`
DEFAULT_IP_ADAPTER = ("h94/IP-Adapter", "models", "ip-adapter_sd15.bin")


def ip_adapter_loaded(pipe) -> bool:
    unet = pipe.unet
    return getattr(unet, "encoder_hid_proj", None) is not None and unet.config.encoder_hid_dim_type == "ip_image_proj"


def _num_adapters(pipe) -> int:
    return len(pipe.unet.encoder_hid_proj.image_projection_layers)


def check_style(pipe, ip_adapter_image, ip_adapter_image_embeds, do_cfg: bool, who: str = "the call") -> None:
    """The style inputs against the loaded IP-Adapter(s), before any model runs; each error says what to change.
    `who`: whose guidance `do_cfg` is (the editing branch's may differ from the call's)."""
    given = ip_adapter_image is not None or ip_adapter_image_embeds is not None
    if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
        raise ValueError("Provide either `ip_adapter_image` or `ip_adapter_image_embeds`, not both.")
    if not ip_adapter_loaded(pipe):
        if given:
            raise ValueError("A style image needs an IP-Adapter: pipe.load_ip_adapter('h94/IP-Adapter', "
                             "subfolder='models', weight_name='ip-adapter_sd15.bin') first.")
        return
    if not given:
        raise ValueError("An IP-Adapter is loaded: pass `ip_adapter_image` (the style image) or "
                         "`ip_adapter_image_embeds`, or call pipe.unload_ip_adapter() to render without one.")
    adapters = _num_adapters(pipe)
    if ip_adapter_image is not None:
        images = ip_adapter_image if isinstance(ip_adapter_image, list) else [ip_adapter_image]
        if len(images) != adapters:
            raise ValueError(f"`ip_adapter_image` must have one image (or list of images) per IP-Adapter: got "
                             f"{len(images)} for {adapters} IP-Adapter(s).")
        if getattr(pipe, "image_encoder", None) is None:
            raise ValueError("No image encoder is loaded (load_ip_adapter(..., image_encoder_folder=None)?): pass "
                             "`ip_adapter_image_embeds`, or load the IP-Adapter with its image encoder.")
        return
    embeds = ip_adapter_image_embeds
    if not isinstance(embeds, list) or len(embeds) != adapters or not all(
            isinstance(e, torch.Tensor) and e.ndim in (3, 4) for e in embeds):
        raise ValueError(f"`ip_adapter_image_embeds` must be a list of {adapters} tensor(s), one per IP-Adapter, "
                         "each 3D or 4D as diffusers' `prepare_ip_adapter_image_embeds` returns them.")
    if any(e.shape[0] != (2 if do_cfg else 1) for e in embeds):
        raise ValueError(f"`ip_adapter_image_embeds` must have a first dimension of {2 if do_cfg else 1} "
                         f"({'negative and positive, stacked, with guidance' if do_cfg else 'no guidance'} in {who}), "
                         f"got {[tuple(e.shape) for e in embeds]}" + (
                             "; pass `ip_adapter_image` instead (both sides are made from it), or give the editing "
                             "branch edit_kwargs={'guidance_scale': 1}." if who != "the call" else "."))


@torch.no_grad()
def style_embeds(pipe, ip_adapter_image, ip_adapter_image_embeds, device) -> list[torch.Tensor] | None:
    """The image embeddings of the call, on the host, one tensor per IP-Adapter: (2, ...) negative and positive
    from an image (diffusers' `prepare_ip_adapter_image_embeds`), as given otherwise; None without a style image."""
    if ip_adapter_image_embeds is not None:
        return [e.detach().cpu() for e in ip_adapter_image_embeds]
    if ip_adapter_image is None:
        return None
    embeds = pipe.prepare_ip_adapter_image_embeds(ip_adapter_image, None, device, 1, True)
    return [e.cpu() for e in embeds]


def window_image_embeds(image_embeds, key: str, device, dtype) -> dict | None:
    """The UNet's `added_cond_kwargs` for a batch of the CFG branch group `key` ("cfg": negative then positive,
    "neg", "pos", "single"), or None without a style image."""
    if image_embeds is None:
        return None
    pick = {"cfg": slice(None), "neg": slice(0, 1)}.get(key, slice(-1, None))  # the positive is last
    return {"image_embeds": [e[pick].to(device, dtype) for e in image_embeds]}


def _fingerprint(value) -> str | None:
    """A short hash of images (PIL, arrays, tensors, nested lists) or embeddings."""
    if value is None:
        return None
    digest = hashlib.sha256()

    def add(v):
        if isinstance(v, (list, tuple)):
            digest.update(f"[{len(v)}".encode())
            for item in v:
                add(item)
            return
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            v = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
        v = np.asarray(v.convert("RGB") if hasattr(v, "convert") else v)
        digest.update(f"{v.shape} {v.dtype}".encode())
        digest.update(np.ascontiguousarray(v).data)

    add(value)
    return digest.hexdigest()[:16]


def style_identity(pipe, ip_adapter_image, ip_adapter_image_embeds) -> dict | None:
    """What the render folder compares (besides the models' weights, which include the IP-Adapter's): the image's or
    embeddings' content, the IP-Adapter scales per layer, and the image preprocessing."""
    if not ip_adapter_loaded(pipe):
        return None
    scales = {name: list(p.scale) for name, p in pipe.unet.attn_processors.items() if hasattr(p, "to_k_ip")}
    extractor = getattr(pipe, "feature_extractor", None)
    preprocessing = json.dumps(extractor.to_dict(), sort_keys=True, default=str) if extractor is not None else None
    return {"image": _fingerprint(ip_adapter_image), "embeds": _fingerprint(ip_adapter_image_embeds),
            "scales": hashlib.sha256(json.dumps(scales, sort_keys=True).encode()).hexdigest()[:16],
            "feature_extractor": None if preprocessing is None else hashlib.sha256(preprocessing.encode()).hexdigest()[:16]}


@contextmanager
def memory_efficient_kept(pipe):
    """Memory-efficient attention (if on) off for a block of code and back on after with the same settings."""
    settings = getattr(pipe, "_memory_efficient_settings", None)
    if getattr(pipe, "_memory_efficient_snapshot", None) is None or settings is None:
        yield
        return
    pipe.disable_memory_efficient_attention()
    try:
        yield
    finally:
        pipe.enable_memory_efficient_attention(*settings)


# ---------------------------------------------------------------------------------------------------------------
# The CLI: --style-image PATH [--style-scale 0.6] [--ip-adapter HUB_ID_OR_FILE]


def ip_adapter_source(text: str | None) -> tuple[str, str, str]:
    """(repo id or folder, subfolder, weight file) for `load_ip_adapter`: a Hub id or folder holding
    models/ip-adapter_sd15.bin ("h94/IP-Adapter"), a Hub file "owner/repo/sub/folder/file.bin", or a local file
    (its image encoder in image_encoder/ beside it)."""
    if not text:
        return DEFAULT_IP_ADAPTER
    if os.path.isfile(text):
        return os.path.dirname(os.path.abspath(text)), "", os.path.basename(text)
    parts = text.strip("/").split("/")
    if len(parts) > 2 and parts[-1].endswith((".bin", ".safetensors")):
        return "/".join(parts[:2]), "/".join(parts[2:-1]), parts[-1]
    return text, *DEFAULT_IP_ADAPTER[1:]


def load_style_adapter(pipe, args) -> None:
    """The CLI's one call at model loading: the IP-Adapter named by --ip-adapter when --style-image is given."""
    if getattr(args, "style_image", None) is None:
        return
    repo, subfolder, weight_name = ip_adapter_source(getattr(args, "ip_adapter", None))
    pipe.load_ip_adapter(repo, subfolder=subfolder, weight_name=weight_name)
    pipe.set_ip_adapter_scale(args.style_scale)


def style_arguments(args) -> dict:
    """The pipeline arguments of --style-image (the image read now, so that a bad file fails before the models)."""
    path = getattr(args, "style_image", None)
    if path is None:
        return {}
    import PIL.Image

    with PIL.Image.open(path) as image:
        return {"ip_adapter_image": image.convert("RGB")}
