"""Scene cuts (issue 19): each shot of a video renders on its own.

A cut is the index of the first frame of a new shot. With cuts, the sliding windows of eq. 2 are made per shot
(`shot_windows` in pipeline_diffutoon.py), so no window spans a cut and each shot's last window ends at the shot's
end, as the video's last window does without cuts; FastBlend (the editing branch, painted keyframes) runs per shot.

`"auto"` finds hard cuts with PySceneDetect's content detector (HSV change between consecutive frames, its
defaults: threshold 27, at least 15 frames per shot), fed a chunk of frames at a time: the video is never held
whole. Only the standard library and numpy are imported at load time; scenedetect when detecting.
"""

from __future__ import annotations

import importlib

import numpy as np

THRESHOLD, MIN_SCENE_LEN = 27.0, 15  # scenedetect's ContentDetector defaults
INSTALL = "pip install scenedetect-headless"


def check_cuts(cuts, num_frames: int, name: str = "scene_cuts") -> list[int]:
    """A list of cut frame indices as sorted unique ints in 1..num_frames-1, or one ValueError saying what to change."""
    try:
        values = [int(c) for c in cuts]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 'auto', None or a list of frame indices (the first frame of each new "
                         f"shot), got {cuts!r}.") from None
    if any(v != c for v, c in zip(values, cuts)):
        raise ValueError(f"{name} must hold whole frame indices, got {list(cuts)!r}.")
    bad = [v for v in values if not 0 < v < num_frames]
    if bad:
        raise ValueError(f"{name} {bad} outside 1..{num_frames - 1}: a cut is the first frame of a new shot inside "
                         f"the video's {num_frames} frames.")
    return sorted(set(values))


def shots(num_frames: int, cuts) -> list[tuple[int, int]]:
    """The shots [start, end) between the cuts.

    >>> shots(10, [4, 7])
    [(0, 4), (4, 7), (7, 10)]
    """
    bounds = [0, *(cuts or []), num_frames]
    return list(zip(bounds[:-1], bounds[1:]))


def scenedetect():
    """The scenedetect module, or one ImportError saying how to install it."""
    try:
        return importlib.import_module("scenedetect")
    except ModuleNotFoundError as error:
        if error.name != "scenedetect":
            raise
        raise ImportError(f"scene_cuts='auto' needs PySceneDetect, which is not installed: {INSTALL}.") from None


def detect_cuts(read, num_frames: int, threshold: float = THRESHOLD, min_scene_len: int = MIN_SCENE_LEN,
                chunk: int = 16, progress=None) -> list[int]:
    """Hard cuts of a video by PySceneDetect's ContentDetector: the first frame of every shot after the first.

    `read(start, end)` returns uint8 RGB frames (n, H, W, 3); frames are read `chunk` at a time and, as
    scenedetect's SceneManager does, downscaled to about 256 pixels wide before scoring. `progress(done)` hears of
    each chunk."""
    sd, cv2 = scenedetect(), importlib.import_module("cv2")
    detector = sd.ContentDetector(threshold=threshold, min_scene_len=min_scene_len)
    factor = sd.scene_manager.compute_downscale_factor
    cuts, timecode = [], None
    for start in range(0, num_frames, chunk):
        frames = np.asarray(read(start, min(start + chunk, num_frames)))
        scale = factor(frames.shape[2])
        for i, frame in enumerate(frames):
            bgr = np.ascontiguousarray(frame[..., ::-1])  # scenedetect scores OpenCV's BGR frames
            if scale > 1:
                size = (max(1, round(bgr.shape[1] / scale)), max(1, round(bgr.shape[0] / scale)))
                bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_LINEAR)
            timecode = sd.FrameTimecode(start + i, fps=30.0)  # the rate only converts lengths given in seconds
            cuts += [c.frame_num for c in detector.process_frame(timecode, bgr)]
        if progress is not None:
            progress(min(start + chunk, num_frames))
    if timecode is not None:
        cuts += [c.frame_num for c in detector.post_process(timecode)]
    return sorted({c for c in cuts if 0 < c < num_frames})


def resolve(scene_cuts, read, num_frames: int, progress=None) -> list[int] | None:
    """`scene_cuts` as a cut list: None stays None (no shots: today's render), "auto" is detected, a list checked."""
    if scene_cuts is None:
        return None
    if isinstance(scene_cuts, str):
        if scene_cuts.lower() != "auto":
            raise ValueError(f"scene_cuts must be 'auto', None or a list of frame indices, got {scene_cuts!r}.")
        return detect_cuts(read, num_frames, progress=progress)
    return check_cuts(scene_cuts, num_frames)


def parse_cli(text: str):
    """--scene-cuts: "auto", "none", or comma-separated frame numbers / seconds ("12,340" or "2.5s,14s")."""
    text = text.strip().lower()
    if text in ("auto", "none"):
        return text
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            out.append(("s", float(part[:-1])) if part.endswith("s") else ("f", int(part)))
        except ValueError:
            raise ValueError(f"--scene-cuts: expected auto, none or frame numbers / times like 12,340 or 2.5s, "
                             f"got {text!r}") from None
        if out[-1][1] < 0:
            raise ValueError(f"--scene-cuts: {part} is negative")
    return out
