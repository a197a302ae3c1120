"""Long renders (issue 10): peak host RSS and time vs the number of frames, streaming through a render folder vs
everything in host memory, and what a checkpoint costs per step.

    python bench/bench_longrender.py --frames 100 400 1600 --size 256      # RSS rows, each run in its own process
    python bench/bench_longrender.py --checkpoint --frames 100            # checkpoint cost at 512 and 1536 latents

Tiny random models (diffutoon.tiny), 1 step, windows 16/8, CFG 7, a cheap lineart stand-in (PIL edges; `--annotator
tiny` for the random-weight LineartDetector, much slower at 256 px). "streamed": the video is
a file read lazily (VideoClip), condition frames and latents live in the render folder, frames go straight into an
mp4. "in memory": the same video as a uint8 array, frames returned as a uint8 array (what the pipeline did before).
"streamed, steady": streamed, with glibc's mmap threshold fixed (diffutoon.memory.steady_host_memory), as the
pipeline does before a render on an accelerator; on the CPU it keeps glibc's default (faster there). Anonymous memory
is what a render holds; file-backed pages (the memory-mapped frame arrays) are the kernel's to drop.

    python bench/bench_longrender.py --frames 48 192 768 --size 256 --modes streamed "streamed, steady"
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb(kind: str = "VmRSS") -> float:
    """This process's resident memory (MB): VmRSS, or its anonymous (RssAnon) or file-backed (RssFile) part."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(kind + ":")) / 1024


class PeakSampler:
    """Peaks of the anonymous and the file-backed resident memory, sampled every `every` seconds by a thread: the
    kernel keeps a high-water mark of their sum only (VmHWM). Pages of memory-mapped frame arrays are file-backed:
    the kernel drops them under pressure; anonymous memory is what a render really holds."""

    def __init__(self, every: float = 0.02):
        import threading

        self.every, self.peak = every, {"RssAnon": 0.0, "RssFile": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)

    def sample(self):
        for kind in self.peak:
            self.peak[kind] = max(self.peak[kind], rss_mb(kind))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def _edges(image, detect_resolution=None, image_resolution=None):
    """A cheap stand-in for the lineart annotator (PIL's edge filter): the memory is the point here, not the art."""
    import PIL.ImageFilter

    return image.convert("L").filter(PIL.ImageFilter.FIND_EDGES).convert("RGB")


def one_run(mode: str, frames: int, size: int, source: str, folder: str, annotator: str) -> dict:
    """Runs in its own process: the peak is this process's alone."""
    import torch

    from diffutoon import video as vio
    from diffutoon.tiny import build_tiny_pipeline, tiny_lineart_detector

    torch.set_num_threads(1)
    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    detector = tiny_lineart_detector() if annotator == "tiny" else _edges
    common = dict(prompt="a girl", negative_prompt="bad", num_inference_steps=1, lineart_detector=detector,
                  generator=torch.Generator().manual_seed(0), decode_chunk_size=8)
    clip = vio.VideoClip(source, indices=range(frames))
    if mode == "in memory":
        video = vio.read_frames(clip.reader, clip.indices, progress=False)
    baseline, anon0, file0 = rss_mb(), rss_mb("RssAnon"), rss_mb("RssFile")
    start = time.time()
    with PeakSampler() as sampler:
        if mode.startswith("streamed"):
            if mode == "streamed, steady":  # glibc's mmap threshold fixed as a render on an accelerator starts
                from diffutoon import memory

                memory.steady_host_memory()
            pipe(video=clip, render_dir=folder, output_path=Path(folder).with_suffix(".mp4"), **common)
        else:
            result = vio.to_uint8(pipe(video=video, output_type="np", **common).frames[0])  # what a caller then holds
            assert len(result) == frames
    seconds = time.time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "frames": frames, "size": size, "seconds": round(seconds, 1),
            "rss_after_loading_mb": round(baseline), "peak_rss_mb": round(peak), "growth_mb": round(peak - baseline),
            "anon_growth_mb": round(sampler.peak["RssAnon"] - anon0, 1),
            "file_growth_mb": round(sampler.peak["RssFile"] - file0, 1)}


def rss_table(frame_counts, size, modes, annotator):
    from diffutoon import video as vio

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source.mp4"
        vio.write_video(source, _moving_frames(max(frame_counts), size), fps=25, progress=False)  # streamed in
        for n in frame_counts:
            for mode in modes:
                cmd = [sys.executable, __file__, "--one", mode, str(n), str(size), str(source), str(Path(tmp) / f"r{n}"),
                       annotator]
                out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
                if out.returncode:
                    raise RuntimeError(out.stderr[-2000:])
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| frames | mode | s | RSS after loading MB | peak RSS MB | growth MB | anonymous growth MB | "
          "file-backed growth MB |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['frames']} | {r['mode']} | {r['seconds']} | {r['rss_after_loading_mb']} | {r['peak_rss_mb']} | "
              f"{r['growth_mb']} | {r['anon_growth_mb']} | {r['file_growth_mb']} |")
    return rows


def _moving_frames(n, size):
    """A generator of uint8 frames (a moving pattern): the source video is written without holding it whole."""
    import numpy as np

    y, x = np.mgrid[0:size, 0:size] / size
    for t in range(n):
        phase = 2 * np.pi * t / 50
        frame = np.stack([np.sin(6 * x + phase), np.cos(5 * y - phase), np.sin(4 * (x + y) + 2 * phase)], -1)
        yield ((frame * 0.5 + 0.5) * 255).astype(np.uint8)


def checkpoint_cost(frames: int):
    """One checkpoint (latents written, fsynced, renamed, checksummed, manifest updated) at SD's latent sizes."""
    import numpy as np

    from diffutoon.render_folder import RenderFolder

    print("\n| output size | latents per frame | frames | checkpoint bytes | seconds per checkpoint | MB/s |")
    print("|---|---|---|---|---|---|")
    for side in (512, 1536):
        h = side // 8
        with tempfile.TemporaryDirectory() as tmp:
            run = RenderFolder(Path(tmp) / "r", {"bench": side})
            values = np.random.default_rng(0).standard_normal((frames, 4, h, h), dtype=np.float32)
            times = []
            for step in range(1, 4):
                latents = run.latents("main", step, values.shape)
                start = time.time()
                for i in range(0, frames, 64):
                    latents.write(i, values[i:i + 64])
                run.checkpoint("main", step, latents, {"scheduler": None, "generator": None})
                times.append(time.time() - start)
            run.close(success=True)
        nbytes = values.nbytes
        best = min(times)
        print(f"| {side}x{side} | 4x{h}x{h} float32 | {frames} | {nbytes / 2**20:.1f} MiB | {best:.2f} | "
              f"{nbytes / 2**20 / best:.0f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[100, 400, 1600])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--modes", nargs="+", default=["streamed", "in memory"],
                        choices=["streamed", "streamed, steady", "in memory"],
                        help="'streamed, steady': streamed with glibc's mmap threshold fixed "
                             "(diffutoon.memory.steady_host_memory), as the pipeline does on an accelerator")
    parser.add_argument("--checkpoint", action="store_true", help="measure the checkpoint cost instead")
    parser.add_argument("--annotator", choices=("edges", "tiny"), default="edges",
                        help="lineart stand-in: PIL edges (fast, default) or the tiny random LineartDetector")
    parser.add_argument("--one", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        mode, n, size, source, folder, annotator = args.one
        print(json.dumps(one_run(mode, int(n), int(size), source, folder, annotator)))
    elif args.checkpoint:
        checkpoint_cost(args.frames[0])
    else:
        rss_table(args.frames, args.size, args.modes, args.annotator)


if __name__ == "__main__":
    main()
