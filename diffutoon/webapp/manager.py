"""The jobs of every session: checks, the queue with one worker per accelerator, Cancel / Resume, persistence and
recovery after a restart. Its other parts: the files handed to the page (files.py), the worker that renders
(render.py), the users' style files (styles.py).

Integration points with the pipeline's long-render API (CONTRACT.md), each used only when the pipeline has it:

    PipelineFeatures.of(pipe)   which of render_dir / progress_callback / output_path (+ diffutoon.video.VideoClip)
                                the pipeline offers, read from inspect.signature(pipe.__call__)
    ProgressAdapter.callback    progress_callback=: the contract's progress dict, shown as is
    ProgressAdapter.on_step_end, ProgressAdapter.tracking_bars
                                the fallback: callback_on_step_end + the totals and counts of the pipeline's own tqdm bars
    Renderer._call_pipeline     render_dir=, output_path=, fps=, video=VideoClip(...) when available, else frames
    read_condition_previews     <render_dir>/conditions/<i>-<kind>.npy + .done, <render_dir>/edit/colors.npy
    JobManager.cancel           pipe._interrupt = True from the request's thread: stops at the next window
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

from .. import cli
from .. import video as vio
from .estimate import Estimator
from .files import SessionFiles, _write_png
from .jobs import _JOB_ID, _TOKEN, ACTIVE, TERMINAL, Job, VideoInfo, _link_or_copy
from .loading import PipelineFeatures
from .progress import thumbnail
from .render import Renderer
from .settings import (UIError, _duration, default_limits, one_line, open_input, page_defaults, page_message,
                       parse_render_args, safe_name)
from . import look
from .styles import check_style_files


class TooLong(UIError):
    """A render estimated far beyond what this device does in reasonable time; pressing Render again confirms it."""


class JobManager(SessionFiles, Renderer):
    """Jobs of every session: checks, queue, workers (one per accelerator), persistence and resumption."""

    def __init__(self, models, data_dir, limits=None, defaults=None, keep_days=7.0, log=None):
        self.models = models
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.limits = limits or default_limits(models.kind, models.accelerator)
        self.defaults = defaults or page_defaults(models.kind, models.accelerator)
        if look.fast_choices(models.slots[0].pipe) and not self.defaults.fast:
            self.defaults = replace(self.defaults, fast="auto")  # a distilled adapter: its preset unless turned off
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

    def check(self, input_path, name, settings, folder=None):
        """The checks of `diffutoon render`, with its messages: (args, reader, indices, (height, width)). `folder`:
        where the keyframes/ and style/ files are (default: the input's folder, the job's)."""
        input_path = Path(input_path)
        self.limits.check_size(input_path, name)
        files = Path(folder if folder is not None else input_path.parent)
        paths = {files / "keyframes" / n: n.partition("-")[2] for _, n in settings.keyframes or []}
        paths.update({files / "style" / settings.style_image: settings.style_image} if settings.style_image else {})
        try:
            args = parse_render_args(settings.argv(input_path, folder))
        except UIError as e:  # the server's paths of the user's files: their names
            raise UIError(page_message(str(e), paths)) from e
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
        look.check(args, reader, indices, *size, self.models.slots[0].pipe, self.models.ip_adapter,
                   {**paths, input_path: name})
        return args, reader, indices, size

    def submit(self, token, upload, settings, loras=(), embeddings=(), confirmed=False, keyframes=(),
               style_image=None):
        """Check a render request and queue it as a job of this session; UIError with a one-line message.
        A render estimated far beyond what this device does in reasonable time raises TooLong unless `confirmed`.
        keyframes: [(seconds, image path)]; style_image: an image path (both copied into the job's folder)."""
        sid = self.session_id(token)
        if not upload:
            raise UIError("upload a video, or press \u201cUse the demo clip\u201d")
        upload = Path(upload)
        name = safe_name(upload.name)
        files = [("LoRA", Path(p)) for p in loras or []] + [("Textual inversion", Path(p)) for p in embeddings or []]
        check_style_files(files)
        with self._cond:
            active = [j for j in self._jobs.values() if j.session == sid and j.status in ACTIVE]
        if active:
            raise UIError("you already have a render in line or running: wait for it, or cancel it first")
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        folder = self.data_dir / "sessions" / sid / job_id
        try:  # the job's folder holds its files from the start; a refused request leaves nothing behind
            settings = self._stage(folder, upload, name, settings, keyframes, style_image)
            args, reader, indices, (height, width) = self.check(folder / name, name, settings)
            steps = look.draft_steps(args, self.models.slots[0].pipe)  # a Fast draft's preset sets the steps
            estimate = self.estimate(replace(settings, steps=steps), len(indices), height, width)
            if estimate and estimate > self.limits.warn_seconds and not confirmed:
                device = self.models.slots[0].device
                raise TooLong(f"This render would take about {_duration(estimate)} on this app's {device} (an "
                              f"estimate from its work: {len(indices)} frames of {width}x{height}, {steps} "
                              "steps): choose a smaller Width/Height, fewer frames or Steps, or press Render again to "
                              "start it anyway")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
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

    @staticmethod
    def _stage(folder, upload, name, settings, keyframes, style_image):
        """The job's folder with the video, keyframes/ and style/: the settings naming those files."""
        for sub in ("loras", "embeddings", "keyframes", "style"):
            (folder / sub).mkdir(parents=True)
        _link_or_copy(upload, folder / name)
        names = []
        for i, (seconds, path) in enumerate(keyframes or []):
            names.append([seconds, f"{i}-{safe_name(Path(path).name, 'keyframe.png')}"])
            _link_or_copy(path, folder / "keyframes" / names[-1][1])
        style = safe_name(Path(style_image).name, "style.png") if style_image else ""
        if style:
            _link_or_copy(style_image, folder / "style" / style)
        return replace(settings, keyframes=names, style_image=style)

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
