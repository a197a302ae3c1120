"""The progress of a render as the page shows it: the pipeline's own progress dict (its `progress_callback`, or
its tqdm bars and `callback_on_step_end` where it has none), an overall fraction that only moves forward, previews of
the condition frames, and the progress block's HTML."""

from __future__ import annotations

import contextlib
import html
import time
from pathlib import Path

import numpy as np

from .jobs import ACTIVE
from .settings import _duration

STAGE_WORDS = {
    "queued": "Waiting in line", "cuts": "Finding the scene cuts", "reading": "Reading the video", "conditions": "Making the condition frames",
    "keyframes": "Spreading your keyframes' colours over the video (FastBlend)",
    "edit": "Editing branch: drawing the colour video", "fastblend": "Editing branch: smoothing the colour video",
    "denoising": "Drawing", "decoding": "Decoding the frames", "writing": "Writing the video", "done": "Done",
    "interrupted": "Cancelled",
}
# share of the whole render each stage stands for (an overall bar that only moves forward)
_STAGE_SHARE = {"reading": 0.02, "conditions": 0.06, "keyframes": 0.1, "edit": 0.2, "fastblend": 0.04, "denoising": 0.58,
                "decoding": 0.06, "writing": 0.04}
_STAGE_ORDER = ["reading", "conditions", "keyframes", "edit", "fastblend", "denoising", "decoding", "writing"]
CONDITION_LABELS = {"lineart": "Lineart", "tile": "Colour", "softedge": "Soft edges", "depth": "Depth"}
COLOR_CAPTION = "Colour (edited)"  # the editing branch's colour video, the tile ControlNet's input


class _Cancelled(Exception):
    """Raised inside the pipeline's progress bar (fallback mode) to stop at the next window."""


# ---------------------------------------------------------------------------------------------- previews
def thumbnail(frame, max_side=256):
    import cv2

    frame = np.ascontiguousarray(np.asarray(frame)[..., :3], dtype=np.uint8)
    h, w = frame.shape[:2]
    scale = max_side / max(h, w)
    if scale < 1:
        frame = cv2.resize(frame, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return frame


def _done_chunks(path):
    try:
        data = path.read_bytes()
    except OSError:
        return 0
    n = 0
    for b in data:  # one byte per 16-frame chunk: 1 (or "1") once written; the written prefix is what is shown
        if b not in (1, ord("1")):
            break
        n += 1
    return n


def read_condition_previews(render_dir, chunk=16):
    """{name: (thumbnail, caption)} of the condition frames written so far in a render folder (CONTRACT.md):
    the last frame of the completed chunks of each <i>-<kind>.npy, and the editing branch's colour video."""
    render_dir = Path(render_dir)
    out = {}
    for folder, prefix in ((render_dir / "edit" / "conditions", "Edit: "), (render_dir / "conditions", "")):
        for npy in sorted(folder.glob("*.npy")) if folder.is_dir() else []:
            kind = npy.stem.partition("-")[2] or npy.stem
            chunks = _done_chunks(npy.with_suffix(".done"))
            if not chunks:
                continue
            try:
                frames = np.load(npy, mmap_mode="r")
                last = min(chunks * chunk, len(frames)) - 1
                image = thumbnail(frames[last])
            except Exception:  # being written: next time
                continue
            out[prefix + kind] = (image, f"{prefix}{CONDITION_LABELS.get(kind, kind)} {last + 1}/{len(frames)}")
    colors = render_dir / "edit" / "colors.npy"
    if colors.is_file():
        try:
            frames = np.load(colors, mmap_mode="r")
            out["colors"] = (thumbnail(frames[len(frames) // 2]), COLOR_CAPTION)
        except Exception:
            pass
    return out


class _RecordingDetector:
    """Wraps an annotator (PIL -> PIL): each frame it makes becomes the latest preview of its kind."""

    def __init__(self, detector, kind, adapter):
        self._detector, self._kind, self._adapter = detector, kind, adapter
        self.count = 0

    def __call__(self, image, *args, **kwargs):
        result = self._detector(image, *args, **kwargs)
        self.count += 1
        self._adapter.set_preview(self._kind, np.asarray(result.convert("RGB")),
                                  f"{CONDITION_LABELS.get(self._kind, self._kind)} {self.count}/{self._adapter.frames}")
        # progress per frame (the pipeline reports a chunk of frames at a time), and Cancel acts between frames
        self._adapter.stage("conditions", min(self.count, self._adapter.frames), self._adapter.frames)
        if self._adapter.job.cancel_requested:
            raise _Cancelled()
        return result

    def __getattr__(self, name):
        return getattr(self._detector, name)


# ---------------------------------------------------------------------------------------------- progress
# what the pipeline may add to its progress dict, kept until it says otherwise: the path of its latest preview
# (image or video) and the step it shows, its memory plan (one line) and, at the end, its quality report (a dict)
LIVE_KEYS = ("preview", "preview_step", "preview_steps", "memory_plan", "report", "scene_cuts")
_BAR_STAGES = (("editing branch", "edit"), ("denoising", "denoising"), ("decoding", "decoding"),
               ("lineart", "conditions"), ("softedge", "conditions"), ("depth", "conditions"))


class ProgressAdapter:
    """The progress of one render as the contract's dict, from the pipeline's `progress_callback` when it has
    one, else from `callback_on_step_end` and the pipeline's own tqdm bars (totals and counts). Never a timer."""

    def __init__(self, job, pipe, notify, frames, windows=None, edit_windows=None, render_dir=None):
        self.job, self.pipe, self.notify = job, pipe, notify
        self.frames, self.windows, self.edit_windows = frames, windows, edit_windows
        self.render_dir = render_dir
        self.started_at = time.time()
        self.steps_done = 0
        self._main_seen = False
        self._stage_started = {}

    # -- the common sink
    def emit(self, progress):
        now = time.time()
        d = {"stage": "reading", "pass": "main", "step": 0, "steps": 0, "window": 0, "windows": 0, "done": 0,
             "total": 0, "frames": self.frames, "started_at": self.started_at, "updated_at": now,
             "eta_seconds": None}
        d.update(progress)
        job = self.job
        job.live.update({k: d[k] for k in LIVE_KEYS if d.get(k) is not None})
        if job.cancel_requested:
            self.pipe._interrupt = True  # also after the pipeline reset the flag at the start of its call
        job.progress = d
        job.events += 1
        job.fraction = max(job.fraction, overall_fraction(d, bool(job.settings.get("edit_prompt")),
                                                          bool(job.settings.get("keyframes"))))
        self.notify(job)

    def stage(self, stage, done=0, total=0, **extra):
        self.emit({"stage": stage, "done": done, "total": total, **extra})

    # -- the long-render API
    def callback(self, progress):
        """progress_callback=: the pipeline's dict as is; condition previews from its render folder. Once cancelled,
        the next report stops the pipeline (it reports every chunk of frames while reading, making conditions and
        decoding; its own _interrupt acts only between windows)."""
        self.emit(dict(progress))
        if self.job.cancel_requested and progress.get("stage") not in ("done", "interrupted"):
            raise _Cancelled()
        if self.render_dir is not None and progress.get("stage") in ("conditions", "edit", "fastblend", "denoising"):
            for name, (image, caption) in read_condition_previews(self.render_dir).items():
                self.job.set_preview(name, image, caption)

    # -- the fallback
    def on_step_end(self, pipe, i, t, tensors):
        """callback_on_step_end= of the main pass: completed steps (the bar gives the window within a step)."""
        self.steps_done = i + 1
        if self.job.cancel_requested:
            pipe._interrupt = True
        return {}

    @contextlib.contextmanager
    def tracking_bars(self):
        """Watch the pipeline's own progress bars (its `_bar` factory) for the duration of one call."""
        pipe = self.pipe
        original = getattr(type(pipe), "_bar", None)
        if original is None:
            yield
            return

        def tracked(this, iterable=None, total=None, desc=None):
            bar = original(this, iterable, total=total, desc=desc)
            self._watch_bar(bar, desc or "")
            return bar

        pipe._bar = tracked.__get__(pipe)
        try:
            yield
        finally:
            pipe.__dict__.pop("_bar", None)

    def _watch_bar(self, bar, desc):
        stage = next((s for key, s in _BAR_STAGES if desc.startswith(key)), None)
        if stage is None:
            return
        # the editing branch runs first (softedge, depth, its steps, decoding, FastBlend), then the main pass
        # (lineart, denoising, decoding)
        if desc.startswith(("lineart", "denoising")):
            self._main_seen = True
        pass_ = "main" if self._main_seen or not self.job.settings.get("edit_prompt") else "edit"
        original_update = bar.update

        def update(n=1):
            result = original_update(n)
            self._from_bar(bar, stage, pass_)
            if self.job.cancel_requested:
                raise _Cancelled()  # the next window (or frame) does not start
            return result

        bar.update = update
        self._from_bar(bar, stage, pass_)

    def _from_bar(self, bar, stage, pass_):
        n, total = int(bar.n), int(bar.total or 0)
        d = {"stage": stage, "pass": pass_, "done": n, "total": total}
        windows = self.edit_windows if stage == "edit" else self.windows
        if stage in ("edit", "denoising") and windows:
            d.update(step=n // windows, steps=total // windows, window=n % windows, windows=windows)
            if stage == "denoising":
                d["step"] = max(d["step"], min(self.steps_done, d["steps"]))
        started = self._stage_started.setdefault((stage, pass_), bar.start_t)
        if stage in ("denoising", "decoding") and pass_ == "main" and n:
            d["eta_seconds"] = (time.time() - started) / n * (total - n)
        if stage == "decoding" and pass_ == "edit" and n >= total:
            d.update(stage="fastblend", done=0, total=0)  # what the editing branch does next, off the bars
        self.emit(d)

    # -- previews
    def set_preview(self, kind, image, caption):
        self.job.set_preview(kind, thumbnail(image), caption)

    def recording(self, detector, kind="lineart"):
        return _RecordingDetector(detector, kind, self) if detector is not None else None


def overall_fraction(d, edit, keyframes=False):
    """The share of the whole render done at this progress dict (stages weighted by _STAGE_SHARE)."""
    stage = d.get("stage")
    if stage == "done":
        return 1.0
    if stage not in _STAGE_SHARE:
        return 0.0
    stages = [s for s in _STAGE_ORDER if (edit or s not in ("edit", "fastblend")) and (keyframes or s != "keyframes")]
    if stage in ("conditions",) and d.get("pass") == "edit" and edit:
        stage = "edit"  # the editing branch's own conditions: counted with it
    shares = [_STAGE_SHARE[s] for s in stages]
    i = stages.index(stage) if stage in stages else 0
    total = d.get("total") or 0
    inner = min(1.0, (d.get("done") or 0) / total) if total else 0.0
    return (sum(shares[:i]) + shares[i] * inner) / sum(shares)


def _place_text(place):
    number, running = place
    ahead = number - 1
    text = f"Waiting in line: you are number {number}. "
    if ahead:
        text += f"{ahead} render{' is' if ahead == 1 else 's are'} ahead of you"
    else:
        text += "Yours is next"
    text += f" ({running} running now; renders run one at a time on each accelerator)."
    return text


def _drawing(p):
    """"step s of S, window w of W" for the window being drawn now. `done` counts the windows completed (both the
    pipeline's callback, whose `window` is the completed one, and its bars agree on it)."""
    steps, windows, done = p.get("steps") or 0, p.get("windows") or 0, p.get("done") or 0
    if not steps:
        return ""
    if not windows:
        return f": step {min(p.get('step', 0) + 1, steps)} of {steps}"
    step, window = divmod(min(done, steps * windows - 1), windows)
    return f": step {step + 1} of {steps}, window {window + 1} of {windows}"


def _report_html(report, escape):
    """The quality report at the end, in the CLI's words (diffutoon/report.py's summary line)."""
    from ..report import summary

    return f'<div class="dt-note dt-report" aria-label="Quality report">{escape(summary(report))}</div>'


def _cuts_text(cuts):
    """The scene cuts the render used (rendered frame indices), in a few words."""
    if not cuts:
        return "Scene cuts: none found, one shot."
    shown = ", ".join(str(c) for c in cuts[:12]) + (", \u2026" if len(cuts) > 12 else "")
    return f"Scene cuts at frames {shown}: {len(cuts) + 1} shots, each rendered on its own."


def live_preview_html(src, caption, escape=html.escape):
    """The pipeline's latest preview under the progress bar (an image, or a video for .mp4/.gif previews)."""
    alt = escape(caption)
    media = (f'<video src="{src}" autoplay loop muted aria-label="{alt}"></video>'
             if src.split("?")[0].lower().endswith((".mp4", ".webm", ".mov")) else f'<img src="{src}" alt="{alt}">')
    return f'<figure class="dt-live" id="dt-live">{media}<figcaption>{alt}</figcaption></figure>'


def preview_caption(live):
    step, steps = live.get("preview_step"), live.get("preview_steps")
    if step is None:
        return "Live preview"
    return f"Live preview after step {step}" + (f" of {steps}" if steps else "")


def status_html(job, place=(0, 0), escape=html.escape, wait=None, preview=None):
    """The progress block of the page: words for people (announced by screen readers: role="status"), data-*
    attributes for scripts and tests. `wait`: the estimated seconds a queued job waits; `preview`: the URL of the
    pipeline's latest preview, shown under the bar while the job runs."""
    live = 'role="status" aria-live="polite" aria-atomic="true"'
    if job is None:
        return (f'<div id="dt-progress" data-state="idle" {live}><div class="dt-stage">Upload a video (or use the demo '
                'clip), then press Render.</div></div>')
    p = job.progress or {}
    state = job.status
    stage = p.get("stage") or "reading"
    if state == "queued":
        stage, text = "queued", _place_text(place)
        if wait:
            text += f" It should start in about {_duration(wait)}."
        if job.estimate:
            text += f" The render itself: about {_duration(job.estimate)}."
    elif state == "done":
        stage, text = "done", f"Done in {_duration((job.finished or 0) - (job.started or 0))}."
    elif state in ("failed", "cancelled"):
        text = escape(job.message or state)
    else:
        text = STAGE_WORDS.get(stage, stage)
        if p.get("pass") == "edit" and stage == "conditions":
            text = "Editing branch: making its condition frames"
        if stage in ("denoising", "edit"):
            text += _drawing(p)
        elif stage in ("reading", "conditions", "decoding", "keyframes") and p.get("total"):
            text += f": frame {p.get('done', 0)} of {p['total']}"
        eta = p.get("eta_seconds")
        text += f" \u00b7 about {_duration(eta)} left" if eta else " \u00b7 estimating the time left"
        if state == "cancelling":
            text = f"Cancelling\u2026 ({text})"
    note = f'<div class="dt-note">This render was {escape(job.note)}.</div>' if job.note and state in ACTIVE else ""
    live_ = job.live or {}
    if live_.get("memory_plan"):
        note += f'<div class="dt-note dt-memory">Memory: {escape(str(live_["memory_plan"]))}</div>'
    if live_.get("scene_cuts") is not None:
        note += f'<div class="dt-note dt-cuts">{escape(_cuts_text(list(live_["scene_cuts"])))}</div>'
    if state == "done" and isinstance(live_.get("report"), dict) and live_["report"]:
        note += _report_html(live_["report"], escape)
    if preview and state in ("running", "cancelling"):
        note += live_preview_html(preview, preview_caption(live_), escape)
    attrs = {"state": state, "stage": stage, "step": p.get("step", 0), "steps": p.get("steps", 0),
             "window": p.get("window", 0), "windows": p.get("windows", 0), "done": p.get("done", 0),
             "total": p.get("total", 0), "events": job.events, "fraction": f"{job.fraction:.4f}", "job": job.id}
    data = " ".join(f'data-{k}="{escape(str(v))}"' for k, v in attrs.items())
    percent = round(100 * job.fraction)
    return (f'<div id="dt-progress" {data} {live}><div class="dt-stage">{text}</div>'
            f'<progress value="{job.fraction:.4f}" max="1" aria-label="Render progress" '
            f'aria-valuetext="{percent}%">{percent}%</progress>{note}</div>')
