"""Peak memory and time of attention: diffusers' processors vs attention_processors' memory-efficient ones.

Part 1 (real runs, CPU): one attention-layer call at 4,096 / 16,384 / 36,864 tokens, one head of dim 40 and 64
(the SD1.5 UNet's heads) and the VAE mid-block's single 512-channel head (GroupNorm + residual, 4-D input).
Processors: naive = diffusers AttnProcessor (baddbmm + softmax: the full score matrix), default =
AttnProcessor2_0 (torch SDPA, whatever kernel torch picks), memeff = MemoryEfficientAttnProcessor("auto"),
chunked = MemoryEfficientAttnProcessor("chunked"). Peak = VmHWM - VmRSS around the call (peak reset through
/proc/self/clear_refs), so it counts everything the call allocates, inputs excluded.

Part 2: decoding one 1024x1024 and one 1536x1536 frame with a full-size SD VAE (random weights). A real CPU
decode of 1536x1536 costs ~15 TFLOP (10 min on this 2-core machine), so peaks are counted on the meta device:
every tensor PyTorch allocates is added when created and removed when its storage dies (exact tensor bytes,
no compute); one real 512x512 decode checks the count against RSS.

Run: MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 python bench/bench_attention.py
(the malloc settings return freed blocks to the OS at once, so each measured peak starts from a clean RSS).
"""

import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

TOKENS = (4096, 16384, 36864)
LAYERS = ("unet_hd40", "unet_hd64", "vae_512")
IMPLS = ("naive", "default", "memeff", "chunked")
GIB = 2**30


def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def mem_available():
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) * 1024


def make_layer(layer):
    from diffusers.models.attention_processor import Attention

    if layer == "vae_512":  # as diffusers' UNetMidBlock2D builds it for AutoencoderKL
        return Attention(512, heads=1, dim_head=512, rescale_output_factor=1.0, eps=1e-6, norm_num_groups=32,
                         residual_connection=True, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True)
    d = int(layer.split("hd")[1])
    return Attention(d, heads=1, dim_head=d)


def make_input(layer, n):
    if layer == "vae_512":
        side = int(n**0.5)
        return torch.randn(1, 512, side, side)
    return torch.randn(1, n, int(layer.split("hd")[1]))


def make_processor(impl):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from attention_processors import MemoryEfficientAttnProcessor

    return {"naive": AttnProcessor, "default": AttnProcessor2_0, "memeff": lambda: MemoryEfficientAttnProcessor("auto"),
            "chunked": lambda: MemoryEfficientAttnProcessor("chunked")}[impl]()


def run_layer(layer, tokens):
    """Child process: every (tokens, impl) of one layer; prints one line per case."""
    torch.manual_seed(0)
    attn = make_layer(layer).eval()
    with torch.no_grad():
        for impl in IMPLS:  # warm up thread pools and lazy inits
            attn.set_processor(make_processor(impl))
            attn(make_input(layer, 1024))
        for n in tokens:
            x = make_input(layer, n)
            for impl in IMPLS:
                if layer == "vae_512" and n >= 36864 and impl == "chunked":
                    continue  # 2.8 TFLOP per call on this CPU; its memory is chunk x tokens like the others
                need = 2 * n * n * 4  # scores + probabilities of the naive path
                if impl == "naive" and mem_available() < need * 1.3 + 2 * GIB:
                    print(f"RESULT {layer} {n} {impl} skipped {need / GIB:.2f}", flush=True)
                    continue
                attn.set_processor(make_processor(impl))
                open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
                before = status("VmRSS")
                t = time.perf_counter()
                y = attn(x)
                dt = time.perf_counter() - t
                peak = status("VmHWM") - before
                del y
                print(f"RESULT {layer} {n} {impl} {peak / 2**20:.1f} {dt:.3f}", flush=True)


from diffutoon.memory import LiveTensorBytes  # noqa: E402  (the estimator's own meter)


def sd_vae(device):
    from diffusers import AutoencoderKL

    with torch.device(device):
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4).eval()
    del vae.encoder  # decode only
    return vae


def set_vae_impl(vae, impl):
    from attention_processors import enable_memory_efficient_attention

    if impl == "memeff":
        enable_memory_efficient_attention(vae, backend="chunked")  # on the meta device only the chunked path is honest
    else:
        vae.set_attn_processor(make_processor(impl))


def vae_counts():
    vae = sd_vae("meta")
    rows = []
    for size in (512, 1024, 1536):
        for impl in ("naive", "memeff"):
            set_vae_impl(vae, impl)
            z = torch.empty(1, 4, size // 8, size // 8, device="meta")
            with torch.no_grad(), LiveTensorBytes() as m:
                vae.decode(z)
            rows.append((size, impl, m.peak))
    return rows


def vae_real(size, impl):
    """Child process: a real CPU decode; prints peak RSS growth and time."""
    torch.manual_seed(0)
    vae = sd_vae("cpu")
    set_vae_impl(vae, impl)
    z = torch.randn(1, 4, size // 8, size // 8)
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS")
    t = time.perf_counter()
    with torch.no_grad():
        vae.decode(z)
    print(f"RESULT {(status('VmHWM') - before) / GIB:.3f} {time.perf_counter() - t:.1f}", flush=True)


def child(args):
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode:
        print(out.stderr[-2000:], file=sys.stderr)
    return [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("RESULT")]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=("all", "attention", "vae"), default="all")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS), help="square numbers (the VAE input is square)")
    p.add_argument("--_layer")
    p.add_argument("--_vae", nargs=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a._layer:
        return run_layer(a._layer, a.tokens)
    if a._vae:
        return vae_real(int(a._vae[0]), a._vae[1])

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {a.threads} threads, load {os.getloadavg()[0]:.1f}, "
          f"MemAvailable {mem_available() / GIB:.1f} GiB, no GPU")
    if a.part in ("all", "attention"):
        print("\n### One attention call, 1 head, batch 1 (peak MiB above the inputs / seconds)\n")
        print("| layer | tokens | naive MiB | default MiB | memeff MiB | chunked MiB | naive s | default s | memeff s | chunked s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for layer in LAYERS:
            res = {(int(r[1]), r[2]): r[3:] for r in child(["--_layer", layer, "--threads", str(a.threads), "--tokens", *map(str, a.tokens)])}
            for n in a.tokens:
                cells = [res.get((n, i), ["-", "-"]) for i in IMPLS]
                mem = [f"skipped (needs {c[1]} GiB)" if c[0] == "skipped" else c[0] for c in cells]
                sec = ["-" if c[0] == "skipped" else c[1] for c in cells]
                print(f"| {layer} | {n} | " + " | ".join(mem + sec) + " |", flush=True)
    if a.part in ("all", "vae"):
        print("\n### Full-size SD VAE decode of one frame: peak of live tensor bytes (meta-device count, GiB)\n")
        print("| frame | naive (AttnProcessor) | memory-efficient | ratio |")
        print("|---|---|---|---|")
        rows = {(s, i): peak for s, i, peak in vae_counts()}
        for s in (512, 1024, 1536):
            naive, memeff = rows[(s, "naive")], rows[(s, "memeff")]
            print(f"| {s}x{s} | {naive / GIB:.2f} | {memeff / GIB:.2f} | {naive / memeff:.2f}x |", flush=True)
        real = child(["--_vae", "512", "memeff", "--threads", str(a.threads)])
        if real:
            print(f"\ncheck: real CPU decode 512x512 memory-efficient: peak RSS growth {real[0][0]} GiB, {real[0][1]} s "
                  f"(count above: {rows[(512, 'memeff')] / GIB:.2f} GiB of tensors)")


if __name__ == "__main__":
    main()
