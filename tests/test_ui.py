"""The web app (`diffutoon.webapp`: its engine, and its page `webapp.page`) without a browser, with the tiny models:
jobs end to end, the pipeline's own progress, the CLI's messages, limits, the queue, Cancel / Resume, a restart,
LoRAs and textual inversions per render, and the long-render API of CONTRACT.md on a stand-in pipeline.

Sizes: 8 frames of 32x32 at 8 fps (1 s, with sound), 2 steps, windows of 4 with stride 2 (3 windows a step).
"""

import argparse
import ast
import inspect
import json
import re
import shutil
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from diffutoon import cli
from diffutoon.webapp.loading import Models, PipelineFeatures, Slot, load_models, pipeline_kwargs
from diffutoon.webapp.manager import JobManager
from diffutoon.webapp.progress import read_condition_previews, status_html
from diffutoon.webapp.settings import Limits, Settings, UIError, page_message, parse_render_args
from diffutoon import video as vio
from test_cli import local_models  # noqa: F401 (fixture: tiny models saved as real ones are laid out)

ROOT = Path(__file__).resolve().parents[1]
FRAMES, SIZE, FPS = 8, 32, 8
TIMEOUT = 120


@pytest.fixture(scope="module")
def models():
    return load_models(argparse.Namespace(demo_models=True, device="cpu", dtype="auto"), log=lambda m: None)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return vio.make_demo_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", FRAMES, SIZE, SIZE, FPS, overwrite=True)


@pytest.fixture
def manager(models, tmp_path):
    m = JobManager(models, tmp_path / "data", log=lambda msg: None).start()
    yield m
    m.stop()


def small(**kw):
    return Settings(**{**dict(width=SIZE, height=SIZE, steps=2, context_length=4, context_stride=2, edit_size=SIZE,
                                edit_steps=2, negative_prompt=""), **kw})


def decode(path):
    reader = vio.VideoReader(path)
    return vio.read_frames(reader, range(reader.num_frames), progress=False)


def record(manager):
    """Every progress dict the manager announces, in order."""
    events = []
    manager.observers.append(lambda job: events.append(dict(job.progress)))
    return events


def first_occurrences(items):
    seen = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


def assert_in_order(seq, expected):
    """`expected` appear in `seq` in this order (others may come between)."""
    positions = [seq.index(x) for x in expected]
    assert positions == sorted(positions), (seq, expected)


def cli_message(capfd, argv, paths):
    """The one line `diffutoon render` prints for argv, after "error: ", in the page's words."""
    assert cli.main(argv) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    core = err[0].split(": error: ", 1)[1]
    core = re.sub(r" \((see `diffutoon render --help`|rerun with --debug for details)\)$", "", core)
    return page_message(core, paths)


# ------------------------------------------------------------------------------------------------ a render
def test_render_job_end_to_end_with_the_pipelines_own_progress(manager, clip, tmp_path):
    events = record(manager)
    token = manager.new_token()
    job = manager.submit(token, clip, small())
    assert manager.wait(job, TIMEOUT) == "done", job.message

    # the stages in the pipeline's order, every window of every step reported, as the pipeline counts them (its bars
    # today; its progress_callback once it has one: both conventions for a step's last window are accepted)
    assert_in_order(first_occurrences(e["stage"] for e in events), ["conditions", "denoising", "decoding", "done"])
    assert events[-1]["stage"] == "done"
    windows = len(__import__("pipeline_diffutoon").sliding_windows(FRAMES, 4, 2))
    assert windows == 3
    denoising = [e for e in events if e["stage"] == "denoising"]
    done = [e["done"] for e in denoising]
    assert done == sorted(done) and set(range(1, 2 * windows + 1)) <= set(done)
    assert all(e["total"] == 2 * windows and e["steps"] == 2 and e["windows"] == windows for e in denoising)
    for e in denoising:
        k = e["done"]
        assert (e["step"], e["window"]) in ((k // windows, k % windows), ((k - 1) // windows, (k - 1) % windows + 1))
    conditions = [e["done"] for e in events if e["stage"] == "conditions"]
    assert conditions == sorted(conditions) and conditions[-1] == FRAMES
    assert any(e["eta_seconds"] for e in denoising)

    # the result: the clip's length, frame rate and sound
    out = job.output_path
    assert out.is_file() and out.parent == job.dir
    info = vio.probe(out)
    assert info["has_audio"]
    assert abs(info["duration"] - FRAMES / FPS) <= 1 / FPS
    reader = vio.VideoReader(out)
    assert (reader.num_frames, reader.fps, reader.size) == (FRAMES, FPS, (SIZE, SIZE))

    # previews: every lineart frame made, and the tile ControlNet's input
    assert set(job.previews) == {"lineart", "tile"}
    assert job.previews["lineart"][1] == f"Lineart {FRAMES}/{FRAMES}"
    html = status_html(job)
    assert 'data-state="done"' in html and "Done in" in html

    # the app adds nothing to the pipeline: the same call made directly gives the same frames
    slot = manager.models.slots[0]
    args = parse_render_args(small().argv(clip))
    frames = vio.read_frames(vio.VideoReader(clip), range(FRAMES), SIZE, SIZE, progress=False)
    direct = slot.pipe(**pipeline_kwargs(args, slot.pipe, frames, slot.detector))
    direct_path = vio.write_video(tmp_path / "direct.mp4", vio.to_uint8(direct.frames[0]), FPS, progress=False)
    np.testing.assert_array_equal(decode(out), decode(direct_path))


def test_the_settings_are_the_clis_command_line(clip, tmp_path):
    """Each control of the page stands for the option of `diffutoon render` (parsed by the CLI's own parser)."""
    import PIL.Image

    settings = small(edit_prompt="night", seed=5, every_nth=2, fast="lightning-4", max_vram="12GB",
                     scene_cuts="0.5s, 6", prompt_at="0.5s=night\n\n 6=rain, dusk ", style_scale=0.3,
                     keyframes=[[0.25, "0-a.png"]], style_image="s.png")
    (tmp_path / "style").mkdir()
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "style" / "s.png")
    ours = parse_render_args(settings.argv(clip, tmp_path))
    theirs = cli.build_parser().parse_args(
        ["render", str(clip), "--start=0s", "--every-nth=2", "--prompt", settings.prompt, "--negative-prompt=",
         "--edit-prompt", "night", "--edit-steps=2", f"--edit-height={SIZE}", f"--edit-width={SIZE}",
         f"--height={SIZE}", f"--width={SIZE}", "--resize=crop", f"--short-side={SIZE}", "--context-length=4",
         "--context-stride=2", "--lineart-scale=0.5", "--tile-scale=0.5", "--seed=5", "--decode-chunk-size=8",
         "--scene-cuts", "0.5s, 6", "--fast", "lightning-4", "--max-vram", "12GB", "--prompt-at", "0.5s=night",
         "--prompt-at", "6=rain, dusk", "--keyframe", f"0.25s={tmp_path / 'keyframes' / '0-a.png'}"])
    assert ours.style_image == tmp_path / "style" / "s.png" and ours.style_scale == 0.3
    ours.style_image, ours.style_scale = None, 0.6  # (the CLI checks the image file while parsing)
    assert vars(ours) == vars(theirs)
    assert (ours.steps, ours.guidance_scale) == (10, 7.0)  # Fast draft: the preset sets them, as `--fast` alone


def test_bad_uploads_and_settings_give_the_clis_messages(manager, clip, tmp_path, capfd):
    data = clip.read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.mp4").write_text("this is not a video\n")
    token = manager.new_token()
    for name in ("truncated.mp4", "notes.mp4"):
        path = tmp_path / name
        expected = cli_message(capfd, ["render", str(path), "-o", str(tmp_path / "o.mp4")], {path: name})
        with pytest.raises(UIError) as inspected:
            manager.inspect(path)
        with pytest.raises(UIError) as submitted:
            manager.submit(token, path, small())
        assert str(inspected.value) == str(submitted.value) == expected
        assert str(tmp_path) not in expected and name in expected

    cases = [  # page settings, the same on the command line, what the page says
        (dict(context_length=4, context_stride=4), ["--context-length", "4", "--context-stride", "4"],
         "Window stride (4) must be smaller than Window length (4): the sliding windows must overlap"),
        (dict(steps=0), ["--steps", "0"], "Steps: must be >= 1, got 0"),
        (dict(start=10.0), ["--start", "10s"], "empty frame range: start=80, end=8, but clip.mp4 has 8 frames "
                                               "(1.00 s at 8 fps); change Start/End"),
        (dict(height=36), ["--height", "36"], "Height: must be a multiple of 8, got 36 (e.g. 32)"),
    ]
    for settings, argv, words in cases:
        expected = cli_message(capfd, ["render", str(clip), "-o", str(tmp_path / "o.mp4"), *argv], {clip: clip.name})
        with pytest.raises(UIError) as e:
            manager.submit(token, clip, small(**settings))
        assert str(e.value) == expected == words

    with pytest.raises(UIError, match=r"LoRA style.txt: not a weights file"):
        manager.submit(token, clip, small(), loras=[tmp_path / "style.txt"])
    # the app keeps serving
    job = manager.submit(token, clip, small())
    assert manager.wait(job, TIMEOUT) == "done"


def test_size_length_and_frame_limits(models, clip, tmp_path):
    m = JobManager(models, tmp_path / "data", Limits(max_upload_mb=0.01), log=lambda msg: None)
    size = clip.stat().st_size
    with pytest.raises(UIError) as e:
        m.inspect(clip)
    # the file's size in the limit's unit, and the limits as configured (not rounded to "0 s")
    assert str(e.value) == (f"clip.mp4 is {size / 2**20:.3g} MB; this app takes videos up to 0.01 MB: shorten or "
                            "compress it first")
    m.limits = Limits(max_seconds=0.5)
    with pytest.raises(UIError, match=r"^clip.mp4 is 1 s long; this app takes videos up to 0.5 s: cut it shorter"):
        m.inspect(clip)
    m.limits = Limits(max_frames=4)
    token = m.new_token()
    with pytest.raises(UIError, match="the selected part has 8 frames; this app renders at most 4 frames"):
        m.submit(token, clip, small())
    m.submit(token, clip, small(every_nth=2))  # 4 frames: accepted (queued; no worker started here)
    # every n-th frame keeps the length (each frame lasts n source frames): a large n that would stretch it is refused
    m.limits = Limits()
    with pytest.raises(UIError) as e:
        m.submit(m.new_token(), clip, small(every_nth=6))
    assert str(e.value) == ("Every n-th frame: 6 keeps 2 of the 8 selected frames, and the result would last 1.5 s "
                            "instead of 1 s: use 4 or less, or select a longer part")
    m.stop()


# ------------------------------------------------------------------------------------------------ several users
def test_queue_one_render_at_a_time_with_places_and_private_jobs(manager, clip):
    gate, first_window = threading.Event(), threading.Event()

    def hold(job):  # keep the first render running while the others queue up
        if job is jobs[0] and job.progress.get("stage") == "denoising" and not gate.is_set():
            first_window.set()
            gate.wait(TIMEOUT)

    manager.observers.append(hold)
    tokens = [manager.new_token() for _ in range(3)]
    jobs = [manager.submit(tokens[0], clip, small())]
    assert first_window.wait(TIMEOUT)
    jobs += [manager.submit(t, clip, small(seed=i)) for i, t in enumerate(tokens[1:], 1)]
    try:
        assert [j.status for j in jobs] == ["running", "queued", "queued"]
        assert [manager.place(j) for j in jobs] == [(0, 1), (1, 1), (2, 1)]
        assert "you are number 2. 1 render is ahead of you (1 running now" in status_html(jobs[2], manager.place(jobs[2]))
        # a session sees only its own jobs, and one active render each
        assert manager.job(tokens[1], jobs[0].id) is None and manager.job(tokens[0], jobs[0].id) is jobs[0]
        with pytest.raises(UIError, match="no such render"):
            manager.cancel(tokens[1], jobs[0].id)
        with pytest.raises(UIError, match="already have a render"):
            manager.submit(tokens[0], clip, small())
        assert manager.session_dir(tokens[0]) != manager.session_dir(tokens[1])
        assert jobs[0].dir.parent == manager.session_dir(tokens[0])
    finally:
        gate.set()
    for job in jobs:
        assert manager.wait(job, TIMEOUT) == "done"
    spans = sorted((j.started, j.finished) for j in jobs)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # never two at once on the one accelerator
    assert [j.started for j in jobs] == sorted(j.started for j in jobs)  # first come, first served


def test_cancel_stops_at_the_next_window_and_keeps_the_folder(manager, clip):
    events = record(manager)
    token = manager.new_token()

    def cancel_after_first_window(job):
        if job.progress.get("stage") == "denoising" and job.progress.get("done") == 1 and not job.cancel_requested:
            t = threading.Thread(target=manager.cancel, args=(token, job.id))  # as the page does: another thread
            t.start()
            t.join()

    manager.observers.append(cancel_after_first_window)
    job = manager.submit(token, clip, small())
    assert manager.wait(job, TIMEOUT) == "cancelled"
    manager.observers.remove(cancel_after_first_window)
    assert max(e["done"] for e in events if e["stage"] == "denoising") == 1  # no window after the cancel
    assert events[-1]["stage"] in ("denoising", "interrupted")
    assert job.message.startswith("Cancelled at step 1 of 2.")
    assert job.dir.is_dir() and job.input_path.is_file() and job.output is None
    assert json.loads((job.dir / "job.json").read_text())["status"] == "cancelled"
    assert manager.models.slots[0].pipe._interrupt is False

    # Resume (this pipeline cannot continue a render: it starts again), then another user's render still works
    assert 'data-state="cancelled"' in status_html(job)
    manager.resume(token, job.id)
    assert manager.wait(job, TIMEOUT) == "done" and job.attempts == 2
    other = manager.submit(manager.new_token(), clip, small())
    assert manager.wait(other, TIMEOUT) == "done"

    # a job cancelled while waiting never starts
    gate = threading.Event()
    manager.observers.append(lambda j: gate.wait(TIMEOUT) if j is other2 else None)
    other2 = manager.submit(manager.new_token(), clip, small())
    waiting_token = manager.new_token()
    waiting = manager.submit(waiting_token, clip, small())
    manager.cancel(waiting_token, waiting.id)
    gate.set()
    assert manager.wait(waiting, TIMEOUT) == "cancelled" and waiting.started is None
    assert manager.wait(other2, TIMEOUT) == "done"


def test_restarted_app_runs_the_jobs_it_had_not_finished(models, clip, tmp_path):
    first = JobManager(models, tmp_path / "data", log=lambda msg: None)  # never started: its jobs stay queued
    token, crashed_token = first.new_token(), first.new_token()
    waiting = first.submit(token, clip, small())
    running = first.submit(crashed_token, clip, small(seed=1))
    running.status, running.attempts = "running", 1  # as a crash mid-render leaves it
    running.save()
    old = first.submit(first.new_token(), clip, small(seed=2))
    old.status, old.finished = "done", old.created - 8 * 86400  # finished longer than --keep-days (7) ago
    old.save()
    first.stop()

    second = JobManager(models, tmp_path / "data", log=lambda msg: None).start()
    try:
        job, other = second.job(token, waiting.id), second.job(crashed_token, running.id)
        assert job is not None and other is not None and job is not waiting
        assert not old.dir.exists()  # removed at start
        assert second.wait(job, TIMEOUT) == "done" and second.wait(other, TIMEOUT) == "done"
        assert other.attempts == 2 and other.note == "resumed after a restart of the app"  # the render folder
        assert job.output_path.is_file() and other.output_path.is_file()
        assert second.latest(token) is job
    finally:
        second.stop()


# ------------------------------------------------------------------------------------------------ styles
def _kohya_lora(pipe, path):
    gen = torch.Generator().manual_seed(2)
    state = {}
    for name, module in pipe.unet.named_modules():
        name = name.removesuffix(".base_layer")  # a layer that already carries a LoRA (loaded at start)
        if isinstance(module, torch.nn.Linear) and ".attentions." in name and name.endswith(("to_q", "to_k", "to_v")):
            out_features, in_features = module.weight.shape
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(4, in_features, generator=gen)
            state[f"{key}.lora_up.weight"] = torch.randn(out_features, 4, generator=gen)
            state[f"{key}.alpha"] = torch.tensor(4.0)
    from safetensors.torch import save_file

    save_file(state, str(path))
    return path


def test_loras_and_embeddings_apply_to_one_render_only(manager, clip, tmp_path):
    pipe = manager.models.slots[0].pipe
    lora = _kohya_lora(pipe, tmp_path / "toon style.safetensors")
    dim = pipe.text_encoder.get_input_embeddings().embedding_dim
    embedding = tmp_path / "toonword.pt"
    torch.save({"toonword": torch.randn(1, dim, generator=torch.Generator().manual_seed(3))}, embedding)
    rows, vocab = pipe.text_encoder.get_input_embeddings().num_embeddings, len(pipe.tokenizer)

    token = manager.new_token()
    outputs = []
    for files in ({}, {"loras": [lora], "embeddings": [embedding]}, {}):
        job = manager.submit(token, clip, small(prompt="toonword, best quality", lora_scale=0.8), **files)
        assert manager.wait(job, TIMEOUT) == "done", job.message
        outputs.append(decode(job.output_path))
        assert not any("lora" in type(m).__name__.lower() for m in pipe.unet.modules())
        assert (pipe.text_encoder.get_input_embeddings().num_embeddings, len(pipe.tokenizer)) == (rows, vocab)
    assert job.loras == [] and (job.dir / "loras").is_dir()
    assert not np.array_equal(outputs[0], outputs[1])  # the style did something
    np.testing.assert_array_equal(outputs[0], outputs[2])  # and left nothing behind


def test_a_broken_lora_or_embedding_is_refused_in_one_line_naming_the_file(models, clip, tmp_path):
    """Refused when Render is pressed (nothing queued): one line naming the file and what it is not, no library
    internals (safetensors' SafetensorError, diffusers' OSError with server paths)."""
    from safetensors.torch import save_file

    manager = JobManager(models, tmp_path / "data", log=lambda msg: None)  # not started: nothing renders
    token = manager.new_token()
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "broken.pt").write_bytes(b"not a pickle")
    save_file({"unet.conv_in.weight": torch.zeros(2, 2)}, tmp_path / "checkpoint.safetensors")
    cases = [("loras", "broken.safetensors", "LoRA broken.safetensors: this is not a LoRA: "),
             ("embeddings", "broken.safetensors", "Textual inversion broken.safetensors: this is not a textual "
                                                  "inversion (embedding): "),
             ("embeddings", "broken.pt", "Textual inversion broken.pt: this is not a textual inversion (embedding): "),
             ("loras", "checkpoint.safetensors", "LoRA checkpoint.safetensors: this is not a LoRA: it holds no LoRA "
                                                 "weights")]
    for kind, name, expected in cases:
        with pytest.raises(UIError) as e:
            manager.submit(token, clip, small(), **{kind: [tmp_path / name]})
        message = str(e.value)
        assert message.startswith(expected) and "\n" not in message, message
        assert "Safetensor" not in message and "Error" not in message and str(tmp_path) not in message
    assert manager.jobs(token) == []


def test_the_pipelines_live_keys_reach_the_page(models, tmp_path):
    """A progress dict with the pipeline's extra keys (issues 17-19) through the adapter: the page shows the live
    preview under the bar with its step, the memory plan, the scene cuts, and at the end the quality report."""
    from html import escape

    from diffutoon.report import summary
    from diffutoon.webapp.jobs import Job
    from diffutoon.webapp.progress import ProgressAdapter

    manager = JobManager(models, tmp_path / "data", log=lambda msg: None)  # not started
    folder = tmp_path / "data" / "sessions" / "s" / "20260101-000000-abcdef"
    (folder / "render" / "previews").mkdir(parents=True)
    job = Job("20260101-000000-abcdef", "s", folder, "clip.mp4", vars(small()), status="running")
    preview = folder / "render" / "previews" / "latest.png"
    preview.write_bytes(b"png")
    adapter = ProgressAdapter(job, types.SimpleNamespace(_interrupt=False), lambda j: None, FRAMES, 3)
    report = {"warping_error": 12.5, "seam_score": 1.02, "pixel_mae": 30.0}
    adapter.callback({"stage": "denoising", "step": 0, "steps": 2, "window": 3, "windows": 3, "done": 3, "total": 6,
                      "preview": str(preview), "preview_step": 1, "preview_steps": 2, "scene_cuts": [3, 6],
                      "memory_plan": "32x32, 1.0 GB free: nothing to save: 0.1 GB estimated"})
    assert manager.live_preview_file(job) == "render/previews/latest.png"  # served from the job's folder
    html = status_html(job, preview="diffutoon/file/x/render/previews/latest.png?v=1")
    assert "Drawing: step 2 of 2, window 1 of 3" in html
    assert "Memory: 32x32, 1.0 GB free: nothing to save: 0.1 GB estimated" in html
    assert "Scene cuts at frames 3, 6: 3 shots, each rendered on its own." in html
    assert re.search(r'<figure class="dt-live" id="dt-live"><img src="diffutoon/file/x/render/previews/latest.png'
                     r'\?v=1" alt="Live preview after step 1 of 2">', html)
    assert escape(summary(report)) not in html
    adapter.callback({"stage": "done", "report": report, "scene_cuts": []})  # keys kept until the pipeline says otherwise
    job.status = "done"
    html = status_html(job, preview="diffutoon/file/x/render/previews/latest.png?v=1")
    assert escape(summary(report)) in html and "Scene cuts: none found, one shot." in html and "Memory: 32x32" in html
    assert "dt-live" not in html  # the preview is for a running render; the result is the video
    job.dir.joinpath("job.json").parent.mkdir(parents=True, exist_ok=True)
    job.save()
    assert Job.load(job.dir).live["report"] == report  # kept for the page after a reload


def test_editing_prompt_runs_the_editing_branch_with_its_progress_and_colour_preview(manager, clip):
    events = record(manager)
    job = manager.submit(manager.new_token(), clip, small(edit_prompt="orange dress, night"))
    assert manager.wait(job, TIMEOUT) == "done", job.message
    order = first_occurrences((e["stage"], e["pass"]) for e in events)
    assert_in_order(order, [("conditions", "edit"), ("edit", "edit"), ("fastblend", "edit"), ("conditions", "main"),
                            ("denoising", "main"), ("done", "main")])
    assert {"lineart", "colors"} <= set(job.previews)  # the render folder's conditions, as they are written
    assert job.previews["colors"][1] == "Colour (edited)"


# ------------------------------------------------------------------------------------------------ the contract's API
class FakeClip:
    """CONTRACT.md's diffutoon.video.VideoClip, enough for the stand-in pipeline below."""

    def __init__(self, path, indices=None, height=None, width=None, policy="crop"):
        self.reader = vio.VideoReader(path)
        self.path, self.indices = Path(path), list(indices if indices is not None else range(self.reader.num_frames))
        self.height, self.width, self.policy = height, width, policy
        self.fps = self.reader.fps

    def __len__(self):
        return len(self.indices)

    @property
    def shape(self):
        return (len(self.indices), self.height, self.width, 3)

    def audio_span(self):
        return self.reader.span(self.indices)

    def read(self, start, end):
        return vio.resize_frames(self.reader.read(self.indices[start:end]), self.height, self.width, self.policy)


class ContractPipeline:
    """A stand-in with the long-render API of CONTRACT.md and no model: conditions in the render folder (npy +
    .done), a progress dict after every window and stage, `_interrupt` honoured at the next window with the folder
    kept, resumption from the last completed step, the output streamed to output_path with the source's audio."""

    def __init__(self):
        self._interrupt = False
        self.calls, self.resumed_at = [], []

    def __call__(self, video=None, prompt="", negative_prompt="", height=None, width=None, num_inference_steps=10,
                 guidance_scale=7.0, context_length=16, context_stride=8, controlnet_conditioning_scale=0.5,
                 clip_skip=1, strength=1.0, generator=None, output_type="pil", decode_chunk_size=8,
                 lineart_detector=None, callback_on_step_end=None, edit_prompt=None, edit_kwargs=None,
                 render_dir=None, fresh=False, keep_render_dir=False, output_path=None, fps=None,
                 progress_callback=None):
        from pipeline_diffutoon import sliding_windows

        self._interrupt = False
        self.calls.append(dict(render_dir=render_dir, output_path=output_path, fps=fps, video=video,
                               callback_on_step_end=callback_on_step_end))
        frames = video.read(0, len(video))
        n, steps = len(frames), num_inference_steps
        windows = len(sliding_windows(n, context_length, context_stride))
        folder = Path(render_dir)
        (folder / "conditions").mkdir(parents=True, exist_ok=True)
        state = folder / "state.json"
        start = json.loads(state.read_text())["step"] if state.exists() else 0
        self.resumed_at.append(start)

        def report(stage, **kw):
            progress_callback({"stage": stage, "pass": "main", "frames": n, "step": 0, "steps": steps, "window": 0,
                               "windows": windows, "done": 0, "total": 0, "started_at": 0.0, "updated_at": 0.0,
                               "eta_seconds": None, **kw})

        if start == 0:
            lineart = np.lib.format.open_memmap(folder / "conditions" / "0-lineart.npy", "w+", np.uint8, frames.shape)
            lineart[:] = 255 - frames
            lineart.flush()
            (folder / "conditions" / "0-lineart.done").write_bytes(b"\x01")
            report("conditions", done=n, total=n)
        for step in range(start, steps):
            for window in range(windows):
                if self._interrupt:
                    report("interrupted", step=step, window=window)
                    return types.SimpleNamespace(frames=None, interrupted=True, color_frames=None)
                report("denoising", step=step, window=window + 1, done=step * windows + window + 1,
                       total=steps * windows, eta_seconds=1.0)
            state.write_text(json.dumps({"step": step + 1}))
        report("writing", done=0, total=1)
        vio.write_video(output_path, frames, fps, audio_from=video.path, audio_span=video.audio_span(),
                        overwrite=True, progress=False)
        report("done", done=1, total=1)
        if not keep_render_dir:
            shutil.rmtree(folder)
        return types.SimpleNamespace(frames=None, path=output_path, interrupted=False, color_frames=None)


class LookPipeline(ContractPipeline):
    """The stand-in, with the arguments of issues 17-19 recorded, a distilled adapter's config and IP-Adapter calls."""

    config = {"motion_adapter_kind": "lightning-4"}

    def __init__(self):
        super().__init__()
        from diffusers import DDIMScheduler

        self.scheduler, self.seen, self.ip_calls = DDIMScheduler(), [], []

    def __call__(self, *, render_dir=None, output_path=None, progress_callback=None, fast_mode=None,
                 memory_budget=None, scene_cuts=None, keyframes=None, ip_adapter_image=None, **kwargs):
        self.seen.append(dict(fast_mode=fast_mode, memory_budget=memory_budget, scene_cuts=scene_cuts,
                              keyframes=keyframes, ip_adapter_image=ip_adapter_image, **kwargs))
        known = inspect.signature(ContractPipeline.__call__).parameters
        return super().__call__(render_dir=render_dir, output_path=output_path, progress_callback=progress_callback,
                                **{k: v for k, v in kwargs.items() if k in known})

    def load_ip_adapter(self, *args, **kwargs):
        self.ip_calls.append(("load", args, kwargs))

    def set_ip_adapter_scale(self, scale):
        self.ip_calls.append(("scale", scale))

    def unload_ip_adapter(self):
        self.ip_calls.append(("unload",))


def test_each_control_reaches_the_pipeline_call(clip, tmp_path, monkeypatch):
    """Fast draft, Max GPU memory, prompts at times, scene cuts, a keyframe and a style image: checked when Render is
    pressed (the CLI's messages), then passed to the pipeline as `diffutoon render` passes them."""
    import PIL.Image

    monkeypatch.setattr(vio, "VideoClip", FakeClip, raising=False)
    pipe = LookPipeline()
    ip = tmp_path / "ip" / "ip-adapter_sd15.bin"
    ip.parent.mkdir()
    ip.write_bytes(b"")  # a local file: loaded from its folder (the stand-in loads nothing)
    models = Models("real", [Slot("cpu", pipe)], has_edit=False, summary="stand-in", ip_adapter=str(ip))
    manager = JobManager(models, tmp_path / "data", log=lambda msg: None).start()
    frame = vio.read_frames(vio.VideoReader(clip), [2], progress=False)[0]
    PIL.Image.fromarray(255 - frame).save(tmp_path / "painted.png")
    PIL.Image.fromarray(frame[::2, ::2]).save(tmp_path / "style.png")
    token = manager.new_token()
    try:
        settings = small(fast="auto", max_vram="3GB", prompt_at="0.5s=night\n6=rain", scene_cuts="0.75s",
                         style_scale=0.3)
        job = manager.submit(token, clip, settings, keyframes=[(0.25, tmp_path / "painted.png")],
                             style_image=tmp_path / "style.png")
        assert manager.wait(job, TIMEOUT) == "done", job.message
        seen = pipe.seen[0]
        assert seen["fast_mode"] == "auto" and seen["memory_budget"] == "3GB"
        assert (seen["num_inference_steps"], seen["guidance_scale"]) == (10, 7.0)  # the preset replaces them
        assert seen["prompt"] == {0: settings.prompt, 4: "night", 6: "rain"}
        assert seen["scene_cuts"] == [6] and job.live["scene_cuts"] == [6]
        assert list(seen["keyframes"]) == [2]
        np.testing.assert_array_equal(seen["keyframes"][2], 255 - frame)
        assert np.array_equal(np.asarray(seen["ip_adapter_image"]), frame[::2, ::2])
        assert pipe.ip_calls == [("load", (str(ip.parent),), {"subfolder": "", "weight_name": ip.name}),
                                 ("scale", 0.3), ("unload",)]  # for this render only
        assert job.settings["keyframes"] == [[0.25, "0-painted.png"]] and job.settings["style_image"] == "style.png"
        assert (job.dir / "keyframes" / "0-painted.png").is_file() and (job.dir / "style" / "style.png").is_file()

        job = manager.submit(token, clip, small())  # all off: none of them (scene cuts: none found)
        assert manager.wait(job, TIMEOUT) == "done", job.message
        seen = pipe.seen[1]
        assert (seen["fast_mode"], seen["memory_budget"], seen["keyframes"], seen["ip_adapter_image"]) == (None,) * 4
        assert seen["scene_cuts"] == [] and seen["prompt"] == small().prompt and len(pipe.ip_calls) == 3

        # refused when Render is pressed, in the CLI's words, and nothing is left in the session
        for kw, message in [
                (dict(prompt_at="9s=night"), "Prompts at times 72: outside the rendered frames 0..7 of the input "
                                             "(Start/End); use Prompt for the prompt at the start"),
                (dict(prompt_at="night"), "Prompts at times: expected POSITION=PROMPT"),
                (dict(scene_cuts="soon"), "Scene cuts"),
                (dict(max_vram="lots"), "Max GPU memory: "),
                (dict(fast="lcm-4"), "Fast draft 'lcm-4' does not fit this pipeline's motion adapter, "
                                     "AnimateDiff-Lightning 4-step: use 'lightning-4'")]:
            with pytest.raises(UIError) as e:
                manager.submit(token, clip, small(**kw))
            assert str(e.value).startswith(message), str(e.value)
        with pytest.raises(UIError, match="Keyframe 5s="):
            manager.submit(token, clip, small(), keyframes=[(5, tmp_path / "painted.png")])
        pipe.config = {}  # an ordinary motion adapter: Fast draft is not there; no IP-Adapter: no style image
        with pytest.raises(UIError, match="Fast draft needs a distilled motion adapter"):
            manager.submit(token, clip, small(fast="auto"))
        models.ip_adapter = None
        with pytest.raises(UIError, match="A style image needs an IP-Adapter"):
            manager.submit(token, clip, small(), style_image=tmp_path / "style.png")
        assert len(manager.jobs(token)) == 2 and len(list(job.dir.parent.iterdir())) == 2
    finally:
        manager.stop()


def test_the_long_render_api_is_used_when_the_pipeline_has_it(clip, tmp_path, monkeypatch):
    monkeypatch.setattr(vio, "VideoClip", FakeClip, raising=False)
    pipe = ContractPipeline()
    features = PipelineFeatures.of(pipe)
    assert features.progress_callback and features.render_dir and features.streams_output and features.resumable
    models = Models("real", [Slot("cpu", pipe)], has_edit=False, summary="the contract's stand-in")
    manager = JobManager(models, tmp_path / "data", log=lambda msg: None).start()
    token = manager.new_token()
    seen = []

    def watch(job):
        seen.append((dict(job.progress), status_html(job)))
        p = job.progress
        if p.get("stage") == "denoising" and p.get("step") == 1 and p.get("window") == 2 and len(pipe.calls) == 1:
            t = threading.Thread(target=manager.cancel, args=(token, job.id))
            t.start()
            t.join()

    manager.observers.append(watch)
    try:
        job = manager.submit(token, clip, small(steps=3))
        assert manager.wait(job, TIMEOUT) == "cancelled"
        call = pipe.calls[0]
        assert call["render_dir"] == str(job.render_dir) and call["output_path"] == str(job.dir / "result.mp4")
        assert call["fps"] == FPS and isinstance(call["video"], FakeClip) and call["callback_on_step_end"] is None
        assert (call["video"].indices, call["video"].height, call["video"].width) == (list(range(FRAMES)), SIZE, SIZE)
        # the page shows the pipeline's dict as is, and the lineart from the render folder as it was written
        progress, html = next((p, h) for p, h in seen if p.get("stage") == "denoising" and p["done"] == 5)
        assert "Drawing: step 2 of 3, window 3 of 3 \u00b7 about 1 s left" in html
        assert job.previews["lineart"][1] == f"Lineart {FRAMES}/{FRAMES}"
        np.testing.assert_array_equal(job.previews["lineart"][0],
                                      255 - FakeClip(clip, None, SIZE, SIZE).read(FRAMES - 1, FRAMES)[0])
        assert job.message.startswith("Cancelled at step 2 of 3. Its render folder is kept")
        assert json.loads((job.render_dir / "state.json").read_text()) == {"step": 1}

        manager.resume(token, job.id)
        assert manager.wait(job, TIMEOUT) == "done", job.message
        assert pipe.resumed_at == [0, 1] and pipe.calls[1]["render_dir"] == call["render_dir"]
        assert not job.render_dir.exists()  # keep_render_dir=False: the pipeline removed it after writing
        info = vio.probe(job.output_path)
        assert info["has_audio"] and abs(info["duration"] - FRAMES / FPS) <= 1 / FPS
    finally:
        manager.stop()


def test_condition_previews_show_only_completed_chunks(tmp_path):
    folder = tmp_path / "render" / "conditions"
    folder.mkdir(parents=True)
    frames = np.arange(40, dtype=np.uint8)[:, None, None, None] * np.ones((40, 4, 4, 3), np.uint8)
    np.save(folder / "0-lineart.npy", frames)
    (folder / "0-lineart.done").write_bytes(b"\x01\x00\x00")
    assert read_condition_previews(tmp_path / "render")["lineart"][1] == "Lineart 16/40"
    assert read_condition_previews(tmp_path / "render")["lineart"][0].max() == 15
    (folder / "0-lineart.done").write_bytes(b"\x01\x01\x01")
    assert read_condition_previews(tmp_path / "render")["lineart"][1] == "Lineart 40/40"
    (folder / "1-tile.done").write_bytes(b"\x00\x00\x00")
    np.save(folder / "1-tile.npy", frames)
    assert set(read_condition_previews(tmp_path / "render")) == {"lineart"}


# ------------------------------------------------------------------------------------------------ models, page, setup
def test_no_models_means_labelled_demo_models_and_an_explicit_base_must_load(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    args = cli.build_parser().parse_args(["ui", "--device", "cpu"])
    models = load_models(args, log=lambda m: None)
    assert models.is_demo and "stable-diffusion-v1-5/stable-diffusion-v1-5" in models.reason
    assert "--base" in models.reason

    args = cli.build_parser().parse_args(["ui", "--base", "./models/anime.safetensors"])
    with pytest.raises(cli.CLIError, match=r"^--base ./models/anime.safetensors: no such file or folder"):
        load_models(args, log=lambda m: None)


def test_real_models_from_the_render_options_with_start_up_styles_kept(local_models, clip, tmp_path):
    """--base and the other model options of `diffutoon render` load through the CLI's own loading (here local
    folders of tiny models): no demo label, the start-up LoRA and embedding stay, a user's LoRA comes and goes."""
    m = local_models
    args = cli.build_parser().parse_args([
        "ui", "--base", str(m / "base"), "--motion-adapter", str(m / "motion"), "--lineart-controlnet",
        str(m / "lineart"), "--tile-controlnet", str(m / "tile"), "--annotators", str(m / "annotators"),
        "--textual-inversion", str(m / "verybadimagenegative_v1.3.pt"),
        "--lora", f"{m / 'lora' / 'pytorch_lora_weights.safetensors'}@0.8", "--device", "cpu"])
    models = load_models(args, log=lambda msg: None)
    assert models.kind == "real" and not models.reason and str(m / "base") in models.summary
    assert not models.has_edit  # the editing ControlNets are neither local nor downloadable offline
    assert models.base_loras == (("lora0",), (0.8,))
    pipe = models.slots[0].pipe
    manager = JobManager(models, tmp_path / "data", log=lambda msg: None).start()
    try:
        assert manager.defaults.width == 384 and manager.defaults.negative_prompt == cli.DEFAULT_NEGATIVE_TOKEN
        token = manager.new_token()
        with pytest.raises(UIError, match="the editing prompt needs the editing ControlNets"):
            manager.submit(token, clip, small(edit_prompt="night"))
        outputs = []
        style = _kohya_lora(pipe, tmp_path / "style.safetensors")
        for files in ({}, {"loras": [style]}, {}):
            job = manager.submit(token, clip, small(steps=1, negative_prompt=cli.DEFAULT_NEGATIVE_TOKEN), **files)
            assert manager.wait(job, TIMEOUT) == "done", job.message
            outputs.append(decode(job.output_path))
            assert pipe.get_active_adapters() == ["lora0"]
            assert "verybadimagenegative_v1.3_9" in pipe.tokenizer.get_vocab()
        assert not np.array_equal(outputs[0], outputs[1])
        np.testing.assert_array_equal(outputs[0], outputs[2])
    finally:
        manager.stop()


def test_the_page_says_what_the_demo_models_are(manager):
    pytest.importorskip("gradio")
    from diffutoon.webapp import page as ui

    app, launch = ui.build_app(manager)
    html = [b.value for b in app.blocks.values() if type(b).__name__ == "HTML" and "dt-models" in str(b.value)]
    assert len(html) == 1 and "Demo mode: tiny random-weight models" in html[0]
    assert "coloured noise, not anime" in html[0] and manager.models.reason in html[0]
    # files: nothing served by its path; the data folder blocked; uploads capped
    assert launch["allowed_paths"] == [] and launch["blocked_paths"] == [str(manager.data_dir)]
    # Gradio's own cap (its toast, its units) only past twice the limit: up to there the app's message says it
    assert launch["max_file_size"] == int(2 * manager.limits.max_upload_mb * 2**20)
    assert manager.secret not in str(app.get_config_file())  # session folders stay unguessable
    served = Path(manager.serve_copy(manager.demo_clip(), "demo-clip.mp4"))
    assert not served.is_relative_to(manager.data_dir) and served.name == "demo-clip.mp4"
    from gradio.utils import is_allowed_file

    assert is_allowed_file(manager.data_dir / "demo-clip.mp4", launch["blocked_paths"], launch["allowed_paths"],
                           [])[0] is False


def test_ui_command_line(capfd, monkeypatch):
    from diffutoon.__main__ import main

    assert cli.main(["ui", "--help"]) == 0
    assert "--demo-models" in capfd.readouterr().out
    assert cli.main(["ui", "--port", "0"]) == 2
    err = capfd.readouterr().err.strip()
    assert err == "diffutoon ui: error: argument --port: must be >= 1, got 0 (see `diffutoon ui --help`)"
    monkeypatch.setitem(__import__("sys").modules, "gradio", None)  # Gradio not installed
    assert main(["ui", "--demo-models"]) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("diffutoon ui: error: the web app needs Gradio") and "pip install 'diffutoon[ui]'" in err


def test_the_style_images_ip_adapter_comes_from_the_ui_options(models, monkeypatch):
    from diffutoon.webapp import loading

    args = cli.build_parser().parse_args(["ui", "--ip-adapter", "me/my-ip-adapter"])
    assert loading._ip_adapter(args, log=lambda m: None) == "me/my-ip-adapter"
    monkeypatch.setattr(loading.M, "_uncached", lambda sources: sources)  # h94/IP-Adapter not in the cache
    said = []
    assert loading._ip_adapter(cli.build_parser().parse_args(["ui"]), log=said.append) is None
    assert said == ["no style image: h94/IP-Adapter is not cached (start with --ip-adapter to name one)"]
    assert Path(models.ip_adapter).is_file()  # the demo models bring a tiny one, in h94/IP-Adapter's layout
    assert (Path(models.ip_adapter).parent / "image_encoder").is_dir()


def test_setup_extras_and_ci_script():
    tree = ast.parse((ROOT / "setup.py").read_text())
    extras = next(ast.literal_eval(k.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                  for k in node.keywords if k.arg == "extras_require")
    from diffutoon.webapp.page import GRADIO_MIN

    assert f"gradio>={GRADIO_MIN}" in extras["ui"]
    assert set(extras["ui"]) <= set(extras["test"]) and any(r.startswith("selenium") for r in extras["test"])
    readme_command = 'pip install -e ".[test]" && python -m pytest -q -n 2 tests'
    assert readme_command in (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "chromium" in ci and "chromium-driver" in ci
    assert ci.rstrip().splitlines()[-1] == readme_command


def _package_imports(root):
    """{module: set of diffutoon modules it imports}, every import statement counted (also those inside functions)."""
    graph = {}
    for path in sorted((root / "diffutoon").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        package = parts[:-1]
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                stem = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{stem}.{a.name}" for a in node.names] + [stem]
            else:
                continue
            edges |= {t for t in targets if t.split(".")[0] == "diffutoon"}
        graph[name] = edges
    # "from . import video" names a module, "from .jobs import Job" an attribute of one: keep the modules
    return {m: {e if e in graph else e.rpartition(".")[0] for e in edges} & set(graph) - {m}
            for m, edges in graph.items()}


def test_the_package_imports_have_no_circle():
    """diffutoon.models is where models come from (the CLI and the web app both use it); the web app sits above the
    CLI; nothing imports in a circle, not even lazily inside a function. Each module imports and is readable."""
    import importlib

    graph = _package_imports(ROOT)
    assert "diffutoon.models" in graph["diffutoon.cli"] and "diffutoon.models" in graph["diffutoon.webapp.loading"]
    assert not any(m.startswith("diffutoon.webapp") for m in graph["diffutoon.cli"])
    order, state = [], {}

    def visit(m, path):
        if state.get(m) == "open":
            raise AssertionError("import circle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) != "done":
            state[m] = "open"
            for e in sorted(graph[m]):
                visit(e, path + [m])
            state[m] = "done"
            order.append(m)

    for m in graph:
        visit(m, [])
    for m in order:  # dependencies first
        importlib.import_module(m)
    for path in (ROOT / "diffutoon" / "webapp").glob("*.py"):
        assert len(path.read_text().splitlines()) <= 600, f"{path.name}: split it by concern"
