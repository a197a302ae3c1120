"""Command line: python -m fastblend {blend,interpolate} ...

  python -m fastblend blend --guide input.mp4 --style rendered/ --output out.mp4 --mode fast --window 15
  python -m fastblend interpolate --guide input.mp4 --keyframes keys/ --output out/

A video is any file OpenCV can read; a frame folder holds images read in name order (for
interpolate, keyframe file names carry the frame index as their last number, e.g. 00042.png).
Output: a folder (written as %05d.png) or a video file (.mp4/.avi, at --fps).
"""

import argparse
import os
import re
import sys

import numpy as np
from PIL import Image

from .api import interpolate_video, smooth_video

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def _image_files(folder):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXT))


def read_frames(path):
    """uint8 RGB frames (list of (H, W, 3) arrays) of a video file or a frame folder."""
    if os.path.isdir(path):
        return [np.asarray(Image.open(f).convert("RGB")) for f in _image_files(path)]
    import cv2

    cap, frames = cv2.VideoCapture(path), []
    ok, frame = cap.read()
    while ok:
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        ok, frame = cap.read()
    cap.release()
    if not frames:
        raise SystemExit(f"could not read any frame from {path}")
    return frames


def write_frames(frames, path, fps):
    if os.path.splitext(path)[1].lower() in (".mp4", ".avi", ".mov", ".mkv"):
        import cv2

        h, w = frames[0].shape[:2]
        out = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
        for f in frames:
            out.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        out.release()
    else:
        os.makedirs(path, exist_ok=True)
        for i, f in enumerate(frames):
            Image.fromarray(f).save(os.path.join(path, "%05d.png" % i))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastblend", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--guide", required=True, help="original video or frame folder")
    common.add_argument("--output", required=True, help="output folder or video file")
    common.add_argument("--batch-size", type=int, default=8)
    common.add_argument("--num-iter", type=int, default=5)
    common.add_argument("--guide-weight", type=float, default=10.0)
    common.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA if present)")
    common.add_argument("--fps", type=float, default=30.0, help="frame rate of a video output")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    b = sub.add_parser("blend", parents=[common], help="deflicker a stylised video")
    b.add_argument("--style", required=True, help="stylised (flickering) video or frame folder")
    b.add_argument("--mode", default="fast", choices=["fast", "balanced", "accurate"])
    b.add_argument("--window", type=int, default=15, help="window size W: blend frames t-W..t+W")
    b.add_argument("--minimum-patch-size", type=int, default=5)
    i = sub.add_parser("interpolate", parents=[common], help="render a video from a few keyframes")
    i.add_argument("--keyframes", required=True, help="folder of keyframes named by frame index")
    i.add_argument("--minimum-patch-size", type=int, default=15)
    i.add_argument("--tracking-window", type=int, default=0)
    a = p.parse_args(argv)
    guide = read_frames(a.guide)
    kw = dict(batch_size=a.batch_size, minimum_patch_size=a.minimum_patch_size, num_iter=a.num_iter,
              guide_weight=a.guide_weight, device=a.device, seed=a.seed, num_threads=a.threads)
    try:
        if a.command == "blend":
            style = read_frames(a.style)
            out = smooth_video(style, guide, mode=a.mode, window_size=a.window, **kw)
        else:
            keys = {}
            for f in _image_files(a.keyframes):
                numbers = re.findall(r"\d+", os.path.basename(f))
                if not numbers:
                    raise ValueError(f"keyframe file name without a frame index: {f}")
                keys[int(numbers[-1])] = np.asarray(Image.open(f).convert("RGB"))
            out = interpolate_video(guide, keys, tracking_window_size=a.tracking_window, **kw)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_frames(out, a.output, a.fps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
