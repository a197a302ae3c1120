"""The page's pieces of HTML: messages, the models' banner, the player, before/after, previews, limits; its CSS and
small scripts; the URLs of a session's files (served by page.private_files)."""

from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import quote

from .jobs import ACTIVE
from .settings import _duration, field_of

CSS = """
.dt-banner { border-radius: 8px; padding: 10px 14px; margin-bottom: 6px; }
.dt-banner-demo { background: #fff4d6; border: 1px solid #e8b600; color: #4a3b00; }
.dt-banner-real { background: #e9f5ec; border: 1px solid #6cbf84; color: #143d20; }
#dt-message .dt-error { background: #fde8e8; border: 1px solid #e02424; color: #771d1d; border-radius: 8px;
  padding: 8px 12px; font-weight: 600; }
#dt-progress { padding: 6px 2px; }
#dt-progress .dt-stage { font-size: 1.05em; margin-bottom: 6px; }
#dt-progress progress { width: 100%; height: 14px; }
#dt-progress .dt-note { color: #666; font-size: 0.9em; margin-top: 4px; }
#dt-progress .dt-live { margin: 6px 0 0 0; }
#dt-progress .dt-live img, #dt-progress .dt-live video { max-width: 100%; max-height: 160px; background: #111; }
#dt-message .dt-error { margin: 6px 0; }
.dt-invalid { outline: 2px solid #e02424; border-radius: 6px; }
.dt-field-error { color: #771d1d; font-weight: 600; font-size: 0.9em; padding: 2px 8px; }
.dt-compare { display: flex; gap: 10px; flex-wrap: wrap; }
.dt-compare figure { flex: 1 1 45%; margin: 0; min-width: 220px; }
.dt-compare figcaption { font-weight: 600; margin-bottom: 4px; }
.dt-compare video { width: 100%; max-height: 55vh; background: #000; }
.dt-previous-note { background: #eef2ff; border: 1px solid #8da2fb; border-radius: 8px; padding: 6px 10px; width: 100%; }
.dt-previous video { opacity: 0.75; }
.dt-download { display: inline-block; margin-top: 8px; padding: 6px 14px; border-radius: 8px; background: #e5e7eb;
  font-weight: 600; text-decoration: none; }
#dt-previews figure { display: inline-block; margin: 0 8px 8px 0; text-align: center; }
#dt-previews img, #dt-previews video { height: 150px; object-fit: contain; background: #111; }
#dt-input video { width: 100%; max-height: 30vh; background: #000; }
.dt-render-row { border-top: 1px solid #ddd; padding-top: 6px; align-items: center; }
.dt-render-row img { height: 64px; }
.dt-picker img, .dt-look-files img { max-height: 120px; }
.dt-look-files figure { display: inline-block; margin: 0 8px 4px 0; }
table.dt-report { margin-top: 6px; font-size: 0.9em; }
table.dt-report th { text-align: left; padding-right: 10px; }
"""
COOKIE = "diffutoon_session"  # the session's key, sent with the requests for its files (results, uploads, previews)
FILE_ROUTE = "diffutoon/file"  # /diffutoon/file/<job or upload id>/<name>: this session's files only
SET_COOKIE_JS = (f"(t) => {{ if (t) document.cookie = '{COOKIE}=' + t + '; path=/; SameSite=Strict'; "
                 "const s = document.getElementById('dt-status'); "
                 "if (s) { s.setAttribute('role', 'status'); s.setAttribute('aria-live', 'polite'); } return []; }")
# a refused Render: its message also next to the control it is about (outlined, aria-invalid), until the next Render
MARK_FIELD_JS = ("() => { document.querySelectorAll('.dt-field-error').forEach(e => e.remove()); "
                 "document.querySelectorAll('.dt-invalid').forEach(e => { e.classList.remove('dt-invalid'); "
                 "e.querySelectorAll('input, textarea').forEach(i => i.removeAttribute('aria-invalid')); }); "
                 "const m = document.querySelector('#dt-message .dt-error'); "
                 "const f = m && m.dataset.field && document.getElementById(m.dataset.field); if (!f) return []; "
                 "f.classList.add('dt-invalid'); "
                 "f.querySelectorAll('input, textarea').forEach(i => i.setAttribute('aria-invalid', 'true')); "
                 "const d = document.createElement('div'); d.className = 'dt-field-error'; d.textContent = m.textContent; "
                 "f.appendChild(d); return []; }")
# pressing Render or Cancel with a long form open: bring the status (and any message) into view
SHOW_STATUS_JS = "() => { document.getElementById('dt-actions')?.scrollIntoView({block: 'nearest'}); return []; }"


def _error_html(message):
    """A message in one line; data-field: the control it is about (MARK_FIELD_JS repeats it there)."""
    if not message:
        return ""
    field = field_of(message)
    return (f'<div class="dt-error" role="alert"{f" data-field={chr(34)}{field}{chr(34)}" if field else ""}>'
            f'{html.escape(message)}</div>')


def _banner(manager):
    models = manager.models
    if models.is_demo:
        return (f'<div class="dt-banner dt-banner-demo" id="dt-models" data-models="demo"><b>Demo mode: tiny '
                f'random-weight models.</b> This app runs tiny models with random weights because '
                f'{html.escape(models.reason)}. They prove that everything works (upload, settings, render, progress, '
                f'a video with sound) but the result looks like coloured noise, not anime. See the README for the '
                f'real models.</div>')
    return (f'<div class="dt-banner dt-banner-real" id="dt-models" data-models="real"><b>Models:</b> '
            f'{html.escape(models.summary)}.</div>')


def _url(key, name, version=""):
    """The page's URL of a file of this session (see `private_files`); relative, so that it works under a proxy."""
    return f"{FILE_ROUTE}/{quote(key)}/{quote(name)}" + (f"?v={quote(str(version))}" if version else "")


def _video(key, name, label):
    return f'<video controls preload="metadata" src="{_url(key, name)}" aria-label="{html.escape(label)}"></video>'


def input_html(key, name):
    """The player of the video in the form (an upload, or a job's video after a reload)."""
    if not key:
        return ""
    return (f'<figure id="dt-input-player"><figcaption>Your video: {html.escape(name)}</figcaption>'
            f'{_video(key, name, "Your video: " + name)}</figure>')


def result_html(job, previous=False):
    """Before and after, side by side and labelled; `previous`: a newer request was refused, this is the old one."""
    if job is None:
        return ('<div class="dt-compare" data-state="empty"><p>The result appears here, next to your video, when a '
                'render is done.</p></div>')
    out_name = f"{Path(job.input_name).stem}-diffutoon.mp4"
    done = job.status == "done" and job.output_path is not None and job.output_path.is_file()
    note = ""
    if previous and done:
        note = ('<p class="dt-previous-note">Previous result, from your render of '
                f'{html.escape(time_text(job.created))}: the new settings were not rendered (see the message).</p>')
    before = (f'<figure id="dt-before"><figcaption>Before: {html.escape(job.input_name)}</figcaption>'
              f'{_video(job.id, job.input_name, "Before: " + job.input_name)}</figure>')
    if done:
        after = (f'<figure id="dt-after"><figcaption>After: Diffutoon (with the video\'s sound)</figcaption>'
                 f'{_video(job.id, job.output, "After: Diffutoon")}'
                 f'<a id="dt-download" class="dt-download" href="{_url(job.id, job.output)}" '
                 f'download="{html.escape(out_name)}">Download the video</a></figure>')
    else:
        after = ('<figure id="dt-after"><figcaption>After: Diffutoon</figcaption><p>'
                 + ("Rendering\u2026 the result appears here." if job.status in ACTIVE else "No result.")
                 + '</p></figure>')
    cls = "dt-compare dt-previous" if previous and done else "dt-compare"
    return f'<div class="{cls}" data-state="{job.status}" data-job="{job.id}">{note}{before}{after}</div>'


def previews_html(manager, job):
    """The condition frames as they are made (the pipeline's live preview is under the progress bar)."""
    if job is None:
        return ""
    items = [(name, caption, "img") for name, caption in manager.preview_files(job)]
    if not items:
        return ""
    figures = []
    for name, caption, kind in items:
        src, alt = _url(job.id, name, job.preview_version), html.escape(caption)
        media = (f'<video src="{src}" autoplay loop muted aria-label="{alt}"></video>' if kind == "video"
                 else f'<img src="{src}" alt="{alt}">')
        figures.append(f"<figure>{media}<figcaption>{alt}</figcaption></figure>")
    return ('<div aria-label="Condition frames and previews, as they are made">'
            '<div class="dt-previews-title">Condition frames and previews, as they are made</div>'
            + "".join(figures) + "</div>")


def time_text(t):
    import time as _time

    return _time.strftime("%d %b %H:%M", _time.localtime(t))


def _limits_text(manager):
    lim = manager.limits
    return (f"**Limits:** videos up to {lim.max_upload_mb:g} MB and {_duration(lim.max_seconds)}; at most "
            f"{lim.max_frames} frames per render (use Start, End and Every n-th frame to pick a part). Renders run "
            f"one at a time on each accelerator: others wait in line and see their place. Your uploads and results "
            f"are kept in a folder of this browser's session, visible only to you, for {manager.keep_days:g} days. "
            + ("A render stopped by Cancel (or by a restart of the app) keeps its folder: Resume continues it from "
               "its last completed step." if manager.resumable else
               "Cancel stops a render at the next window; Resume (or a restart of the app) starts it again."))
