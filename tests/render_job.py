"""One render into a render folder, in a process of its own, for tests/test_render_folder.py: it can kill itself with
SIGKILL in the middle of a step, or write slowly so that the test can kill it while it writes a checkpoint.

    python tests/render_job.py RENDER_DIR --out frames.npy [--edit] [--kill PASS STEP WINDOW] [--slow-writes]
                               [--fast PRESET STEPS]
"""

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_video  # noqa: E402

N, SIZE = 9, 32


def build():
    """The tiny pipeline with the editing branch's ControlNets (the same models for every job)."""
    from diffutoon.tiny import build_tiny_pipeline

    torch.set_num_threads(1)
    pipe = build_tiny_pipeline(seed=0, edit=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def job(edit: bool = False, **overrides) -> dict:
    """The render's arguments: tiny, 3 steps, three windows, the annotator and (with `edit`) the editing branch."""
    from diffutoon.tiny import tiny_depth_detector, tiny_lineart_detector, tiny_softedge_detector

    kwargs = dict(video=make_video(N, SIZE), prompt="a girl dancing", negative_prompt="bad", num_inference_steps=3,
                  context_length=4, context_stride=3, lineart_detector=tiny_lineart_detector(), output_type="np",
                  generator=torch.Generator().manual_seed(0))
    if edit:
        kwargs.update(edit_prompt="orange dress", edit_kwargs=dict(
            height=SIZE, width=SIZE, num_inference_steps=3, context_length=4, context_stride=2,
            detectors={"softedge": tiny_softedge_detector(), "depth": tiny_depth_detector},
            fastblend=dict(window_size=2, num_iter=1)))
    kwargs.update(overrides)
    return kwargs


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("render_dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--edit", action="store_true")
    parser.add_argument("--kill", nargs=3, metavar=("PASS", "STEP", "WINDOW"), help="SIGKILL after this window")
    parser.add_argument("--slow-writes", action="store_true", help="sleep in every frame-array write")
    parser.add_argument("--fast", nargs=2, metavar=("PRESET", "STEPS"), help="fast_mode and num_inference_steps")
    args = parser.parse_args(argv)
    pipe = build()
    callback = None
    if args.kill:
        where = (args.kill[0], int(args.kill[1]), int(args.kill[2]))

        def callback(progress):
            if (progress.get("pass"), progress.get("step"), progress.get("window")) == where and \
                    progress["stage"] in ("denoising", "edit"):  # the editing branch's denoising is "edit"
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as a crash or a preemption
    if args.slow_writes:
        from diffutoon import render_folder

        write = render_folder.DiskFrames.write

        def slow(self, start, values):
            time.sleep(0.05)
            write(self, start, values)

        render_folder.DiskFrames.write = slow
    fast = dict(fast_mode=args.fast[0], num_inference_steps=int(args.fast[1])) if args.fast else {}
    out = pipe(**job(args.edit, **fast), render_dir=args.render_dir, progress_callback=callback)
    np.save(args.out, out.frames[0])


if __name__ == "__main__":
    main()
