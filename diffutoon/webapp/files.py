"""The files of a session handed to the page: uploads kept for the player, a job's result, input and previews,
served only through `file` (the page's private route checks the session's key); the demo clip."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from .. import video as vio
from .jobs import _link_or_copy
from .settings import UIError, safe_name

_UPLOAD_KEY = re.compile(r"u-[0-9a-f]{16}")


class SessionFiles:
    """JobManager's part that hands files to the page (needs: data_dir, session_dir, job, _demo_lock, _serve_dir)."""

    def keep_upload(self, token, path):
        """Keep an upload in the session's folder (the page plays it from there): its key for `file` / `source_path`."""
        key = "u-" + secrets.token_hex(8)
        folder = self.session_dir(token) / "uploads" / key
        folder.mkdir(parents=True)
        _link_or_copy(path, folder / safe_name(Path(path).name))
        return key

    def _folder(self, token, key):
        """The folder of this session's job or kept upload `key`, or None."""
        if isinstance(key, str) and _UPLOAD_KEY.fullmatch(key):
            folder = self.session_dir(token) / "uploads" / key
            return folder if folder.is_dir() else None
        job = self.job(token, key)
        return job.dir if job is not None else None

    def source_path(self, token, source):
        """The video of the form's `source` (key, name): a kept upload or a job's input; None if gone."""
        if not source:
            return None
        key, name = source
        folder = self._folder(token, key)
        path = folder / safe_name(name) if folder is not None else None
        return path if path is not None and path.is_file() else None

    def file(self, token, key, name):
        """A file of this session (a job's result, video, previews; a kept upload) for the page, or None: another
        session's files and paths outside the folder are not there."""
        try:
            folder = self._folder(token, key)
        except UIError:
            return None
        if folder is None or not name:
            return None
        path = (folder / name).resolve()
        if not path.is_relative_to(folder.resolve()) or not path.is_file() or path.name == "job.json":
            return None
        return path

    def live_preview_file(self, job):
        """The pipeline's latest preview (progress "preview": an image or video path) as a file of the job: None
        when it gave none."""
        source = job.live.get("preview")
        if not source or not Path(source).is_file():
            return None
        source = Path(source).resolve()
        if source.is_relative_to(job.dir.resolve()):
            return str(source.relative_to(job.dir.resolve()))
        target = job.dir / "previews" / f"live{source.suffix.lower()}"
        stamp = (str(source), source.stat().st_mtime_ns)
        if job.preview_files.get("live") != stamp:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
            job.preview_files["live"] = stamp
        return f"previews/{target.name}"

    def preview_files(self, job):
        """The job's condition previews as PNG files in its folder: [(file name relative to the job, caption)]."""
        out = []
        for name, (image, caption) in list(job.previews.items()):
            target = job.dir / "previews" / f"{safe_name(name, 'preview')}.png"
            stamp = (id(image), caption)
            if job.preview_files.get(name) != stamp:
                _write_png(target, image)
                job.preview_files[name] = stamp
            out.append((f"previews/{target.name}", caption))
        return out


    def serve_copy(self, path, name=None):
        """A copy of `path` for Gradio to serve to this session only: under the system temp folder (Gradio may
        move files from there into its cache, whose URLs carry a hash of the content and a secret seed), never the
        data folder itself, which is not in Gradio's allowed_paths and so never served by its path."""
        path = Path(path)
        self._prune_served()
        target = self._serve_dir / secrets.token_hex(16) / safe_name(name or path.name)
        target.parent.mkdir(parents=True)
        _link_or_copy(path, target)
        return str(target)

    def _prune_served(self, age=3600):
        limit = time.time() - age
        for sub in self._serve_dir.glob("*/") if self._serve_dir.is_dir() else []:
            try:
                if sub.stat().st_mtime < limit:
                    shutil.rmtree(sub, ignore_errors=True)
            except OSError:
                pass

    def demo_clip(self):
        """The bundled demo clip (a photograph with a moving camera and a tone), made on first use."""
        path = self.data_dir / "demo-clip.mp4"
        with self._demo_lock:
            if not path.is_file():
                vio.make_demo_clip(path, num_frames=16, height=128, width=128, fps=8, overwrite=True)
        return path



def _write_png(path, image):
    """A small PNG, written to a temporary name and renamed: the page never reads half a file."""
    import PIL.Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    PIL.Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")
    os.replace(tmp, path)
