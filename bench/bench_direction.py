"""The cost of directing the look (issue 19): a style image (IP-Adapter) and prompts over time.

1. Seconds per denoising step, same run, alternating: the plain render, with a prompt schedule (3 keys), with a style
   image (the tiny IP-Adapter in the real file layout, diffutoon.tiny.save_tiny_ip_adapter). Tiny architectures at the
   width of bench_pipeline.py (channels 64/128, CLIP width 64), 128x128 frames, N = 16, windows of 8 (stride 4).
2. FLOPs at full SD1.5 size on the meta device (bench_flops.py's models): one UNet window of 16 frames with and
   without the SD1.5 IP-Adapter's processors (h94/IP-Adapter ip-adapter_sd15: 4 image tokens of width 768 from a
   1024-d CLIP ViT-H/14 embedding), and the image encoder's one call.
3. The prompt schedule's host work: interpolating one window's 16 frames of 77 x 768 embeddings.

    python bench/bench_direction.py [--frames 16 --size 128 --steps 3 --repeats 3]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def step_seconds(pipe, video, steps, **kwargs):
    """Seconds per denoising step (median of the steps after the first), from step-end callbacks."""
    stamps = []

    def tick(p, i, t, tensors):
        stamps.append(time.perf_counter())
        return {}

    stamps.append(time.perf_counter())
    pipe(video=video, prompt=kwargs.pop("prompt", "a girl dancing"), negative_prompt="bad", num_inference_steps=steps,
         context_length=8, context_stride=4, conditioning_frames=[video, None], output_type="latent",
         generator=torch.Generator().manual_seed(0), callback_on_step_end=tick, **kwargs)
    return statistics.median(np.diff(stamps[1:])) if len(stamps) > 2 else stamps[-1] - stamps[0]


def timing(frames, size, steps, repeats):
    import PIL.Image

    from diffutoon.tiny import save_tiny_ip_adapter, tiny_components
    from pipeline_diffutoon import DiffutoonDDIMScheduler, DiffutoonPipeline

    torch.set_num_threads(2)
    pipe = DiffutoonPipeline(scheduler=DiffutoonDDIMScheduler(), **tiny_components(0, channels=(64, 128), text_dim=64))
    pipe.set_progress_bar_config(disable=True)
    video = np.random.default_rng(0).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
    style = PIL.Image.fromarray(video[0])
    schedule = {0: "a girl dancing, day", frames // 2: "a girl dancing, dusk", frames - 1: "a girl dancing, night"}
    with tempfile.TemporaryDirectory() as folder:
        save_tiny_ip_adapter(folder, pipe.unet)
        times = {"plain": [], "prompt schedule (3 keys)": [], "style image (IP-Adapter)": []}
        for _ in range(repeats):
            times["plain"].append(step_seconds(pipe, video, steps))
            times["prompt schedule (3 keys)"].append(step_seconds(pipe, video, steps, prompt=schedule))
            pipe.load_ip_adapter(folder, subfolder="models", weight_name="ip-adapter_sd15.safetensors")
            times["style image (IP-Adapter)"].append(step_seconds(pipe, video, steps, ip_adapter_image=style))
            pipe.unload_ip_adapter()
    # the fastest of the interleaved repeats: on a shared machine the slow ones measure the neighbours
    base = min(times["plain"])
    print(f"\n{frames} frames of {size}x{size}, tiny models (64/128 channels), {steps} steps, {repeats} repeats, "
          f"torch threads 2\n\n| render | s/step (fastest repeat) | all repeats | ratio to plain |\n|---|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {min(values):.3f} | {', '.join(f'{v:.2f}' for v in values)} | {min(values) / base:.3f}x |")


def sd15_ip_adapter_state(unet, device="meta"):
    """ip-adapter_sd15's shapes (image_proj: 4 tokens x 768 from a 1024-d embedding) for `unet`, no values."""
    cross, clip = unet.config.cross_attention_dim, 1024
    image_proj = {"proj.weight": torch.empty(4 * cross, clip, device=device), "proj.bias": torch.empty(4 * cross, device=device),
                  "norm.weight": torch.empty(cross, device=device), "norm.bias": torch.empty(cross, device=device)}
    layers = [n[: -len(".processor")] for n in unet.attn_processors if n.endswith("attn2.processor") and "motion" not in n]
    ip_adapter = {}
    for i, name in enumerate(layers):
        hidden = unet.get_submodule(name).to_k.weight.shape[0]
        for kind in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{2 * i + 1}.{kind}.weight"] = torch.empty(hidden, cross, device=device)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


@torch.no_grad()
def flops(size, frames=16):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from bench_flops import TEXT_TOKENS, build_models, flop_counter

    unet = build_models()["unet"]
    x = torch.zeros(1, 4, frames, size // 8, size // 8, device="meta")
    text = torch.zeros(frames, TEXT_TOKENS, 768, device="meta")
    counter = flop_counter()
    with counter:
        unet(x, torch.tensor(999, device="meta"), encoder_hidden_states=text)
    plain = counter.get_total_flops()
    unet._load_ip_adapter_weights([sd15_ip_adapter_state(unet)], low_cpu_mem_usage=True)
    counter = flop_counter()
    with counter:
        unet(x, torch.tensor(999, device="meta"), encoder_hidden_states=text,
             added_cond_kwargs={"image_embeds": [torch.zeros(1, 1, 1024, device="meta")]})
    styled = counter.get_total_flops()
    with torch.device("meta"):  # laion/CLIP-ViT-H-14, h94/IP-Adapter models/image_encoder/config.json
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
            patch_size=14, projection_dim=1024, hidden_act="gelu"))
    counter = flop_counter()
    with counter:
        encoder(torch.zeros(1, 3, 224, 224, device="meta"))
    print(f"\nFull SD1.5 size, {size}x{size}, one UNet window of {frames} frames, one CFG branch (meta device):\n\n"
          "| | TFLOP | ratio |\n|---|---|---|\n"
          f"| UNet + motion modules | {plain / 1e12:,.2f} | 1 |\n"
          f"| with the IP-Adapter (4 image tokens in 16 cross-attention layers) | {styled / 1e12:,.2f} | "
          f"{styled / plain:.5f} |\n"
          f"| image encoder (CLIP ViT-H/14, once per render) | {counter.get_total_flops() / 1e12:,.3f} | - |")


def schedule_host_cost(repeats=200):
    from diffutoon.prompts import frame_embeds

    keys = torch.randn(3, 77, 768, dtype=torch.float16)
    frames = (0, 500, 999)
    plain = keys[:1]
    for name, fn in (("one prompt (repeat)", lambda s: frame_embeds(plain, None, s, s + 16)),
                     ("3-key schedule (lerp per frame)", lambda s: frame_embeds(keys, frames, s, s + 16))):
        t = time.perf_counter()
        for i in range(repeats):
            fn(400 + i % 50)
        print(f"| {name} | {(time.perf_counter() - t) / repeats * 1e3:.3f} ms per window of 16 frames |")
    print(f"| host memory of the schedule | {keys.numel() * 2 / 1e6:.2f} MB for 3 keys (fp16), whatever the length |")


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flops-size", type=int, default=1536)
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    timing(args.frames, args.size, args.steps, args.repeats)
    flops(args.flops_size)
    print("\nPrompt schedule, host work (SD1.5 width 768, 77 tokens):\n\n| | |\n|---|---|")
    schedule_host_cost()


if __name__ == "__main__":
    main()
