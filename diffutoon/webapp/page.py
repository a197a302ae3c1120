"""`diffutoon ui`: the web app (Gradio). Upload a video, choose the part and the settings, press Render, watch the
pipeline's own progress and the condition frames as they are made, play and download the result.

    pip install -e ".[ui]"
    diffutoon ui                                   # the real models if cached, else the tiny demo models
    diffutoon ui --base path/or/hub-id/of/an/sd15-anime-checkpoint --port 7860
    python app.py                                  # the same, as a Hugging Face Space runs it

The engine (models, queue, jobs, progress) lives beside it in `diffutoon.webapp`, without Gradio.
"""

from __future__ import annotations

import asyncio
import html
import os
import sys
from pathlib import Path

from .. import cli
from ..models import CLIError
from .jobs import TERMINAL, VideoInfo
from .loading import load_models
from .manager import JobManager
from .progress import status_html
from .settings import Settings, UIError, _duration, default_limits

GRADIO_MIN = "6.0"
SESSION_KEY = "diffutoon-ui-session"

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
#dt-result video { max-height: 65vh; }
"""


def _import_gradio():
    try:
        import gradio as gr
    except ImportError as e:
        raise CLIError(f"the web app needs Gradio ({e}): pip install 'diffutoon[ui]' "
                           f"(or pip install 'gradio>={GRADIO_MIN}')") from e
    return gr


def _error_html(message):
    return f'<div class="dt-error" role="alert">{html.escape(message)}</div>' if message else ""


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


def _limits_text(manager):
    lim = manager.limits
    return (f"**Limits:** videos up to {lim.max_upload_mb:g} MB and {_duration(lim.max_seconds)}; at most "
            f"{lim.max_frames} frames per render (use Start, End and Every n-th frame to pick a part). Renders run "
            f"one at a time on each accelerator: others wait in line and see their place. Your uploads and results "
            f"are kept in a folder of this browser's session, visible only to you, for {manager.keep_days:g} days. "
            + ("A render stopped by Cancel (or by a restart of the app) keeps its folder: Resume continues it from "
               "its last completed step." if manager.resumable else
               "Cancel stops a render at the next window; Resume (or a restart of the app) starts it again."))


def build_app(manager):
    """The page, wired to a started `JobManager`. Returns (blocks, launch_kwargs)."""
    gr = _import_gradio()
    d = manager.defaults
    demo_models = manager.models.is_demo
    # events: not part of an API, and no Gradio "processing | 1.2s" timers: the status block is the progress
    private = dict(api_visibility="private", show_progress="hidden")

    with gr.Blocks(title="Diffutoon: video to anime", analytics_enabled=False,
                   delete_cache=(1800, 24 * 3600)) as app:
        # the browser's session key, kept in its local storage (the BrowserState secret is public: it only
        # obfuscates the stored value; what keeps sessions apart is the key itself and manager.secret)
        token = gr.BrowserState(None, storage_key=SESSION_KEY, secret=manager.browser_key)
        job_id = gr.State(None)
        info_state = gr.State(None)  # the upload's VideoInfo as a dict

        gr.Markdown("# Diffutoon: turn a video into anime\nToon shading with diffusion models (Diffutoon, IJCAI "
                    "2024): the result keeps your video's frame rate, length and sound.")
        gr.HTML(_banner(manager))
        with gr.Row():
            with gr.Column(scale=5):
                upload = gr.File(label=f"Your video (mp4, mov, mkv, webm, avi...; up to "
                                       f"{manager.limits.max_upload_mb:g} MB and {_duration(manager.limits.max_seconds)})",
                                 type="filepath", elem_id="dt-video")
                demo_clip = gr.Button("Use the demo clip (a photo with a moving camera, 2 s, with sound)",
                                      size="sm", elem_id="dt-demo-clip")
                info = gr.Markdown("", elem_id="dt-info")
                with gr.Accordion("Part of the video", open=True):
                    with gr.Row():
                        start = gr.Number(label="Start (seconds)", value=0, minimum=0, elem_id="dt-start")
                        end = gr.Number(label="End (seconds; 0 = the end)", value=0, minimum=0, elem_id="dt-end")
                        every_nth = gr.Number(label="Every n-th frame", value=1, minimum=1, precision=0,
                                              elem_id="dt-every-nth",
                                              info="2 keeps every other frame: half the work, half the frame rate")
                prompt = gr.Textbox(label="Prompt", value=d.prompt, lines=2, elem_id="dt-prompt",
                                    info="What the anime version should look like")
                negative = gr.Textbox(label="Negative prompt", value=d.negative_prompt, elem_id="dt-negative",
                                      info="What to avoid. verybadimagenegative_v1.3 is the paper's (a textual "
                                           "inversion, loaded with the real models)")
                with gr.Accordion("Editing (optional): recolour or relight", open=False):
                    edit = gr.Textbox(label="Editing prompt", value="", placeholder="orange dress, night, blue sky",
                                      elem_id="dt-edit", interactive=manager.models.has_edit,
                                      info="Runs the editing branch first: a colour video made with this prompt "
                                           "guides the colours. Slower. Leave empty to keep the video's colours."
                                           + ("" if manager.models.has_edit else
                                              " (Off: the editing ControlNets are not loaded.)"))
                    edit_steps = gr.Slider(1, 50, value=d.edit_steps, step=1, label="Editing steps",
                                           elem_id="dt-edit-steps")
                with gr.Accordion("Size and quality", open=False):
                    with gr.Row():
                        width = gr.Slider(64, 2048, value=d.width, step=8, label="Width", elem_id="dt-width")
                        height = gr.Slider(64, 2048, value=d.height, step=8, label="Height", elem_id="dt-height")
                    shape = gr.Radio([("Crop to fill (the paper)", "crop"), ("Fit with black bars", "pad"),
                                      ("Keep the video's shape (short side = the smaller of width and height)",
                                       "short_side")], value=d.shape, label="Shape", elem_id="dt-shape")
                    with gr.Row():
                        steps = gr.Slider(1, 50, value=d.steps, step=1, label="Steps", elem_id="dt-steps",
                                          info="More: finer, slower (the paper: 10)")
                        guidance = gr.Slider(0, 20, value=d.guidance_scale, step=0.5, label="Guidance",
                                             elem_id="dt-guidance", info="How strongly to follow the prompt")
                    with gr.Row():
                        context_length = gr.Slider(2, 32, value=d.context_length, step=1, label="Window length",
                                                   elem_id="dt-window-length",
                                                   info="Frames drawn together (the paper: 16)")
                        context_stride = gr.Slider(1, 31, value=d.context_stride, step=1, label="Window stride",
                                                   elem_id="dt-window-stride",
                                                   info="Shift between windows; smaller than the length")
                    with gr.Row():
                        lineart = gr.Slider(0, 2, value=d.lineart_scale, step=0.05, label="Lineart strength",
                                            elem_id="dt-lineart", info="How closely the outlines are kept")
                        tile = gr.Slider(0, 2, value=d.tile_scale, step=0.05, label="Colour strength",
                                         elem_id="dt-tile", info="How closely the colours are kept")
                    seed = gr.Number(label="Seed", value=d.seed, precision=0, elem_id="dt-seed",
                                     info="Same seed and settings: same result")
                with gr.Accordion("Styles: LoRAs and textual inversions (your files)", open=False):
                    loras = gr.File(label="LoRA files (.safetensors) for SD1.5", file_count="multiple",
                                    type="filepath", elem_id="dt-loras")
                    lora_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="LoRA strength", elem_id="dt-lora-scale")
                    embeddings = gr.File(label="Textual inversions (.pt, .safetensors, .bin)", file_count="multiple",
                                         type="filepath", elem_id="dt-embeddings")
                    gr.Markdown("An embedding's word is its file name without the extension: with "
                                "`easynegative.pt`, write `easynegative` in a prompt. They are used for your "
                                "render only.")
                with gr.Row():
                    render = gr.Button("Render", variant="primary", elem_id="dt-render")
                    cancel = gr.Button("Cancel", variant="stop", interactive=False, elem_id="dt-cancel")
                    resume = gr.Button("Resume", visible=False, elem_id="dt-resume")
            with gr.Column(scale=6):
                message = gr.HTML("", elem_id="dt-message")
                status = gr.HTML(status_html(None), elem_id="dt-status")
                previews = gr.Gallery(label="Condition frames, as they are made (lineart, colour)", columns=4,
                                      rows=1, height=170, fit_columns=False, elem_id="dt-previews", format="png", interactive=False,
                                      object_fit="contain", preview=False)
                result = gr.Video(label="Result (with the video's sound)", interactive=False, elem_id="dt-result",
                                  buttons=["download"])
                download = gr.DownloadButton("Download the video", visible=False, elem_id="dt-download")
        gr.Markdown(_limits_text(manager)
                    + ("\n\n**About the demo models:** tiny networks with random weights, built in a second "
                       "without any download. Everything around them is real (reading the video, lineart, "
                       "sliding windows, decoding, the mp4 with sound), so they show the app works; the picture "
                       "itself is noise." if demo_models else ""), elem_id="dt-limits")

        settings_inputs = [start, end, every_nth, prompt, negative, edit, edit_steps, width, height, shape, steps,
                           guidance, context_length, context_stride, lineart, tile, seed, lora_scale]
        watch_outputs = [status, message, previews, result, download, render, cancel, resume]

        # -- handlers
        def settings_from(values):
            (start_, end_, nth_, prompt_, negative_, edit_, edit_steps_, width_, height_, shape_, steps_, guidance_,
             cl_, cs_, lineart_, tile_, seed_, lora_scale_) = values
            return Settings(start=start_ or 0, end=end_ or None, every_nth=nth_ if nth_ is not None else 1,
                              prompt=prompt_ or "", negative_prompt=negative_ or "", edit_prompt=edit_ or "",
                              edit_steps=edit_steps_, edit_size=d.edit_size, width=width_, height=height_,
                              shape=shape_, steps=steps_, guidance_scale=guidance_, context_length=cl_,
                              context_stride=cs_, lineart_scale=lineart_, tile_scale=tile_,
                              seed=seed_ if seed_ is not None else 0, lora_scale=lora_scale_)

        def on_load(tok):
            tok = manager.check_token(tok)
            job = manager.latest(tok)
            return tok, job.id if job else None

        def on_upload(path, start_, end_, nth_):
            if not path:
                return None, "", "", gr.skip()
            try:
                vi = manager.inspect(path)
            except UIError as e:
                return None, "", _error_html(str(e)), gr.skip()
            new_end = None
            if vi.selection(start_, end_, nth_) > manager.limits.max_frames:  # preselect a part that fits
                frames = manager.limits.max_frames * max(1, int(nth_ or 1))
                new_end = round((start_ or 0) + (frames - 0.5) / vi.fps, 3)
            meta = {"name": vi.name, "fps": vi.fps, "num_frames": vi.num_frames, "width": vi.width,
                    "height": vi.height, "has_audio": vi.has_audio, "size": vi.size}
            text = _describe(meta, start_, new_end if new_end is not None else end_, nth_)
            return meta, text, "", new_end if new_end is not None else gr.skip()

        def _describe(meta, start_, end_, nth_):
            if not meta:
                return ""
            vi = VideoInfo(**meta)
            n = vi.selection(start_, end_ if isinstance(end_, (int, float)) else None, nth_)
            fps = vi.fps / max(1, int(nth_ or 1))
            text = f"**{html.escape(vi.name)}**: {vi.describe().split(': ', 1)[1]}. Selected: **{n} frames** " \
                   f"({n / fps:.1f} s at {fps:g} fps)"
            if n > manager.limits.max_frames:
                text += f", more than the {manager.limits.max_frames} this app renders at a time"
            return text + "."

        def on_trim(meta, start_, end_, nth_):
            return _describe(meta, start_, end_, nth_)

        def on_demo_clip():
            return manager.serve_copy(manager.demo_clip(), "demo-clip.mp4")

        def on_render(tok, path, lora_files, embedding_files, *values):
            tok = manager.check_token(tok)
            try:
                job = manager.submit(tok, path, settings_from(values), lora_files or [], embedding_files or [])
            except UIError as e:  # the job being watched (if any) stays the one Cancel acts on
                return tok, gr.skip(), _error_html(str(e))
            return tok, job.id, ""

        def on_cancel(tok, jid):
            try:
                manager.cancel(tok, jid)
            except UIError as e:
                return _error_html(str(e))
            return ""

        def on_resume(tok, jid):
            try:
                job = manager.resume(tok, jid)
            except UIError as e:
                return jid, _error_html(str(e))
            return job.id, ""

        async def watch(tok, jid):
            """Follow a job until it ends: every change of its progress, place in line or previews."""
            try:
                job = manager.job(tok, jid)
            except UIError:
                job = None
            if job is None:
                yield (gr.skip(),) * len(watch_outputs)
                return
            seen, seen_previews, first = None, None, True
            while True:
                version = job.version
                if version != seen:
                    seen = version
                    terminal = job.status in TERMINAL
                    preview_update = gr.skip()
                    if job.preview_version != seen_previews:
                        seen_previews = job.preview_version
                        preview_update = list(job.previews.values())  # (image, caption); one C-level copy
                    video_update = download_update = gr.skip()
                    if terminal and job.status == "done" and job.output_path and job.output_path.is_file():
                        served = manager.serve_copy(job.output_path, Path(job.input_name).stem + "-diffutoon.mp4")
                        video_update = served
                        download_update = gr.update(value=served, visible=True)
                    elif first:
                        video_update, download_update = None, gr.update(value=None, visible=False)
                    message_update = (_error_html(job.message) if job.status == "failed" else "") if terminal \
                        else gr.skip()
                    yield (status_html(job, manager.place(job)), message_update, preview_update, video_update,
                           download_update, gr.update(interactive=terminal),
                           gr.update(interactive=job.status in ("queued", "running")),
                           gr.update(visible=job.status in ("cancelled", "failed")))
                    first = False
                    if terminal:
                        return
                await asyncio.sleep(0.1)

        app.load(on_load, [token], [token, job_id], **private).then(
            watch, [token, job_id], watch_outputs, concurrency_limit=None, **private)
        upload.change(on_upload, [upload, start, end, every_nth], [info_state, info, message, end], **private)
        for box in (start, end, every_nth):
            box.change(on_trim, [info_state, start, end, every_nth], [info], **private)
        demo_clip.click(on_demo_clip, None, [upload], **private)
        render.click(on_render, [token, upload, loras, embeddings, *settings_inputs], [token, job_id, message],
                     concurrency_limit=4, **private).then(
            watch, [token, job_id], watch_outputs, concurrency_limit=None, **private)
        cancel.click(on_cancel, [token, job_id], [message], **private)
        resume.click(on_resume, [token, job_id], [job_id, message], **private).then(
            watch, [token, job_id], watch_outputs, concurrency_limit=None, **private)

    launch_kwargs = dict(css=CSS, max_file_size=int(manager.limits.max_upload_mb * 2**20), footer_links=[],
                         allowed_paths=[], blocked_paths=[str(manager.data_dir)])
    return app, launch_kwargs


def serve(args, block=True):
    """`diffutoon ui`: load the models once, queue again the renders a previous run left unfinished, serve the page
    until Ctrl-C. block=False (tests, notebooks) returns (app, manager) with the server running in the background:
    stop it with app.close() and manager.stop()."""
    _import_gradio()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    models = load_models(args)
    data_dir = Path(args.data_dir or os.environ.get("DIFFUTOON_UI_DATA")
                    or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffutoon" / "ui")
    limits = default_limits(models.kind, models.accelerator, args)
    manager = JobManager(models, data_dir, limits, keep_days=args.keep_days).start()
    app, launch_kwargs = build_app(manager)
    if models.is_demo:
        print(cli.DEMO_DISCLAIMER, file=sys.stderr)
    print(f"data folder: {manager.data_dir}", file=sys.stderr)
    app.queue(default_concurrency_limit=4)
    if not block:
        app.launch(server_name=args.host, server_port=args.port, quiet=True, prevent_thread_lock=True,
                   **launch_kwargs)
        return app, manager
    try:
        app.launch(server_name=args.host, server_port=args.port, quiet=args.quiet, **launch_kwargs)
    except KeyboardInterrupt:
        pass
    finally:
        manager.stop()
    print("diffutoon ui: stopped; unfinished renders continue at the next start", file=sys.stderr)
    return 0
