"""Issue 16, "nothing lost, nothing silent": what a hostile new user broke, each case refused in one line or handled.

Section 1: data loss and false success (a full disk, foreign folders, the input as output, two threads); section 2:
real videos (display rotation, variable frame rate, GIFs); section 3: the render folder's identity; section 4: bad
values before any work, messages in the CLI's words, litter. Videos are made with the ffmpeg binary imageio-ffmpeg
ships; a full disk is a small tmpfs (skipped where it cannot be mounted).
"""

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from render_job import N, build, job
from test_cli import assert_one_line_error
from test_video_io import GREY, make_source

from diffutoon import cli, render_folder
from diffutoon import video as vio
from diffutoon.render_folder import RenderFolder, RenderFolderError, format_bytes


@pytest.fixture(scope="module")
def reference():
    """The job's frames from a freshly built pipeline."""
    return build()(**job()).frames[0]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A grey-coded mp4 with sound: 12 frames at 12 fps, 48x64."""
    return make_source(tmp_path_factory.mktemp("clip") / "clip.mp4", n=12)


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: a disk that fills up for real."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path, leave: int):
    """Fill `disk` up to `leave` free bytes."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * max(free - leave, 0))


def ffmpeg(*args):
    subprocess.run([vio.ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *map(str, args)], check=True)


def interrupted(pipe, folder, **overrides):
    """A render stopped in the middle of step 1, its folder kept."""
    def stop(progress):
        if progress.get("step") == 1 and progress.get("window") == 1:
            pipe._interrupt = True
    assert pipe(**job(**overrides), render_dir=folder, progress_callback=stop).interrupted


# ------------------------------------------------------------------------------------------------ 1. data loss
def test_a_full_disk_while_writing_png_frames_is_an_error_and_the_render_resumes(job_pipe, reference, small_disk,
                                                                                 tmp_path, caplog):
    fill(small_disk, 8 << 10)  # room for about two frames
    folder, out = tmp_path / "render", small_disk / "frames"
    with pytest.raises(vio.VideoError, match="disk holding .* is full"):
        job_pipe(**job(output_type="pil"), render_dir=folder, output_path=out)
    assert not out.exists() and not list(small_disk.glob(".frames.partial-*"))  # no half output
    assert json.loads((folder / "manifest.json").read_text())["passes"]["main"]["completed_steps"] == 3  # kept
    (small_disk / "filler").unlink()
    job_pipe(**job(output_type="pil"), render_dir=folder, output_path=out)
    assert "resuming the main pass after its last step (3 of 3 done)" in caplog.text  # not "step 4 of 3"
    written = np.stack([np.asarray(PIL.Image.open(p)) for p in sorted(out.iterdir())])
    assert np.abs(written.astype(int) - (reference * 255).round()).max() <= 1 and not folder.exists()


def test_a_full_disk_fails_deflicker_and_video_writing_in_one_line(clip, small_disk, capfd, monkeypatch):
    monkeypatch.setattr(vio, "check_room", lambda path, size: None)  # the disk fills up during the work
    fill(small_disk, 0)
    out = small_disk / "smooth.mp4"
    assert cli.main(["deflicker", str(clip), "-o", str(out), "--window-size", "1", "--max-frames", "4", "--device",
                     "cpu", "-q"]) == 2
    assert_one_line_error(capfd.readouterr().err, "is full")
    assert not out.exists() and [p.name for p in small_disk.iterdir()] == ["filler"]
    frames = np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(vio.VideoError, match="is full"):
        vio.write_frames_folder(small_disk / "png", frames, progress=False)
    assert [p.name for p in small_disk.iterdir()] == ["filler"]


def test_only_this_projects_render_folders_are_recognised_and_deleted(tmp_path):
    identity = {"settings": {"generator": "a"}}
    foreign = tmp_path / "webapp"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"name": "my web app", "icons": []}')
    (foreign / "index.html").write_text("mine")
    for fresh in (False, True):
        with pytest.raises(RenderFolderError, match="not a render folder this tool made") as error:
            RenderFolder(foreign, identity, fresh=fresh)
        assert "fresh" not in str(error.value)  # no advice that would delete it
    assert sorted(p.name for p in foreign.iterdir()) == ["index.html", "manifest.json"]
    # ours, with a garbage, empty or non-dict manifest, or an empty lock: recoverable with fresh, and it says so
    ours = tmp_path / "ours"
    RenderFolder(ours, identity).close(success=False)
    for bad in ("{garbage", "", "[1, 2]"):
        (ours / "manifest.json").write_text(bad)
        with pytest.raises(RenderFolderError, match=r"unreadable.*fresh=True \(--fresh\)"):
            RenderFolder(ours, identity)
        RenderFolder(ours, identity, fresh=True).close(success=False)
    (ours / "lock").write_text("")
    with pytest.raises(RenderFolderError, match=r"lock .* empty.*--fresh"):
        RenderFolder(ours, identity)
    RenderFolder(ours, identity, fresh=True).close(success=False)
    assert (ours / "manifest.json").exists() and not (ours / "lock").exists()


def test_an_empty_work_dir_the_user_made_stays_and_a_new_one_goes(tmp_path):
    made = tmp_path / "mine"
    made.mkdir()
    with RenderFolder(made, {}) as run:
        run.frames("conditions/0-lineart", (2, 8, 8, 3), np.uint8)
        run.finish()
    assert made.is_dir() and not list(made.iterdir())
    with RenderFolder(tmp_path / "new" / "parts", {}) as run:
        run.finish()
    assert not (tmp_path / "new" / "parts").exists()


def test_overwrite_of_an_existing_folder_deletes_only_our_frames(clip, tmp_path, capfd):
    out = tmp_path / "frames"
    vio.write_frames_folder(out, np.zeros((2, 8, 8, 3), np.uint8), progress=False)
    vio.write_frames_folder(out, np.ones((3, 8, 8, 3), np.uint8), overwrite=True, progress=False)  # ours: replaced
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "00002.png"]
    (out / "notes.txt").write_text("mine")
    assert cli.main(["render", str(clip), "-o", str(out), "--overwrite"]) == 2
    assert_one_line_error(capfd.readouterr().err, "not frames this tool wrote (notes.txt")
    with pytest.raises(FileExistsError, match="not frames this tool wrote"):
        vio.write_frames_folder(out, np.zeros((1, 8, 8, 3), np.uint8), overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "mine"


def test_the_api_refuses_the_input_as_output_and_an_existing_output_without_overwrite(job_pipe, clip, tmp_path):
    source = tmp_path / "in.mp4"
    source.write_bytes(clip.read_bytes())
    (tmp_path / "symlink.mp4").symlink_to(source)
    os.link(source, tmp_path / "hardlink.mp4")
    calls = []
    hook = job_pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for name in ("in.mp4", "symlink.mp4", "hardlink.mp4"):
            with pytest.raises(ValueError, match="is the input video"):
                job_pipe(**job(video=str(source)), output_path=tmp_path / name, overwrite=True)
        (tmp_path / "old.mp4").write_bytes(b"precious")
        with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
            job_pipe(**job(video=str(source)), output_path=tmp_path / "old.mp4")
    finally:
        hook.remove()
    assert not calls and source.read_bytes() == clip.read_bytes()
    assert (tmp_path / "old.mp4").read_bytes() == b"precious"


def test_two_threads_on_one_pipeline_both_get_the_right_frames(job_pipe, reference):
    results, errors = [None, None], []
    calls = [job(), job()]  # made here: the tiny detector's weights come from the global torch seed

    def render(k):
        try:
            results[k] = job_pipe(**calls[k]).frames[0]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=render, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(np.array_equal(r, reference) for r in results)


def test_a_call_inside_a_call_is_refused_in_one_line(job_pipe):
    def again(progress):
        job_pipe(**job())

    with pytest.raises(RuntimeError, match="already rendering in this thread"):
        job_pipe(**job(), progress_callback=again)


def test_a_call_failing_mid_window_leaves_the_pipeline_as_it_was(job_pipe, reference):
    before = [(name, type(m)) for name, m in job_pipe.unet.named_modules()]
    calls = []

    def fail(*args):
        calls.append(1)
        if len(calls) == 2:  # the second window's UNet call
            raise RuntimeError("injected")

    hook = job_pipe.unet.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            job_pipe(**job())
    finally:
        hook.remove()
    assert [(name, type(m)) for name, m in job_pipe.unet.named_modules()] == before
    assert np.array_equal(job_pipe(**job()).frames[0], reference)


# ------------------------------------------------------------------------------------------------ 2. real videos
@pytest.mark.parametrize("degrees,turns", [(90, 1), (180, 2), (-90, 3)])
def test_display_rotation_is_applied_as_players_do(clip, tmp_path, degrees, turns):
    rotated = tmp_path / "phone.mp4"
    ffmpeg("-display_rotation", degrees, "-i", clip, "-c", "copy", rotated)
    upright = vio.VideoReader(clip).read(range(12))
    reader = vio.VideoReader(rotated)
    w, h = (48, 64) if turns % 2 else (64, 48)
    assert reader.size == (w, h) and reader.num_frames == 12 and reader.fps == pytest.approx(12)
    # the display matrix rotates counter-clockwise: np.rot90 is the independent reference
    assert np.array_equal(reader.read(range(12)), np.rot90(upright, turns, axes=(1, 2)))
    assert vio.target_size(reader.height, reader.width, policy="short_side", short_side=48) == \
        ((64, 48) if turns % 2 else (48, 64))
    chunks = list(reader.iter_chunks(range(2, 11), chunk_size=4))  # chunked reads, forward and back
    assert np.array_equal(np.concatenate(chunks), reader.read(range(2, 11))) and reader.read([0, 11]).shape[0] == 2


def test_variable_frame_rate_keeps_the_duration_picking_frames_by_timestamp(tmp_path):
    frames = np.stack([np.full((48, 64, 3), GREY(i), np.uint8) for i in range(18)])
    cfr = vio.write_video(tmp_path / "cfr.mp4", frames, 10, progress=False)
    pts = [i / 10 if i < 10 else 1 + (i - 10) / 4 for i in range(18)]  # 10 fps for 1 s, then 4 fps
    ffmpeg("-i", cfr, "-vf", "setpts='if(lt(N,10),N/10,1+(N-10)/4)/TB'", "-fps_mode", "vfr", "-c:v", "libx264",
           "-crf", "0", tmp_path / "vfr.mp4")
    reader = vio.VideoReader(tmp_path / "vfr.mp4")
    assert pts[-1] <= reader.duration <= pts[-1] + 0.25 + 1e-6  # was 18 frames at 10 fps = 1.8 s
    greys = reader.read(range(reader.num_frames)).reshape(reader.num_frames, -1).mean(1)
    for k, grey in enumerate(greys):  # each output frame shows the source frame on screen at its middle
        shown = max(i for i in range(18) if pts[i] <= (k + 0.5) / reader.fps)
        assert abs(grey - GREY(shown)) < 3, (k, shown)
    clip = vio.VideoClip(reader)
    assert clip.audio_span() == pytest.approx((0, reader.duration))


def test_animated_gifs_are_read(tmp_path):
    frames = np.stack([np.full((32, 48, 3), GREY(i * 3), np.uint8) for i in range(8)])
    vio.write_video(tmp_path / "a.mp4", frames, 8, progress=False)
    ffmpeg("-i", tmp_path / "a.mp4", tmp_path / "a.gif")
    reader = vio.VideoReader(tmp_path / "a.gif")
    assert (reader.num_frames, reader.size) == (8, (48, 32)) and reader.fps == pytest.approx(8, rel=0.05)
    greys = reader.read(range(8)).reshape(8, -1).mean(1)
    assert np.allclose(greys, [GREY(i * 3) for i in range(8)], atol=4)


# ------------------------------------------------------------------------------------------------ 3. identity
def test_operational_settings_resume_and_annotator_weights_do_not(job_pipe, reference, tmp_path):
    from diffutoon.tiny import tiny_lineart_detector

    folder = tmp_path / "render"
    interrupted(job_pipe, folder)
    with pytest.raises(RenderFolderError, match="lineart_detector differs"):
        job_pipe(**job(lineart_detector=tiny_lineart_detector(seed=1)), render_dir=folder)
    out = job_pipe(**job(decode_chunk_size=3), render_dir=folder)  # README's advice after running out of memory
    assert np.allclose(out.frames[0], reference, atol=1e-6)


def test_the_whole_input_is_hashed_once(clip, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUTOON_CACHE", str(tmp_path / "cache"))
    video = tmp_path / "v.mp4"
    video.write_bytes(clip.read_bytes())
    first = render_folder.file_fingerprint(video)
    hashed = []
    sha256_file = render_folder.sha256_file
    monkeypatch.setattr(render_folder, "sha256_file", lambda path: hashed.append(path) or sha256_file(path))
    assert render_folder.file_fingerprint(video) == first and not hashed  # unchanged: not read again
    time.sleep(0.05)  # a later edit (the file system's clock may tick in milliseconds)
    data = bytearray(video.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte in the middle, the same size
    video.write_bytes(bytes(data))
    assert render_folder.file_fingerprint(video)["sha256"] != first["sha256"] and len(hashed) == 1


# ------------------------------------------------------------------------------------------------ 4. bad values
@pytest.mark.parametrize("argv,needle", [
    (["--lineart-scale", "nan"], "--lineart-scale"), (["--tile-scale", "inf"], "--tile-scale"),
    (["--guidance-scale", "1e30"], "--guidance-scale"), (["--guidance-scale", "nan"], "--guidance-scale"),
    (["--fps", "inf"], "--fps"), (["--fps", "1e-9"], "--fps"), (["--fps", "nan"], "--fps"),
    (["--start", "inf"], "--start"), (["--seed", "1" * 25], "--seed"), (["--device", "foo"], "--device foo"),
])
def test_absurd_cli_values_are_one_line_before_any_model_loads(clip, tmp_path, capfd, monkeypatch, argv, needle):
    monkeypatch.setattr(cli, "_load_pipeline", lambda *a: pytest.fail("models loaded"))
    monkeypatch.setattr(cli, "_check_sources", lambda *a: pytest.fail("models looked up"))
    assert cli.main(["render", str(clip), "-o", str(tmp_path / "o.mp4"), *argv]) == 2
    assert_one_line_error(capfd.readouterr().err, needle)


@pytest.mark.parametrize("kwargs,message", [
    (dict(controlnet_conditioning_scale=float("nan")), "controlnet_conditioning_scale must be numbers"),
    (dict(guidance_scale=1e30), "guidance_scale must be a number in"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a number in"),
    (dict(fps=float("inf")), "fps must be"), (dict(fps=1e-9), "fps must be"), (dict(fps=float("nan")), "fps must be"),
    (dict(num_inference_steps=2.5), "num_inference_steps must be a whole number"),
    (dict(height=0), "height and width must be positive multiples of 8"),
])
def test_absurd_api_values_are_one_line_before_any_model_runs(job_pipe, kwargs, message):
    calls = []
    hook = job_pipe.vae.register_forward_pre_hook(lambda *a: calls.append(1))
    hooks = [hook] + [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in (job_pipe.unet,
                                                                                         job_pipe.text_encoder)]
    try:
        with pytest.raises(ValueError, match=message):
            job_pipe(**job(**kwargs))
    finally:
        for h in hooks:
            h.remove()
    assert not calls


def test_in_memory_checks_the_output_location_first(clip, tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(cli, "_load_pipeline", lambda *a: pytest.fail("models loaded"))
    (tmp_path / "afile").write_text("x")
    assert cli.main(["render", str(clip), "-o", str(tmp_path / "afile" / "out.mp4"), "--in-memory"]) == 2
    assert_one_line_error(capfd.readouterr().err, "is a file, not a folder")
    monkeypatch.setattr(vio.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    assert cli.main(["render", str(clip), "-o", str(tmp_path / "frames"), "--in-memory"]) == 2
    assert_one_line_error(capfd.readouterr().err, "MiB free")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_deflicker_no_longer_offers_render_folder_options(clip, tmp_path, capfd):
    assert "--work-dir" not in cli.build_parser()._subparsers._group_actions[0].choices["deflicker"].format_help()
    assert cli.main(["deflicker", str(clip), "-o", str(tmp_path / "o.mp4"), "--fresh"]) == 2
    assert "unrecognized arguments: --fresh" in capfd.readouterr().err


def test_cli_messages_use_option_names_and_say_rerun_only_when_it_helps(clip, tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(cli, "_check_sources", lambda sources: None)
    monkeypatch.setattr(cli, "_check_model_limits", lambda args: None)
    monkeypatch.setattr(cli, "_load_pipeline", lambda args, device, dtype: (None, None))
    folder = tmp_path / "parts"
    RenderFolder(folder, {"settings": {"generator": "generator 1"}}).close(success=False)

    def pipeline(args, pipe, clip, detector, edit_extra=None, render_dir=None, **kwargs):  # opens the folder as it does
        with RenderFolder(render_dir, {"settings": {"generator": "generator 2"}}, fresh=kwargs["fresh"]):
            raise OSError(28, "No space left on device")  # a full disk mid-render: resumable

    monkeypatch.setattr(cli, "_run_pipeline", pipeline)
    argv = ["render", str(clip), "-o", str(tmp_path / "o.mp4"), "--work-dir", str(folder), "--device", "cpu", "-q"]
    assert cli.main(argv) == 2
    err = capfd.readouterr().err
    assert_one_line_error(err, "--seed differs", "--fresh")
    assert "settings.generator" not in err and "fresh=True" not in err and "run the same command again" not in err
    (folder / "lock").write_text(f"{os.getpid()} {os.uname().nodename}")
    assert cli.main(argv) == 2
    err = capfd.readouterr().err
    assert_one_line_error(err, "in use by process")
    assert "run the same command again" not in err and "render_folder.RenderFolderError" not in err
    (folder / "lock").unlink()
    assert cli.main([*argv, "--fresh"]) == 2  # now the disk fills: that one a rerun resumes
    assert_one_line_error(capfd.readouterr().err, "is full", "run the same command again")


def test_stale_partial_outputs_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = tmp_path / f".o.mp4.partial-{dead.pid}", tmp_path / f".o.mp4.partial-{os.getppid()}"
    stale.write_bytes(b"torn")
    live.write_bytes(b"being written")
    vio.write_video(tmp_path / "o.mp4", np.zeros((2, 8, 8, 3), np.uint8), 8, progress=False)
    assert not stale.exists() and live.exists()
    (tmp_path / f".png.partial-{dead.pid}").mkdir()
    vio.write_frames_folder(tmp_path / "png", np.zeros((1, 8, 8, 3), np.uint8), progress=False)
    assert not (tmp_path / f".png.partial-{dead.pid}").exists()


def test_sizes_are_shown_in_sensible_units():
    assert [format_bytes(n) for n in (500, 5 << 20, 3 << 29, 20 << 30)] == ["500 bytes", "5.0 MiB",
                                                                           "1.50 GiB", "20.00 GiB"]


def test_torch_seed_range_matches_the_cli():
    torch.Generator().manual_seed(2**64 - 1)  # the largest --seed accepted is one torch takes


def test_model_fingerprints_do_not_depend_on_the_thread_count():
    """A render resumed on a machine with another core count (or under torchrun, one thread a process) has the same
    models: their fingerprints must not take a float sum whose last digits depend on how the threads split it."""
    from diffutoon.render_folder import module_fingerprint, setting_identity
    from diffutoon.tiny import tiny_lineart_detector

    threads = torch.get_num_threads()
    try:
        seen = set()
        for n in (1, 3):
            torch.set_num_threads(n)
            seen.add(setting_identity(tiny_lineart_detector()))
        assert len(seen) == 1
    finally:
        torch.set_num_threads(threads)
    detector = tiny_lineart_detector()
    before = module_fingerprint(detector.model_coarse)
    with torch.no_grad():
        weight = detector.model_coarse.model0[1].weight
        weight.view(-1)[5] = torch.nextafter(weight.view(-1)[5], torch.tensor(1.0))  # one bit of one value
    assert module_fingerprint(detector.model_coarse) != before
