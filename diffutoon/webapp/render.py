"""The worker of each accelerator: runs a job's render through the pipeline (its long-render API when it has one),
with the job's style files, progress, previews and Cancel acting within seconds at every stage."""

from __future__ import annotations

import contextlib
import inspect
import time

import numpy as np

from .. import cli
from .. import video as vio
from .loading import PipelineFeatures, _windows, pipeline_kwargs
from .progress import COLOR_CAPTION, ProgressAdapter, _Cancelled
from .settings import UIError, one_line
from . import look
from .styles import style_files


class Renderer:
    """JobManager's part that renders (needs: models, _cond, _pending, _stopping, check, _touch, _changed_locked,
    _prune, log)."""

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
        if args.scene_cuts == "auto":
            adapter.stage("cuts", 0, 0)
        job.live["scene_cuts"] = look.resolve(args, reader, indices, height, width)  # keyframes, scene cuts
        if job.cancel_requested:
            raise _Cancelled()
        pipe._interrupt = False
        with style_files(pipe, job, self.models.base_loras, settings.lora_scale), cancel_hooks(pipe, job), \
                look.style_adapter(pipe, args, self.models.ip_adapter):
            result = self._call_pipeline(pipe, features, adapter, (adapter.recording(slot.detector), edit_extra),
                                         reader, indices, args, height, width, out, fps, job)
        if result is not None:  # frames: write them at the source's timing with its sound
            adapter.stage("writing", 0, 1)
            vio.write_video(out, result, fps, audio_from=audio, audio_span=span, overwrite=True, progress=False)
        if not out.is_file():
            raise UIError("the render finished without writing its video")
        job.output = out.name
        adapter.stage("done", 1, 1)

    def _call_pipeline(self, pipe, features, adapter, detectors, reader, indices, args, height, width, out, fps, job):
        """One pipeline call; returns uint8 frames to write, or None when the pipeline wrote `out` itself."""
        if features.streams_output:  # the pipeline reads, renders and writes (with the source's audio) itself
            out.unlink(missing_ok=True)
            video = vio.VideoClip(reader.path, indices=indices, height=height, width=width,
                                  policy="crop" if args.resize == "short_side" else args.resize)
            kwargs = pipeline_kwargs(args, pipe, video, *detectors)
            kwargs.update(output_path=str(out), fps=fps)
        else:
            video = self._read(reader, indices, height, width, args.resize, adapter)
            if not (video.size and len(video)):
                raise UIError("no frames selected")
            kwargs = pipeline_kwargs(args, pipe, video, *detectors)
            kwargs["prompt"] = cli._prompt_schedule(args, indices, reader.fps)  # positions: the source's frames
            if not args.edit_prompt:  # without the editing branch the tile ControlNet sees the video itself
                adapter.set_preview("tile", video[0], "Colour (the video)")
        kwargs.pop("progress_callback", None)  # the CLI's prints the memory plan; the page shows it
        _supported(kwargs, features)
        if features.render_dir:
            kwargs["render_dir"] = str(job.render_dir)
        if features.progress_callback:
            kwargs["progress_callback"] = adapter.callback
        if not features.progress_callback:
            kwargs["callback_on_step_end"] = adapter.on_step_end
        with adapter.tracking_bars() if not features.progress_callback else contextlib.nullcontext():
            output = pipe(**kwargs)
        if getattr(output, "interrupted", False) or job.cancel_requested or self._stopping:
            raise _Cancelled()  # the render folder stays; diffusers' "decode the last step" result is dropped
        if getattr(output, "report", None):  # the quality report, also when the progress dict did not carry it
            job.live["report"] = output.report
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


def _supported(kwargs, features):
    """Drop the arguments of features left off that this version of the pipeline lacks; a feature asked for that it
    lacks is one line."""
    if "kwargs" in features.params:
        return
    for key in [k for k in kwargs if k not in features.params]:
        if kwargs[key] not in (None, [], {}, "chunks"):
            raise UIError(f"this version of the pipeline has no {key}: leave its setting at its default")
        del kwargs[key]


def _edit_window_defaults(pipe):
    params = inspect.signature(pipe.make_color_video).parameters if hasattr(pipe, "make_color_video") else {}
    length = params["context_length"].default if "context_length" in params else 8
    stride = params["context_stride"].default if "context_stride" in params else 4
    return length, stride


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