"""The page's controls of issues 17-19 that are more than a field: painted keyframes (an image and a time each, with
a frame picker showing your video at that time) and a style image; what a job had of them, after a reload."""

from __future__ import annotations

import html
from dataclasses import dataclass

from .files import _write_png
from .look import NO_STYLE
from .views import _url

KEYFRAME_SLOTS = 3


@dataclass
class LookControls:
    images: list  # gr.Image (filepath) per keyframe slot
    times: list  # gr.Number (seconds) per slot
    pickers: list  # gr.HTML: your video at that time
    style: object  # gr.Image, or a gr.State(None) without an IP-Adapter
    note: object  # gr.HTML: the keyframes and style image of the job shown (files are not put back in uploads)


def build(gr, manager):
    """The keyframe slots and the style image, inside the current Blocks context."""
    images, times, pickers = [], [], []
    gr.Markdown("**Painted keyframes** (optional): take a frame of your video (the picker shows it; right-click to "
                "save it), repaint it in any tool, upload it with its time. Its colours are spread over the video "
                "along its motion. Not with an editing prompt.")
    for i in range(KEYFRAME_SLOTS):
        with gr.Row(elem_id=f"dt-keyframe-{i + 1}"):
            images.append(gr.Image(type="filepath", label=f"Keyframe {i + 1}", height=160, sources=["upload"],
                                   elem_id=f"dt-keyframe-image-{i + 1}"))
            with gr.Column():
                times.append(gr.Number(0.0 if i == 0 else None, label=f"Keyframe {i + 1} at (seconds)",
                                       elem_id=f"dt-keyframe-time-{i + 1}"))
                pickers.append(gr.HTML("", elem_id=f"dt-keyframe-frame-{i + 1}"))
    note = gr.HTML("", elem_id="dt-look-files")
    if manager.models.ip_adapter:
        style = gr.Image(type="filepath", label="Style image (optional, IP-Adapter): its look guides every frame",
                         height=160, sources=["upload"], elem_id="dt-style-image")
    else:
        style = gr.State(None)
        gr.Markdown(f"Style image: not available. {NO_STYLE}", elem_id="dt-style-missing")
    return LookControls(images, times, pickers, style, note)


def frame_picker(manager, token, source, seconds):
    """Your video at `seconds`: its frame, written into the session's folder and shown through the private route."""
    if not source or seconds is None:
        return ""
    key, name = source
    path = manager.source_path(token, source)
    if path is None:
        return ""
    from .. import video as vio

    reader = vio.VideoReader(path)
    index = min(max(0, int(round(float(seconds) * reader.fps))), reader.num_frames - 1)
    target = path.parent / "frames" / f"{index}.png"
    if not target.is_file():
        _write_png(target, reader.read([index])[0])
    return (f'<figure class="dt-picker"><img src="{_url(key, f"frames/{index}.png")}" alt="Your video at '
            f'{float(seconds):g} s"><figcaption>Your video at {float(seconds):g} s (frame {index} of '
            f'{reader.num_frames})</figcaption></figure>')


def inputs(images, times, style):
    """The form's keyframes [(seconds, path)] and style image path, as JobManager.submit takes them."""
    return [(float(t or 0), p) for p, t in zip(images, times) if p], style or None


def restore(job):
    """The keyframe times of a job, and a note with its keyframes and style image (upload them again to reuse them
    in a new render; Resume uses them as they are)."""
    settings = job.settings_obj()
    times = [k[0] for k in settings.keyframes][:KEYFRAME_SLOTS]
    times += [None] * (KEYFRAME_SLOTS - len(times))
    items = [(f"keyframes/{n}", f"Keyframe at {t:g} s: {n.partition('-')[2]}") for t, n in settings.keyframes]
    items += [(f"style/{settings.style_image}", f"Style image: {settings.style_image}")] if settings.style_image else []
    if not items:
        return [*times, ""]
    figures = "".join(f'<figure><img src="{_url(job.id, name)}" alt="{html.escape(c)}" height="80">'
                      f"<figcaption>{html.escape(c)}</figcaption></figure>" for name, c in items)
    return [*times, f'<div class="dt-look-files"><p>This render\'s files (upload them again for a new render):</p>'
                    f"{figures}</div>"]
