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
import time
import html
import os
import sys
from pathlib import Path

from .. import cli
from ..models import CLIError
from . import look, page_look
from .jobs import TERMINAL, VideoInfo
from .loading import load_models
from .manager import JobManager, TooLong
from .progress import status_html
from .settings import FIELDS, UIError, _duration, default_limits, form_values, settings_from_form
from .views import (COOKIE, CSS, FILE_ROUTE, MARK_FIELD_JS, SET_COOKIE_JS, SHOW_STATUS_JS, _banner, _error_html,
                    _limits_text, _url, input_html, previews_html, result_html, time_text)

GRADIO_MIN = "6.0"
SESSION_KEY = "diffutoon-ui-session"


def _import_gradio():
    try:
        import gradio as gr
    except ImportError as e:
        raise CLIError(f"the web app needs Gradio ({e}): pip install 'diffutoon[ui]' "
                           f"(or pip install 'gradio>={GRADIO_MIN}')") from e
    return gr


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
        session_box = gr.Textbox(visible=False)  # the same key, for the cookie that fetches this session's files
        job_id = gr.State(None)  # the job shown in the page (Cancel / Resume act on it)
        source = gr.State(None)  # (key, name) of the video in the form: an upload kept in the session, or a job's
        info_state = gr.State(None)  # the upload's VideoInfo as a dict
        confirmed = gr.State(None)  # the request confirmed after a time warning
        renders_version = gr.Number(0, visible=False)  # "Your renders" is drawn again when this changes

        gr.Markdown("# Diffutoon: turn a video into anime\nToon shading with diffusion models (Diffutoon, IJCAI "
                    "2024): the result keeps your video's frame rate, length and sound.")
        gr.HTML(_banner(manager))
        controls = {}

        def field(name, **extra):
            f = next(f for f in FIELDS if f.name == name)
            value = getattr(d, name) if name != "end" else (d.end or 0)
            choices = extra.pop("choices", list(f.choices))
            common = dict(label=f.label, value=value if f.kind != "radio" else value or None, elem_id=f.elem_id,
                          info=f.info or None)
            common.update(extra)
            if f.kind in ("number", "int"):  # ranges checked by the app, with the field's label (no Gradio toast)
                comp = gr.Number(precision=0 if f.kind == "int" else None, **common)
            elif f.kind == "slider":
                comp = gr.Slider(f.minimum, f.maximum, step=f.step, **common)
            elif f.kind == "radio":
                comp = gr.Radio(choices, **common)
            else:
                comp = gr.Textbox(lines=f.lines, placeholder=f.placeholder or None, **common)
            controls[name] = comp
            return comp

        with gr.Row():
            with gr.Column(scale=5):
                upload = gr.File(label=f"Your video (mp4, mov, mkv, webm, avi...; up to "
                                       f"{manager.limits.max_upload_mb:g} MB and {_duration(manager.limits.max_seconds)})",
                                 type="filepath", elem_id="dt-video")
                input_player = gr.HTML("", elem_id="dt-input")
                demo_clip = gr.Button("Use the demo clip (a photo with a moving camera, 2 s, with sound)",
                                      size="sm", elem_id="dt-demo-clip")
                info = gr.Markdown("", elem_id="dt-info")
                with gr.Accordion("Part of the video", open=True):
                    with gr.Row():
                        for name in ("start", "end", "every_nth"):
                            field(name)
                    field("scene_cuts")
                field("prompt")
                field("negative_prompt")
                with gr.Accordion("Editing (optional): recolour or relight", open=False):
                    field("edit_prompt", interactive=manager.models.has_edit)
                    if not manager.models.has_edit:
                        gr.Markdown("(Off: the editing ControlNets are not loaded.)")
                    field("edit_steps")
                with gr.Accordion("Size and quality", open=False):
                    with gr.Row():
                        field("width"), field("height")
                    field("shape")
                    with gr.Row():
                        field("steps"), field("guidance_scale")
                    with gr.Row():
                        field("context_length"), field("context_stride")
                    with gr.Row():
                        field("lineart_scale"), field("tile_scale")
                    field("seed")
                with gr.Accordion("Fast draft and memory", open=False):
                    fast = look.fast_choices(manager.models.slots[0].pipe)
                    field("fast", choices=fast, visible=bool(fast))
                    if not fast:
                        gr.Markdown(f"Fast draft: not available. {look.NO_FAST}", elem_id="dt-fast-missing")
                    field("max_vram")
                with gr.Accordion("Direct the look (optional): prompts over time, keyframes, a style image",
                                  open=False):
                    field("prompt_at")
                    extra = page_look.build(gr, manager)
                    if manager.models.ip_adapter:
                        field("style_scale")
                with gr.Accordion("Styles: LoRAs and textual inversions (your files)", open=False):
                    loras = gr.File(label="LoRA files (.safetensors) for SD1.5", file_count="multiple",
                                    type="filepath", elem_id="dt-loras")
                    field("lora_scale")
                    embeddings = gr.File(label="Textual inversions (.pt, .safetensors, .bin)", file_count="multiple",
                                         type="filepath", elem_id="dt-embeddings")
                    gr.Markdown("An embedding's word is its file name without the extension: with "
                                "`easynegative.pt`, write `easynegative` in a prompt. They are used for your "
                                "render only.")
                with gr.Group(elem_id="dt-actions"):
                    message = gr.HTML("", elem_id="dt-message")
                    with gr.Row():
                        render = gr.Button("Render", variant="primary", elem_id="dt-render")
                        cancel = gr.Button("Cancel", variant="stop", interactive=False, elem_id="dt-cancel")
                        resume = gr.Button("Resume", visible=False, elem_id="dt-resume")
                    status = gr.HTML(status_html(None), elem_id="dt-status")
            with gr.Column(scale=6):
                result = gr.HTML(result_html(None), elem_id="dt-result")
                previews = gr.HTML("", elem_id="dt-previews")

        gr.Markdown("## Your renders", elem_id="dt-renders-title")

        @gr.render(inputs=[token, renders_version])
        def renders_list(tok, _version):
            try:
                jobs = list(reversed(manager.jobs(tok))) if tok else []
            except UIError:
                jobs = []
            if not jobs:
                gr.Markdown("Nothing yet: your renders of the last days appear here.", elem_id="dt-renders-empty")
                return
            for job in jobs:
                with gr.Row(elem_classes="dt-render-row", elem_id=f"dt-render-{job.id}"):
                    gr.HTML(_render_row(job), min_height=0)
                    show = gr.Button("Show", size="sm", min_width=60, elem_classes="dt-show")
                    show.click(on_show(job.id), [token], [job_id, source, input_player, message, result, previews,
                                                          *restored], **private).then(
                        watch, [token, job_id], watch_outputs, concurrency_limit=None, **private)
                    if job.status in ("cancelled", "failed"):
                        again = gr.Button("Resume", size="sm", min_width=60, elem_classes="dt-resume-row")
                        again.click(on_resume_job(job.id), [token], [job_id, message], **private).then(
                            watch, [token, job_id], watch_outputs, concurrency_limit=None, **private)
                    if job.status in TERMINAL:
                        delete = gr.Button("Delete", size="sm", min_width=60, variant="stop",
                                           elem_classes="dt-delete-row")
                        delete.click(on_delete(job.id), [token, job_id, renders_version],
                                     [job_id, message, result, previews, status, renders_version], **private)

        gr.Markdown(_limits_text(manager)
                    + ("\n\n**About the demo models:** tiny networks with random weights, built in a second "
                       "without any download. Everything around them is real (reading the video, lineart, "
                       "sliding windows, decoding, the mp4 with sound), so they show the app works; the picture "
                       "itself is noise." if demo_models else ""), elem_id="dt-limits")

        settings_inputs = [controls[f.name] for f in FIELDS]
        restored = [*settings_inputs, *extra.times, extra.note]  # what a job puts back in the form
        watch_outputs = [status, previews, result, render, cancel, resume, renders_version]

        # -- handlers
        def _render_row(job):
            thumb = (f'<img src="{_url(job.id, "thumb.png")}" alt="">' if (job.dir / "thumb.png").is_file() else "")
            link = (f' \u00b7 <a href="{_url(job.id, job.output)}" download="{html.escape(Path(job.input_name).stem)}'
                    f'-diffutoon.mp4">Download</a>' if job.status == "done" and job.output else "")
            state = {"done": "done", "failed": "failed", "cancelled": "cancelled", "queued": "waiting in line",
                     "running": "running", "cancelling": "cancelling"}.get(job.status, job.status)
            return (f'<div class="dt-render-item" data-job="{job.id}" data-state="{job.status}">{thumb} '
                    f'<b>{html.escape(job.input_name)}</b> \u00b7 {html.escape(time_text(job.created))} \u00b7 '
                    f'{html.escape(job.settings_obj().summary())} \u00b7 <span class="dt-render-state">{state}</span>'
                    f'{link}</div>')

        def restore(tok, job):
            """The form as the job was made: its video in the player, its settings in the controls."""
            return ((job.id, job.input_name), input_html(job.id, job.input_name), result_html(job),
                    previews_html(manager, job), *form_values(job.settings_obj()), *page_look.restore(job))

        def on_load(tok):
            tok = manager.check_token(tok)
            job = manager.latest(tok)
            if job is None:
                return (tok, tok, None) + (gr.skip(),) * (4 + len(restored))
            return (tok, tok, job.id) + restore(tok, job)

        def on_show(jid):
            def show(tok):
                job = manager.job(tok, jid)
                if job is None:
                    return (gr.skip(),) * (6 + len(restored))
                key, player, res, prev, *values = restore(tok, job)
                return (job.id, key, player, "", res, prev, *values)
            return show

        def on_resume_job(jid):
            def again(tok):
                try:
                    job = manager.resume(tok, jid)
                except UIError as e:
                    return gr.skip(), _error_html(str(e))
                return job.id, ""
            return again

        def on_delete(jid):
            def delete(tok, current, version):
                try:
                    manager.delete(tok, jid)
                except UIError as e:
                    return gr.skip(), _error_html(str(e)), gr.skip(), gr.skip(), gr.skip(), gr.skip()
                if current == jid:
                    return None, "", result_html(None), "", status_html(None), (version or 0) + 1
                return gr.skip(), "", gr.skip(), gr.skip(), gr.skip(), (version or 0) + 1
            return delete

        def on_upload(tok, path, start_, end_, nth_):
            if not path:
                return None, "", "", gr.skip(), None, ""
            try:
                vi = manager.inspect(path)
                key = manager.keep_upload(manager.check_token(tok), path)
            except UIError as e:
                return None, "", _error_html(str(e)), gr.skip(), None, ""
            new_end = None
            if vi.selection(start_, end_, nth_) > manager.limits.max_frames:  # preselect a part that fits
                frames = manager.limits.max_frames * max(1, int(nth_ or 1))
                new_end = round((start_ or 0) + (frames - 0.5) / vi.fps, 3)
            meta = {"name": vi.name, "fps": vi.fps, "num_frames": vi.num_frames, "width": vi.width,
                    "height": vi.height, "has_audio": vi.has_audio, "size": vi.size}
            text = _describe(meta, start_, new_end if new_end is not None else end_, nth_)
            return (meta, text, "", new_end if new_end is not None else gr.skip(), (key, vi.name),
                    input_html(key, vi.name))

        def _describe(meta, start_, end_, nth_):
            if not meta:
                return ""
            vi = VideoInfo(**meta)
            nth = max(1, int(nth_ or 1))
            n = vi.selection(start_, end_ if isinstance(end_, (int, float)) else None, nth)
            selected = vi.selection(start_, end_ if isinstance(end_, (int, float)) else None, 1)
            fps = vi.fps / nth
            text = f"**{html.escape(vi.name)}**: {vi.describe().split(': ', 1)[1]}. Selected: **{n} frames** " \
                   f"({selected / vi.fps:.1f} s at {fps:g} fps)"
            if n > manager.limits.max_frames:
                text += f", more than the {manager.limits.max_frames} this app renders at a time"
            return text + "."

        def on_trim(meta, start_, end_, nth_):
            return _describe(meta, start_, end_, nth_)

        def on_pick(tok, src, seconds):
            try:
                return page_look.frame_picker(manager, manager.check_token(tok), src, seconds)
            except Exception:  # noqa: BLE001  a picker that cannot show a frame shows none
                return ""

        def on_demo_clip():
            return manager.serve_copy(manager.demo_clip(), "demo-clip.mp4")

        def on_render(tok, jid, src, path, lora_files, embedding_files, confirmed_, style_image, *values):
            tok = manager.check_token(tok)
            n = page_look.KEYFRAME_SLOTS
            keyframes, style_image = page_look.inputs(values[:n], values[n:2 * n], style_image)
            values = values[2 * n:]

            def refused(text):  # the message stays; the result on screen is marked as the previous one
                previous = manager.job(tok, jid) if jid else None
                return (tok, gr.skip(), _error_html(text), result_html(previous, previous=True) if previous
                        else gr.skip(), confirmed_ if isinstance(text, str) else None)

            try:
                settings = settings_from_form(values, d)
                video = path or manager.source_path(tok, src)
                request = repr((str(video), [str(p) for p in lora_files or []], [str(p) for p in embedding_files or []],
                                settings, keyframes, style_image))
                job = manager.submit(tok, video, settings, lora_files or [], embedding_files or [],
                                     confirmed=confirmed_ == request, keyframes=keyframes, style_image=style_image)
            except TooLong as e:
                previous = manager.job(tok, jid) if jid else None
                return (tok, gr.skip(), _error_html(str(e)), result_html(previous, previous=True) if previous
                        else gr.skip(), request)
            except UIError as e:  # the job being watched (if any) stays the one Cancel acts on
                return refused(str(e))
            return tok, job.id, "", result_html(job), None

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

        def live_url(job):
            live = manager.live_preview_file(job)
            return _url(job.id, live, job.live.get("preview_step", "")) if live else None

        async def watch(tok, jid):
            """Follow a job until it ends: every change of its progress, place in line or previews. It never
            touches the message: that belongs to the last action, and stays until the next one."""
            try:
                job = manager.job(tok, jid)
            except UIError:
                job = None
            if job is None:
                yield (gr.skip(),) * len(watch_outputs)
                return
            seen, seen_previews, seen_status, first = None, None, None, True
            while True:
                version = job.version
                if version != seen:
                    seen = version
                    terminal = job.status in TERMINAL
                    preview_update = gr.skip()
                    if job.preview_version != seen_previews or first:
                        seen_previews = job.preview_version
                        preview_update = previews_html(manager, job)
                    # a job that has ended is on screen already (drawn by load / Show / a refused Render, which
                    # marks it as the previous result): only a change of state draws it again
                    changed = job.status != seen_status and not (first and terminal)
                    result_update = result_html(job) if changed else gr.skip()
                    list_update = time.time() if job.status != seen_status else gr.skip()
                    seen_status = job.status
                    yield (status_html(job, manager.place(job), wait=manager.wait_seconds(job),
                                       preview=live_url(job)), preview_update,
                           result_update, gr.update(interactive=terminal),
                           gr.update(interactive=job.status in ("queued", "running")),
                           gr.update(visible=job.status in ("cancelled", "failed")), list_update)
                    first = False
                    if terminal:
                        return
                await asyncio.sleep(0.1)

        app.load(on_load, [token], [token, session_box, job_id, source, input_player, result, previews,
                                    *restored], **private).then(
            None, [session_box], None, js=SET_COOKIE_JS, **private).then(
            watch, [token, job_id], watch_outputs, concurrency_limit=None, **private)
        upload.change(on_upload, [token, upload, controls["start"], controls["end"], controls["every_nth"]],
                      [info_state, info, message, controls["end"], source, input_player], **private)
        for name in ("start", "end", "every_nth"):
            controls[name].change(on_trim, [info_state, controls["start"], controls["end"], controls["every_nth"]],
                                  [info], **private)
        demo_clip.click(on_demo_clip, None, [upload], **private)
        for time_, picker in zip(extra.times, extra.pickers):  # the frame picker: your video at the keyframe's time
            time_.change(on_pick, [token, source, time_], [picker], **private)
        source.change(lambda tok, src, *times: [on_pick(tok, src, t) for t in times], [token, source, *extra.times],
                      extra.pickers, **private)
        render.click(None, None, None, js=SHOW_STATUS_JS, **private)
        cancel.click(None, None, None, js=SHOW_STATUS_JS, **private)
        render.click(on_render, [token, job_id, source, upload, loras, embeddings, confirmed, extra.style,
                                 *extra.images, *extra.times, *settings_inputs],
                     [token, job_id, message, result, confirmed], concurrency_limit=4, **private).then(
            None, None, None, js=MARK_FIELD_JS, **private).then(
            watch, [token, job_id], watch_outputs, concurrency_limit=None, **private)
        cancel.click(on_cancel, [token, job_id], [message], **private)
        resume.click(on_resume, [token, job_id], [job_id, message], **private).then(
            watch, [token, job_id], watch_outputs, concurrency_limit=None, **private)

    # uploads: Gradio refuses files over twice the limit itself; up to that, the app's check says it in its words
    launch_kwargs = dict(css=CSS, max_file_size=int(2 * manager.limits.max_upload_mb * 2**20), footer_links=[],
                         allowed_paths=[], blocked_paths=[str(manager.data_dir)])
    return app, launch_kwargs


def private_files(manager):
    """A FastAPI app for Gradio to run the page in, with the route of this session's files: the browser sends the
    session's key as a cookie; without it 403, another session's or a removed job's file 404. Nothing is copied into
    Gradio's shared cache, so `--keep-days` and Delete remove everything."""
    from fastapi import Request
    from fastapi.responses import FileResponse, PlainTextResponse
    from gradio.routes import App

    fastapi_app = App()

    def session_file(key, name, request):
        token = request.cookies.get(COOKIE)
        if not token:
            return PlainTextResponse("this file belongs to a session: open the page first", status_code=403)
        path = manager.file(token, key, name)
        if path is None:
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(path, headers={"Cache-Control": "private, no-store"})

    # real classes, not this module's postponed (string) annotations: FastAPI resolves strings in the module's
    # globals, where Request is not, and would take `request` for a query parameter (422)
    session_file.__annotations__ = {"key": str, "name": str, "request": Request}
    fastapi_app.get(f"/{FILE_ROUTE}/{{key}}/{{name:path}}")(session_file)

    return fastapi_app


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
    launch_kwargs["_app"] = private_files(manager)
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
