"""The jobs of every session: checks, the queue with one worker per accelerator, Cancel / Resume, persistence and
recovery after a restart, and the files handed to the page.

Integration points with the pipeline's long-render API (CONTRACT.md), each used only when the pipeline has it:

    PipelineFeatures.of(pipe)   which of render_dir / progress_callback / output_path (+ diffutoon.video.VideoClip)
                                the pipeline offers, read from inspect.signature(pipe.__call__)
    ProgressAdapter.callback    progress_callback=: the contract's progress dict, shown as is
    ProgressAdapter.on_step_end, ProgressAdapter.tracking_bars
                                the fallback: callback_on_step_end + the totals and counts of the pipeline's own tqdm bars
    JobManager._call_pipeline   render_dir=, output_path=, fps=, video=VideoClip(...) when available, else frames
    read_condition_previews     <render_dir>/conditions/<i>-<kind>.npy + .done, <render_dir>/edit/colors.npy
    JobManager.cancel           pipe._interrupt = True from the request's thread: stops at the next window
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .. import cli
from .. import video as vio
from .jobs import _JOB_ID, _TOKEN, _WEIGHT_SUFFIXES, ACTIVE, TERMINAL, Job, VideoInfo, _link_or_copy
from .loading import PipelineFeatures, _windows, pipeline_kwargs
from .estimate import Estimator
from .progress import COLOR_CAPTION, ProgressAdapter, _Cancelled, thumbnail
from .settings import (UIError, _duration, default_limits, one_line, open_input, page_defaults, parse_render_args,
                       safe_name)


_UPLOAD_KEY = re.compile(r"u-[0-9a-f]{16}")


class TooLong(UIError):
    """A render estimated far beyond what this device does in reasonable time; pressing Render again confirms it."""

class JobManager:
    """Jobs of every session: checks, queue, workers (one per accelerator), persistence and resumption."""

    def __init__(self, models, data_dir, limits=None, defaults=None, keep_days=7.0, log=None):
        self.models = models
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.limits = limits or default_limits(models.kind, models.accelerator)
        self.defaults = defaults or page_defaults(models.kind, models.accelerator)
        self.keep_days = keep_days
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "sessions").mkdir(exist_ok=True)
        self.secret = self._secret("secret")  # private: session folders are hashes of it and the browser's key
        self.browser_key = self._secret("browser-key")  # sent to every browser (gr.BrowserState's encryption)
        self._cond = threading.Condition()
        self._jobs = {}
        self._pending = []
        self._threads = []
        self._stopping = False
        self._serve_dir = Path(tempfile.mkdtemp(prefix="diffutoon-ui-serve-"))
        self._demo_lock = threading.Lock()
        self.estimator = None  # estimate.Estimator of the first slot's pipeline, built at start
        self._estimated = threading.Event()
        self.observers = []  # fn(job) after every progress event, in the worker's thread (logs, tests)

    @property
    def resumable(self):
        """Whether the pipeline keeps a render's state in its folder (render_dir) and so can continue one."""
        return PipelineFeatures.of(self.models.slots[0].pipe).resumable

    # -- lifecycle
    def start(self):
        self._prune()
        self.recover()
        threading.Thread(target=self._build_estimator, name="diffutoon-estimate", daemon=True).start()
        for slot in self.models.slots:
            t = threading.Thread(target=self._worker, args=(slot,), name=f"diffutoon-render-{slot.device}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _build_estimator(self):
        """The time estimates' rate is measured on the pipeline itself, before any render uses it."""
        try:
            slot = self.models.slots[0]
            self.estimator = Estimator(slot.pipe, slot.device)
        finally:
            self._estimated.set()

    def estimate(self, settings, frames, height, width):
        """Seconds the main pass of a render is likely to take on this app's device (None: unknown)."""
        if self._threads:  # started: the estimator is being built (a manager never started has none)
            self._estimated.wait(120)
        if self.estimator is None:
            return None
        return self.estimator.seconds(frames, height, width, settings.steps, settings.context_length,
                                      settings.context_stride)

    def stop(self, timeout=5):
        with self._cond:
            self._stopping = True
            for slot in self.models.slots:
                if slot.job is not None:  # back in line at the next start; its render folder resumes it
                    slot.pipe._interrupt = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)
        shutil.rmtree(self._serve_dir, ignore_errors=True)

    def _secret(self, name):
        """A random value kept in the data folder, so that sessions survive a restart of the app."""
        path = self.data_dir / name
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
        return path.read_text().strip()

    # -- sessions
    @staticmethod
    def new_token():
        return secrets.token_urlsafe(32)

    def check_token(self, token):
        """The browser's session token, or a new one where it has none (or not one of ours)."""
        return token if isinstance(token, str) and _TOKEN.fullmatch(token) else self.new_token()

    def session_id(self, token):
        import hashlib

        if not (isinstance(token, str) and _TOKEN.fullmatch(token)):
            raise UIError("this page has no session; reload it")
        return hashlib.sha256(f"{self.secret}:{token}".encode()).hexdigest()[:32]

    def session_dir(self, token):
        return self.data_dir / "sessions" / self.session_id(token)

    def job(self, token, job_id):
        """The job if this session made it, else None: a session never sees another's jobs."""
        if not job_id or not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
            return None
        sid = self.session_id(token)
        with self._cond:
            job = self._jobs.get(job_id)
        if job is None:
            folder = self.data_dir / "sessions" / sid / job_id
            if (folder / "job.json").is_file():
                job = self._register(Job.load(folder))
        return job if job is not None and job.session == sid else None

    def jobs(self, token):
        sid = self.session_id(token)
        folder = self.data_dir / "sessions" / sid
        for sub in sorted(folder.iterdir()) if folder.is_dir() else []:
            if (sub / "job.json").is_file():
                self.job(token, sub.name)
        with self._cond:
            return sorted((j for j in self._jobs.values() if j.session == sid), key=lambda j: j.created)

    def latest(self, token):
        jobs = self.jobs(token)
        return jobs[-1] if jobs else None

    def _register(self, job):
        with self._cond:
            return self._jobs.setdefault(job.id, job)

    # -- inspection and submission
    def inspect(self, path, name=None):
        """Size, length and format checks of an upload, its first and last frames decoded: VideoInfo or UIError."""
        if not path:
            raise UIError("upload a video, or press \u201cUse the demo clip\u201d")
        path = Path(path)
        name = safe_name(name or path.name)
        self.limits.check_size(path, name)
        try:
            reader = vio.VideoReader(path)
            reader.read([0, reader.num_frames - 1])
        except (vio.VideoError, OSError) as e:
            raise UIError(one_line(e, {path: name})) from e
        self.limits.check_length(reader, name)
        return VideoInfo(name, reader.fps, reader.num_frames, reader.width, reader.height, reader.has_audio,
                         path.stat().st_size)

    def check(self, input_path, name, settings):
        """The checks of `diffutoon render`, with its messages: (args, reader, indices, (height, width))."""
        input_path = Path(input_path)
        self.limits.check_size(input_path, name)
        args = parse_render_args(settings.argv(input_path))
        reader, indices = open_input(args, name)
        self.limits.check_length(reader, name)
        selected = len(reader.frame_indices(indices[0], cli._frame(args.end, reader.fps), 1, None))
        self.limits.check_every_nth(selected, args.every_nth, reader.fps)
        self.limits.check_frames(len(indices))
        try:
            size = cli._check_sizes(args, reader)
        except (cli.CLIError, ValueError) as e:
            raise UIError(one_line(e)) from e
        if args.edit_prompt and not self.models.has_edit:
            raise UIError("the editing prompt needs the editing ControlNets (softedge, depth), which this app could "
                          "not load: leave Editing prompt empty")
        return args, reader, indices, size

    def submit(self, token, upload, settings, loras=(), embeddings=(), confirmed=False):
        """Check a render request and queue it as a job of this session; UIError with a one-line message.
        A render estimated far beyond what this device does in reasonable time raises TooLong unless `confirmed`."""
        sid = self.session_id(token)
        if not upload:
            raise UIError("upload a video, or press \u201cUse the demo clip\u201d")
        upload = Path(upload)
        name = safe_name(upload.name)
        files = [("LoRA", Path(p)) for p in loras or []] + [("Textual inversion", Path(p)) for p in embeddings or []]
        for what, path in files:
            if path.suffix.lower() not in _WEIGHT_SUFFIXES:
                raise UIError(f"{what} {safe_name(path.name)}: not a weights file ({', '.join(_WEIGHT_SUFFIXES)})")
        args, reader, indices, (height, width) = self.check(upload, name, settings)
        with self._cond:
            active = [j for j in self._jobs.values() if j.session == sid and j.status in ACTIVE]
        if active:
            raise UIError("you already have a render in line or running: wait for it, or cancel it first")
        estimate = self.estimate(settings, len(indices), height, width)
        if estimate and estimate > self.limits.warn_seconds and not confirmed:
            device = self.models.slots[0].device
            raise TooLong(f"This render would take about {_duration(estimate)} on this app's {device} (an estimate "
                          f"from its work: {len(indices)} frames of {width}x{height}, {settings.steps} steps): choose a "
                          "smaller Width/Height, fewer frames or Steps, or press Render again to start it anyway")
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        folder = self.data_dir / "sessions" / sid / job_id
        (folder / "loras").mkdir(parents=True)
        (folder / "embeddings").mkdir()
        _link_or_copy(upload, folder / name)
        lora_names, embedding_names = [], []
        for what, path in files:
            sub, names = ("loras", lora_names) if what == "LoRA" else ("embeddings", embedding_names)
            target = folder / sub / f"{len(names)}-{safe_name(path.name, 'weights.safetensors')}"
            _link_or_copy(path, target)
            names.append(target.name)
        job = Job(job_id, sid, folder, name, asdict(settings), lora_names,
                  [[n, safe_name(Path(n).stem.partition("-")[2] or "embedding")] for n in embedding_names],
                  resumable=self.resumable, estimate=estimate)
        _write_png(folder / "thumb.png", thumbnail(vio.resize_frames(reader.read([indices[0]]), height, width,
                                                                     "crop" if args.resize == "short_side"
                                                                     else args.resize)[0], 160))
        job.save()
        self._register(job)
        self._enqueue(job)
        return job

    def _enqueue(self, job, note=""):
        with self._cond:
            job.status, job.note, job.cancel_requested = "queued", note, False
            # a resumed render continues from its folder: its bar stays where it was, never moving backwards
            job.progress, job.message, job.fraction = {}, "", job.fraction if job.resumable else 0.0
            job.previews, job.live = {}, {}
            job.preview_version += 1
            self._pending.append(job)
            job.save()
            self._changed_locked(job, everyone=True)
            self._cond.notify_all()

    def place(self, job):
        """(place in line from 1, renders running now), or (0, running) once it runs."""
        with self._cond:
            running = sum(1 for s in self.models.slots if s.job is not None)
            return (self._pending.index(job) + 1 if job in self._pending else 0), running

    def wait_seconds(self, job):
        """About how long a queued job waits: what the renders running now have left, then those ahead of it in line
        (their estimates), shared among the accelerators. None while unknown."""
        with self._cond:
            if job not in self._pending:
                return None
            ahead = self._pending[:self._pending.index(job)]
            running = [s.job for s in self.models.slots if s.job is not None]
        left = [(j.progress or {}).get("eta_seconds") or (j.estimate or 0) * (1 - j.fraction) for j in running]
        total = sum(left) + sum(j.estimate or 0 for j in ahead)
        return total / len(self.models.slots) if total else None

    def delete(self, token, job_id):
        """Remove a finished job of this session and its folder (upload, result, previews): its URLs answer 404."""
        job = self.job(token, job_id)
        if job is None:
            raise UIError("no such render in this session")
        if job.status in ACTIVE:
            raise UIError("this render is in line or running: cancel it first")
        with self._cond:
            self._jobs.pop(job.id, None)
        shutil.rmtree(job.dir, ignore_errors=True)

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

    def cancel(self, token, job_id):
        """Stop a job: out of the line if waiting, else at the pipeline's next window (its folder is kept)."""
        job = self.job(token, job_id)
        if job is None:
            raise UIError("no such render in this session")
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                job.status, job.message = "cancelled", "Cancelled before it started."
                job.finished = time.time()
                job.save()
                self._changed_locked(job, everyone=True)
                return job
            if job.status in ("running", "cancelling"):
                job.cancel_requested = True
                job.status = "cancelling"
                for slot in self.models.slots:
                    if slot.job is job:
                        slot.pipe._interrupt = True  # diffusers' flag: the pipeline stops at its next window
                self._changed_locked(job)
        return job

    def resume(self, token, job_id):
        """Queue a cancelled or failed job again: with a render folder it continues where it stopped."""
        job = self.job(token, job_id)
        if job is None:
            raise UIError("no such render in this session")
        if job.status not in ("cancelled", "failed"):
            raise UIError("this render is not stopped")
        sid = self.session_id(token)
        with self._cond:
            if any(j.session == sid and j.status in ACTIVE for j in self._jobs.values()):
                raise UIError("you already have a render in line or running: wait for it, or cancel it first")
        if not job.input_path.is_file():
            raise UIError("the video of this render is gone: upload it again")
        self._enqueue(job, note="resumed" if job.resumable else "started again")
        return job

    def recover(self):
        """At start: queue again the jobs a previous run of the app left waiting or running."""
        found = []
        for folder in (self.data_dir / "sessions").glob("*/*/"):
            try:
                job = Job.load(folder)
            except (OSError, ValueError, TypeError):
                continue
            if job.status in ACTIVE:
                found.append(job)
        for job in sorted(found, key=lambda j: j.created):
            if job.status == "cancelling":
                job.status, job.message = "cancelled", "Cancelled."
                job.save()
                self._register(job)
                continue
            job.resumable = self.resumable
            self._register(job)
            self._enqueue(job, note="resumed after a restart of the app" if job.resumable
                          else "started again after a restart of the app")
            self.log(f"queued again after a restart: {job.id}")
        return found

    def _prune(self, every=3600):
        """Remove finished jobs older than keep_days (their folders, uploads and results): at start, then at most
        once an hour after a render."""
        if time.time() - getattr(self, "_pruned_at", 0) < every:
            return
        self._pruned_at = time.time()
        limit = time.time() - self.keep_days * 86400
        for folder in (self.data_dir / "sessions").glob("*/*/"):
            try:
                job = Job.load(folder)
            except (OSError, ValueError, TypeError):
                continue
            if job.status in TERMINAL and (job.finished or job.created) < limit:
                shutil.rmtree(folder, ignore_errors=True)
        for folder in (self.data_dir / "sessions").glob("*/uploads/u-*/"):  # uploads kept for the page's player
            with contextlib.suppress(OSError):
                if folder.stat().st_mtime < limit:
                    shutil.rmtree(folder, ignore_errors=True)

    # -- change notification (watchers compare versions)
    def _changed_locked(self, job, everyone=False):
        job.version += 1
        if everyone:  # places in line moved
            for other in self._pending:
                other.version += 1
        self._cond.notify_all()

    def _touch(self, job):
        with self._cond:
            self._changed_locked(job)
        for fn in list(self.observers):
            fn(job)

    def wait(self, job, timeout=None):
        """Block until the job has ended (done, failed, cancelled); returns its status."""
        deadline = None if timeout is None else time.time() + timeout
        with self._cond:
            while job.status not in TERMINAL:
                left = None if deadline is None else deadline - time.time()
                if left is not None and left <= 0:
                    raise TimeoutError(f"job {job.id} still {job.status} after {timeout} s")
                self._cond.wait(left)
        return job.status

    # -- files handed to the page
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

    # -- the worker
    def _worker(self, slot):
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._pending.pop(0)
                slot.job = job
                job.status, job.started, job.finished = "running", time.time(), None
                job.attempts += 1
                job.save()
                self._changed_locked(job, everyone=True)
            try:
                self._run(slot, job)
                status, message = "done", ""
            except _Cancelled:
                status, message = "cancelled", self._cancel_message(job)
            except UIError as e:
                status, message = "failed", str(e)
            except Exception as e:  # a render that fails never stops the app
                status, message = "failed", one_line(e, {job.input_path: job.input_name, job.dir: "the job's folder"})
                self.log(f"render {job.id} failed: {cli._one_line(e)}")
            finally:
                slot.pipe._interrupt = False
            with self._cond:
                slot.job = None
                if self._stopping and status == "cancelled" and not job.cancel_requested:
                    job.status = "queued"  # the app is stopping: the job is resumed at its next start
                else:
                    job.status, job.message, job.finished = status, message, time.time()
                    if status == "done":
                        job.progress = {**job.progress, "stage": "done", "eta_seconds": 0}
                        job.fraction = 1.0
                job.save()
                self._changed_locked(job, everyone=True)
            self._prune()

    def _cancel_message(self, job):
        p = job.progress or {}
        where = ""
        if p.get("stage") in ("denoising", "edit", "interrupted") and p.get("steps"):
            where = f" at step {min(p.get('step', 0) + 1, p['steps'])} of {p['steps']}"
            if p.get("pass") == "edit":
                where += " of the editing branch"
        if job.resumable:
            return (f"Cancelled{where}. Its render folder is kept: Resume continues from the last completed step.")
        return (f"Cancelled{where}. This version of the pipeline cannot continue a render: Resume starts it again "
                "from the beginning.")

    def _run(self, slot, job):
        pipe = slot.pipe
        settings = job.settings_obj()
        args, reader, indices, (height, width) = self.check(job.input_path, job.input_name, settings)
        features = PipelineFeatures.of(pipe)
        n = len(indices)
        adapter = ProgressAdapter(job, pipe, self._touch, n, _windows(pipe, n, args.context_length, args.context_stride),
                                  _windows(pipe, n, *_edit_window_defaults(pipe)),
                                  job.render_dir if features.render_dir else None)
        if job.cancel_requested:
            raise _Cancelled()
        fps = reader.fps / args.every_nth
        audio = reader.path if reader.has_audio else None
        span = reader.span(indices, args.every_nth)
        out = job.dir / "result.mp4"
        edit_extra = {"detectors": slot.edit_detectors} if slot.edit_detectors else None
        kwargs = pipeline_kwargs(args, height, width, adapter.recording(slot.detector), edit_extra)
        pipe._interrupt = False
        with self._style_files(pipe, job, settings.lora_scale), cancel_hooks(pipe, job):
            result = self._call_pipeline(pipe, features, adapter, kwargs, reader, indices, args, height, width, out,
                                         fps, job)
        if result is not None:  # frames: write them at the source's timing with its sound
            adapter.stage("writing", 0, 1)
            vio.write_video(out, result, fps, audio_from=audio, audio_span=span, overwrite=True, progress=False)
        if not out.is_file():
            raise UIError("the render finished without writing its video")
        job.output = out.name
        adapter.stage("done", 1, 1)

    def _call_pipeline(self, pipe, features, adapter, kwargs, reader, indices, args, height, width, out, fps, job):
        """One pipeline call; returns uint8 frames to write, or None when the pipeline wrote `out` itself."""
        if features.render_dir:
            kwargs["render_dir"] = str(job.render_dir)
        if features.progress_callback:
            kwargs["progress_callback"] = adapter.callback
        if features.streams_output:  # the pipeline reads, renders and writes (with the source's audio) itself
            out.unlink(missing_ok=True)
            kwargs["video"] = vio.VideoClip(reader.path, indices=indices, height=height, width=width,
                                            policy="crop" if args.resize == "short_side" else args.resize)
            kwargs.update(output_path=str(out), fps=fps)
        else:
            kwargs["video"] = self._read(reader, indices, height, width, args.resize, adapter)
            if not (kwargs["video"].size and len(kwargs["video"])):
                raise UIError("no frames selected")
            if not args.edit_prompt:  # without the editing branch the tile ControlNet sees the video itself
                adapter.set_preview("tile", kwargs["video"][0], "Colour (the video)")
        if not features.progress_callback:
            kwargs["callback_on_step_end"] = adapter.on_step_end
        with adapter.tracking_bars() if not features.progress_callback else contextlib.nullcontext():
            output = pipe(**kwargs)
        if getattr(output, "interrupted", False) or job.cancel_requested or self._stopping:
            raise _Cancelled()  # the render folder stays; diffusers' "decode the last step" result is dropped
        colors = getattr(output, "color_frames", None)
        if colors is not None and len(colors):
            colors = vio.to_uint8(colors)
            adapter.set_preview("colors", colors[len(colors) // 2], COLOR_CAPTION)
        if features.streams_output and getattr(output, "frames", None) is None:
            return None
        return vio.to_uint8(output.frames[0])

    def _read(self, reader, indices, height, width, policy, adapter):
        frames = np.empty((len(indices), height, width, 3), np.uint8)
        i = 0
        adapter.stage("reading", 0, len(indices))
        for chunk in reader.iter_chunks(indices):
            frames[i:i + len(chunk)] = vio.resize_frames(chunk, height, width, policy)
            i += len(chunk)
            adapter.stage("reading", i, len(indices))
            if adapter.job.cancel_requested:
                raise _Cancelled()
        return frames

    @contextlib.contextmanager
    def _style_files(self, pipe, job, scale):
        """The job's LoRAs and textual inversions, loaded for its render only; the shared pipeline is restored after
        (tokenizer and embedding rows exactly, LoRA layers removed or the start-up adapters set back)."""
        loras = [job.dir / "loras" / n for n in job.loras]
        embeddings = [(job.dir / "embeddings" / n, token) for n, token in job.embeddings]
        base_names, base_weights = self.models.base_loras
        saved_tokenizer = copy.deepcopy(pipe.tokenizer) if embeddings else None
        rows = pipe.text_encoder.get_input_embeddings().num_embeddings if embeddings else None
        names = []
        try:
            for path, token in embeddings:
                try:
                    pipe.load_textual_inversion(str(path), token=token)
                except Exception as e:
                    original = path.name.partition("-")[2]
                    raise UIError(f"could not load the textual inversion {original}: "
                                  f"{one_line(e, {path: original})}") from e
            for i, path in enumerate(loras):
                name = f"ui_lora{i}"
                names.append(name)
                try:
                    pipe.load_lora_weights(str(path), adapter_name=name)
                except Exception as e:
                    original = path.name.partition("-")[2]
                    raise UIError(f"could not load the LoRA {original}: {one_line(e, {path: original})}") from e
            if names:
                pipe.set_adapters([*base_names, *names], [*base_weights, *[float(scale)] * len(names)])
            yield
        finally:
            if names:
                if base_names:
                    for name in names:
                        with contextlib.suppress(Exception):
                            pipe.delete_adapters(name)
                    pipe.set_adapters(list(base_names), list(base_weights))
                else:
                    pipe.unload_lora_weights()
            if embeddings:
                pipe.tokenizer = saved_tokenizer
                pipe.text_encoder.resize_token_embeddings(rows)


def _edit_window_defaults(pipe):
    params = inspect.signature(pipe.make_color_video).parameters if hasattr(pipe, "make_color_video") else {}
    length = params["context_length"].default if "context_length" in params else 8
    stride = params["context_stride"].default if "context_stride" in params else 4
    return length, stride


def _write_png(path, image):
    """A small PNG, written to a temporary name and renamed: the page never reads half a file."""
    import PIL.Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    PIL.Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")
    os.replace(tmp, path)


@contextlib.contextmanager
def cancel_hooks(pipe, job):
    """Cancel within seconds at every stage: a hook before each block of the UNet, the ControlNets and the VAE raises
    _Cancelled once the job is cancelled (the pipeline itself stops only between windows). Like a crash, this leaves
    the render folder at its last completed step, so Resume continues from there."""
    import torch

    def check(module, inputs):
        if job.cancel_requested:
            raise _Cancelled()

    modules = []
    for name in ("unet", "controlnet", "vae"):
        root = getattr(pipe, name, None)
        if isinstance(root, torch.nn.Module):
            modules += [m for m in root.modules() if isinstance(m, torch.nn.ModuleList)]
    handles = [block.register_forward_pre_hook(check) for blocks in modules for block in blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
