"""Tiny random-weight Diffutoon components: the real architectures at toy size, for offline tests, the demo
and benchmarks. Outputs made with them prove that the code runs, not that it makes art.

Example:
    >>> from diffutoon.tiny import build_tiny_pipeline
    >>> import numpy as np
    >>> pipe = build_tiny_pipeline()
    >>> video = np.zeros((4, 64, 64, 3), dtype=np.uint8)
    >>> frames = pipe(video=video, prompt="a girl", num_inference_steps=2, output_type="np",
    ...               lineart_detector=tiny_lineart_detector()).frames[0]
    >>> frames.shape
    (4, 64, 64, 3)
"""

from __future__ import annotations

import torch

# the SPEC's offline tokenizer: every byte-level character and its end-of-word form, no merges
_SPECIALS = ["<|startoftext|>", "<|endoftext|>"]


def _bytes_to_unicode() -> str:
    """GPT-2's byte-level alphabet: printable bytes as themselves, the rest shifted past 255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return "".join(chr(b) if b in keep else chr(next(shifted)) for b in range(256))


def tiny_tokenizer():
    """A CLIP tokenizer that needs no Hub: characters are tokens (SPEC section 4)."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode())
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] + _SPECIALS)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, bos_token=_SPECIALS[0],
                         eos_token=_SPECIALS[1], unk_token=_SPECIALS[1], pad_token=_SPECIALS[1])


def tiny_components(seed: int = 0, channels: tuple[int, int] = (32, 64), text_dim: int = 32,
                    num_controlnets: int = 2, edit: bool = False) -> dict:
    """The components of a `DiffutoonPipeline` (the UNet still 2D, as a checkpoint folder holds it).

    `channels` sets the UNet/ControlNet width: the default is tiny; benchmarks pass larger ones.
    `edit` adds the editing branch's two ControlNets (softedge, depth).
    """
    from diffusers import AutoencoderKL, ControlNetModel, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    blocks = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  block_out_channels=channels, layers_per_block=2, cross_attention_dim=text_dim,
                  norm_num_groups=4, attention_head_dim=8)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **blocks)
    # conditioning embedding with three stride-2 convs: pixels -> latents at the SD factor of 8
    controlnets = [ControlNetModel(in_channels=4, conditioning_embedding_out_channels=(8, 8, 8, 8), **blocks)
                   for _ in range(num_controlnets + 2 * edit)]
    adapter = MotionAdapter(block_out_channels=channels, motion_layers_per_block=2, motion_norm_num_groups=4,
                            motion_num_attention_heads=2, motion_max_seq_length=32, use_motion_mid_block=True)
    # four levels: the SD VAE's downsampling factor of 8
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, sample_size=64)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=37, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    for net in controlnets:  # random weights that make the condition image matter, as trained ones do
        for name, param in net.named_parameters():
            if name.endswith("weight") and not param.detach().any():  # diffusers' zero convolutions
                torch.nn.init.normal_(param, std=0.1)
        for conv in net.controlnet_cond_embedding.modules():  # default init: biases drown out the image
            if isinstance(conv, torch.nn.Conv2d):
                torch.nn.init.normal_(conv.weight, std=(2 / conv.weight[0].numel()) ** 0.5)
                torch.nn.init.zeros_(conv.bias)
    for module in (unet, adapter, vae, text_encoder, *controlnets):
        module.eval()
    parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, motion_adapter=adapter,
                 controlnet=controlnets[:num_controlnets])
    if edit:
        parts["edit_controlnet"] = controlnets[num_controlnets:]
    return parts


def build_tiny_pipeline(seed: int = 0, **kwargs):
    """A `DiffutoonPipeline` of tiny random components (lineart + tile ControlNets)."""
    from pipeline_diffutoon import DiffutoonPipeline, DiffutoonDDIMScheduler

    return DiffutoonPipeline(scheduler=DiffutoonDDIMScheduler(), **tiny_components(seed, **kwargs))


def save_tiny_pipeline(folder, seed: int = 0, **kwargs):
    """Write a tiny pipeline as a diffusers folder (model_index.json and one subfolder a component)."""
    pipe = build_tiny_pipeline(seed, **kwargs)
    pipe.save_pretrained(folder)
    return pipe


def tiny_softedge_detector(seed: int = 0):
    """controlnet-aux's `HEDdetector` (softedge) with random weights."""
    from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector

    torch.manual_seed(seed)
    return HEDdetector(ControlNetHED_Apache2().float().eval())


def tiny_depth_detector(image, detect_resolution=512, image_resolution=512, **kwargs):
    """A stand-in for MiDaS (whose random-weight DPT model is too slow for tests): inverted luminance, RGB."""
    import PIL.ImageOps

    return PIL.ImageOps.invert(image.convert("L")).convert("RGB")


def tiny_lineart_detector(seed: int = 0):
    """controlnet-aux's `LineartDetector` with random weights (the real ones live on the Hub)."""
    from controlnet_aux.lineart import Generator, LineartDetector

    torch.manual_seed(seed)
    # 1 residual block instead of 3: the same code path, a third of the CPU time
    return LineartDetector(Generator(3, 1, 1).eval(), Generator(3, 1, 1).eval())


def save_tiny_ip_adapter(folder, unet, seed: int = 0, image_size: int = 32, projection_dim: int = 16,
                         weight_name: str = "ip-adapter_sd15.safetensors"):
    """An IP-Adapter for a tiny pipeline's UNet laid out as h94/IP-Adapter's SD1.5 one: folder/models/`weight_name`
    (`image_proj.proj/norm.*`, `ip_adapter.{1,3,5...}.to_k_ip/to_v_ip.weight`, one pair per cross-attention layer in
    the UNet's processor order; .safetensors flat, .bin the nested {"image_proj": ..., "ip_adapter": ...}) and a random
    `CLIPVisionModelWithProjection` in folder/models/image_encoder. Load it with
    `pipe.load_ip_adapter(folder, subfolder="models", weight_name=weight_name)`."""
    from pathlib import Path

    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    models = Path(folder) / "models"
    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=image_size,
        patch_size=8, projection_dim=projection_dim)).eval().save_pretrained(models / "image_encoder")
    cross = unet.config.cross_attention_dim
    image_proj = {"proj.weight": torch.randn(4 * cross, projection_dim) * 0.2, "proj.bias": torch.randn(4 * cross) * 0.1,
                  "norm.weight": 1 + 0.1 * torch.randn(cross), "norm.bias": 0.1 * torch.randn(cross)}
    layers = [name[: -len(".processor")] for name in unet.attn_processors
              if name.endswith("attn2.processor") and "motion_modules" not in name]
    ip_adapter = {}
    for i, name in enumerate(layers):
        hidden = unet.get_submodule(name).to_k.weight.shape[0]
        for kind in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{2 * i + 1}.{kind}.weight"] = torch.randn(hidden, cross) * 0.2
    if weight_name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({**{f"image_proj.{k}": v.contiguous() for k, v in image_proj.items()},
                   **{f"ip_adapter.{k}": v.contiguous() for k, v in ip_adapter.items()}}, models / weight_name)
    else:
        torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter}, models / weight_name)
    return models / weight_name
