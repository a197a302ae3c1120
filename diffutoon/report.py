"""A quality report at the end of every render (issue 17), from the output and the source alone, no extra model:

- `warping_error`: the output's warping error along the SOURCE's optical flow, as fastblend/metrics.py measures it
  (Lai et al. 2018: DIS flow, occlusion check, MSE on the 0..255 scale over non-occluded pixels, mean over consecutive
  pairs): low means the output moves with the source, high means flicker;
- `seam_score`: the mean warping error of the frame pairs that straddle a sliding-window boundary (a window begins or
  ends between them) over that of the pairs inside the same windows: 1.0 means no visible window seams;
  pairs that straddle a scene cut are left out of both scores (the source's flow means nothing across a cut);
- `pixel_mae`: the mean absolute difference from the source, 0..255 (the paper's Pixel-MSE, Table 2).

`QualityReport` takes the frames a chunk at a time (as the output is written), holding one frame of each video between
chunks; `quality_report` is the same on whole arrays.

    >>> import numpy as np
    >>> video = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    >>> quality_report(video, video, [(0, 3), (1, 4)])["pixel_mae"]
    0.0
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def boundary_pairs(windows: list[tuple[int, int]], num_frames: int) -> list[bool]:
    """For each consecutive pair (i, i + 1): whether a window begins or ends between the two frames."""
    edges = {s for s, _ in windows} | {e for _, e in windows}
    return [i + 1 in edges for i in range(num_frames - 1)]


def pair_warping_error(frame, next_frame, guide_grey, next_guide_grey) -> float:
    """fastblend/metrics.py's warping error of one pair: `frame` warped onto `next_frame` by the guide's backward flow,
    occluded pixels left out; MSE (0..255, channels averaged) over the rest."""
    from fastblend.metrics import _flow, _sample

    bw = _flow(next_guide_grey, guide_grey)  # from t+1 back to t
    fw = _flow(guide_grey, next_guide_grey)
    fw_at = _sample(fw, bw)
    occluded = ((fw_at + bw) ** 2).sum(2) > 0.01 * ((fw_at**2).sum(2) + (bw**2).sum(2)) + 0.5
    warped = _sample(np.asarray(frame, np.float32), bw)
    sq = ((np.asarray(next_frame, np.float32) - warped) ** 2).mean(2)
    valid = ~occluded
    return float(sq[valid].mean()) if valid.any() else 0.0


class QualityReport:
    """Accumulates the report over uint8 (n, H, W, 3) chunks of the output and the source, in frame order."""

    def __init__(self, windows: list[tuple[int, int]], num_frames: int, scene_cuts=()):
        self.straddles = boundary_pairs(windows, num_frames)
        self.kept = [i + 1 not in set(scene_cuts or ()) for i in range(num_frames - 1)]  # pairs not across a cut
        self.errors: list[float] = []
        self.abs_sum, self.values = 0.0, 0
        self._last = None  # (output frame, source grey) of the previous chunk's last frame

    def add(self, frames: np.ndarray, source: np.ndarray):
        import cv2

        frames, source = np.asarray(frames), np.asarray(source)
        self.abs_sum += float(np.abs(frames.astype(np.float64) - source).sum())
        self.values += frames.size
        for frame, src in zip(frames, source):
            grey = cv2.cvtColor(np.ascontiguousarray(src, dtype=np.uint8), cv2.COLOR_RGB2GRAY)
            if self._last is not None:
                self.errors.append(pair_warping_error(self._last[0], frame, self._last[1], grey))
            self._last = (frame, grey)

    def tap(self, chunks, source_chunks):
        """Yield `chunks` unchanged, adding each with its source chunk (an iterator of the same frame counts)."""
        for chunk in chunks:
            self.add(chunk, next(source_chunks))
            yield chunk

    def result(self, folder=None) -> dict:
        """The report; also written (durably) as `folder/report.json` when a folder is given."""
        kept = np.array(self.kept[: len(self.errors)], bool)
        errors = np.array(self.errors)[kept]
        straddles = np.array(self.straddles[: len(kept)], bool)[kept]
        seam = errors[straddles].mean() / errors[~straddles].mean() \
            if straddles.any() and (~straddles).any() and errors[~straddles].mean() > 0 else None
        report = {"warping_error": float(errors.mean()) if len(errors) else None,
                "seam_score": None if seam is None else float(seam),
                "pixel_mae": self.abs_sum / self.values if self.values else None,
                "frames": len(self.errors) + (self._last is not None), "seam_pairs": int(straddles.sum()),
                "inside_pairs": int((~straddles).sum())}
        if folder is not None:
            from diffutoon.render_folder import atomic_write_json

            atomic_write_json(Path(folder) / "report.json", report)
        return report


def quality_report(frames, source, windows, scene_cuts=()) -> dict:
    """The report of whole uint8 videos (N, H, W, 3) rendered with sliding `windows` (and shots cut at `scene_cuts`)."""
    report = QualityReport(windows, len(frames), scene_cuts)
    report.add(frames, source)
    return report.result()


def summary(report: dict) -> str:
    """The CLI's line: 'quality: warping error 12.3, seam score 1.02 (1.0 = no window seams), ...'."""
    def num(v, f):
        return "n/a" if v is None else format(v, f)
    return (f"quality: warping error {num(report.get('warping_error'), '.2f')} along the source's motion, seam score "
            f"{num(report.get('seam_score'), '.3f')} (1.0 = no window seams), mean abs difference from the source "
            f"{num(report.get('pixel_mae'), '.2f')} / 255")
