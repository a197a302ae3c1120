"""One render of one browser session: its folder (upload, style files, render folder, result) and its job.json,
written durably so that a restarted app finds it; and what an upload is (VideoInfo)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .settings import Settings, _megabytes

TERMINAL = ("done", "failed", "cancelled")
ACTIVE = ("queued", "running", "cancelling")
_WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_TOKEN = re.compile(r"[A-Za-z0-9_-]{32,64}")
_JOB_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")


# ---------------------------------------------------------------------------------------------- jobs
_PERSISTED = ("id", "session", "input_name", "settings", "loras", "embeddings", "status", "created", "started",
              "finished", "message", "output", "progress", "note", "resumable", "attempts", "estimate", "fraction",
              "live")


@dataclass
class Job:
    id: str
    session: str
    dir: Path
    input_name: str
    settings: dict
    loras: list = field(default_factory=list)  # file names under loras/
    embeddings: list = field(default_factory=list)  # [file name under embeddings/, token]
    status: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    message: str = ""
    output: str | None = None  # file name in dir
    progress: dict = field(default_factory=dict)
    note: str = ""
    resumable: bool = False
    attempts: int = 0
    estimate: float | None = None  # seconds the main pass was estimated to take here (the queue's time estimates)
    fraction: float = 0.0  # the overall bar; kept, so that it never moves backwards on Resume
    # runtime only
    version: int = 0
    events: int = 0
    cancel_requested: bool = False
    previews: dict = field(default_factory=dict)
    preview_version: int = 0
    preview_files: dict = field(default_factory=dict)
    live: dict = field(default_factory=dict)  # the pipeline's preview / memory plan / report / cuts (LIVE_KEYS)

    @property
    def input_path(self):
        return self.dir / self.input_name

    @property
    def output_path(self):
        return self.dir / self.output if self.output else None

    @property
    def render_dir(self):
        return self.dir / "render"

    def settings_obj(self):
        return Settings(**self.settings)

    def set_preview(self, name, image, caption):
        self.previews[name] = (image, caption)
        self.preview_version += 1

    def save(self):
        data = {k: getattr(self, k) for k in _PERSISTED}
        tmp = self.dir / f".job.json.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / "job.json")

    @classmethod
    def load(cls, folder):
        data = json.loads((Path(folder) / "job.json").read_text())
        return cls(dir=Path(folder), **{k: data[k] for k in _PERSISTED if k in data})


@dataclass
class VideoInfo:
    name: str
    fps: float
    num_frames: int
    width: int
    height: int
    has_audio: bool
    size: int

    @property
    def duration(self):
        return self.num_frames / self.fps

    def describe(self):
        return (f"{self.name}: {self.duration:.1f} s, {self.fps:g} fps, {self.num_frames} frames, "
                f"{self.width}x{self.height}, {'with' if self.has_audio else 'no'} sound, {_megabytes(self.size)}")

    def selection(self, start=0.0, end=None, every_nth=1):
        """Frames selected by Start/End (seconds) and every n-th, as `diffutoon render` selects them."""
        first = int(round((start or 0) * self.fps))
        stop = self.num_frames if not end else min(int(round(end * self.fps)), self.num_frames)
        n = max(0, -(-(stop - first) // max(1, int(every_nth or 1))))
        return n


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
