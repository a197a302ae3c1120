"""Long renders that survive (issue 10): the render folder, a checkpoint every step, bit-identical resume."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from render_job import N, SIZE, build, job

from diffutoon import render_folder
from diffutoon import video as vio
from diffutoon.render_folder import RenderFolderError

JOB = Path(__file__).with_name("render_job.py")
ROOT = Path(__file__).resolve().parents[1]


def spawn(render_dir, out, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(JOB), str(render_dir), "--out", str(out), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def manifest(folder) -> dict:
    return json.loads((Path(folder) / "manifest.json").read_text())


def interrupted_render(job_pipe, folder, at_step=2, **overrides):
    """A render stopped by `job_pipe._interrupt` in the middle of step `at_step` (0-based), its folder kept."""
    def stop(progress):
        if progress.get("step") == at_step and progress.get("window") == 1:
            job_pipe._interrupt = True
    out = job_pipe(**job(**overrides), render_dir=folder, progress_callback=stop)
    assert out.interrupted and out.frames is None
    return out


def test_the_folder_gives_the_same_frames_as_memory_and_a_person_can_read_it(job_pipe, job_reference, tmp_path):
    folder, seen = tmp_path / "render", []

    def look(progress):  # from outside, as a person would, while it runs
        if progress["stage"] == "denoising" and progress["window"] == 2:
            seen.append(json.loads((folder / "progress.json").read_text()))

    out = job_pipe(**job(), render_dir=folder, keep_render_dir=True, progress_callback=look)
    assert np.array_equal(out.frames[0], job_reference["main"])
    assert {"stage", "step", "steps", "window", "windows", "eta_seconds"} <= set(seen[0])
    assert [(p["step"], p["steps"], p["windows"]) for p in seen] == [(0, 3, 3), (1, 3, 3), (2, 3, 3)]
    lineart = np.load(folder / "conditions" / "0-lineart.npy", mmap_mode="r")
    assert lineart.shape == (N, SIZE, SIZE, 3) and lineart.dtype == np.uint8
    assert np.array_equal(np.load(folder / "conditions" / "1-tile.npy"), job()["video"])
    record = manifest(folder)["passes"]["main"]
    assert record["completed_steps"] == 3 and [c["step"] for c in record["checkpoints"]] == [3, 2]
    assert json.loads((folder / "progress.json").read_text())["stage"] == "done"
    assert not (folder / "lock").exists()
    job_pipe(**job(), render_dir=tmp_path / "gone")
    assert not (tmp_path / "gone").exists()  # removed once the output is complete


@pytest.mark.parametrize("branch", ["main", "edit"])
def test_sigkill_in_the_middle_of_a_step_then_resume_is_bit_identical(job_pipe, job_reference, tmp_path, branch, caplog):
    folder = tmp_path / "render"
    proc = spawn(folder, tmp_path / "x.npy", "--kill", branch, "1", "2", *(["--edit"] if branch == "edit" else []))
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert manifest(folder)["passes"][branch]["completed_steps"] == 1
    out = job_pipe(**job(edit=branch == "edit"), render_dir=folder)
    assert np.array_equal(out.frames[0], job_reference[branch])
    assert f"resuming the {branch} pass at step 2 of 3" in caplog.text


def test_killed_from_outside_while_writing_a_checkpoint_then_resume_is_bit_identical(job_pipe, job_reference, tmp_path):
    folder = tmp_path / "render"
    proc = spawn(folder, tmp_path / "x.npy", "--slow-writes")
    partial = folder / "latents" / ".step-0002.npy.partial"
    deadline = time.time() + 300
    while not partial.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # between the first and last chunk of the step-2 latents
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL and partial.exists()
    assert manifest(folder)["passes"]["main"]["completed_steps"] == 1  # the torn file is not the state
    out = job_pipe(**job(), render_dir=folder)
    assert np.array_equal(out.frames[0], job_reference["main"])


def test_interrupt_keeps_the_folder_and_a_corrupt_checkpoint_falls_back(job_pipe, job_reference, tmp_path, capfd):
    folder = tmp_path / "render"
    interrupted_render(job_pipe, folder, at_step=2)
    assert (folder / "manifest.json").exists() and not (folder / "lock").exists()
    assert json.loads((folder / "progress.json").read_text())["stage"] == "interrupted"
    newest = folder / "latents" / "step-0002.npy"
    with open(newest, "r+b") as f:  # one flipped byte in the newest checkpoint
        f.seek(-5, os.SEEK_END)
        byte = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    out = job_pipe(**job(), render_dir=folder, keep_render_dir=True)
    assert "step-0002.npy is corrupt" in capfd.readouterr().out
    assert np.array_equal(out.frames[0], job_reference["main"])  # step 2 recomputed from step 1: the same bits
    for entry in manifest(folder)["passes"]["main"]["checkpoints"]:
        (folder / entry["file"]).write_bytes(b"torn")
    with pytest.raises(RenderFolderError, match="no intact checkpoint.*start over with fresh=True"):
        job_pipe(**job(), render_dir=folder)


def test_resume_refused_when_the_render_differs_and_fresh_starts_over(job_pipe, job_reference, tmp_path):
    folder = tmp_path / "render"
    interrupted_render(job_pipe, folder, at_step=1)
    calls = []
    hook = job_pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for change, named in [(dict(prompt="a boy"), "prompt"), (dict(generator=torch.Generator().manual_seed(1)),
                                                                   "generator"),
                              (dict(num_inference_steps=4), "num_inference_steps"),
                              (dict(video=job()["video"][:8]), "input.shape"),
                              (dict(controlnet_conditioning_scale=0.7), "controlnet_conditioning_scale")]:
            with pytest.raises(RenderFolderError, match=f"holds a different render.*{named}.*fresh=True"):
                job_pipe(**job(**change), render_dir=folder)
        other = build()  # other weights
        other.unet.conv_in.weight.data += 0.01
        with pytest.raises(RenderFolderError, match="models.unet differs"):
            other(**job(), render_dir=folder)
    finally:
        hook.remove()
    assert not calls  # refused before any model ran
    out = job_pipe(**job(prompt="a boy"), render_dir=folder, fresh=True)
    assert np.array_equal(out.frames[0], job_pipe(**job(prompt="a boy")).frames[0])


def test_a_video_file_streams_through_the_folder_into_png_frames_and_an_mp4(job_pipe, tmp_path):
    source = vio.make_demo_clip(tmp_path / "in.mp4", num_frames=N, height=SIZE, width=SIZE, fps=8)
    clip = vio.VideoClip(source)
    in_memory = job_pipe(**job(video=clip.read(0, N), output_type="pil")).frames[0]
    frames = job_pipe(**job(video=str(source)), render_dir=tmp_path / "r1", output_path=tmp_path / "png")
    assert frames.frames is None and frames.path == tmp_path / "png"
    written = [np.asarray(PIL.Image.open(tmp_path / "png" / f"{i:05d}.png")) for i in range(N)]
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(written, in_memory))
    job_pipe(**job(video=clip), render_dir=tmp_path / "r2", output_path=tmp_path / "out.mp4")
    assert vio.VideoReader(tmp_path / "out.mp4").num_frames == N and vio.probe(tmp_path / "out.mp4")["has_audio"]
    other = vio.make_demo_clip(tmp_path / "other.mp4", num_frames=N, height=SIZE, width=SIZE, fps=8, photo="astronaut")
    interrupted_render(job_pipe, tmp_path / "r3", video=str(source))
    with pytest.raises(RenderFolderError, match="input.sha256 differs"):
        job_pipe(**job(video=str(other)), render_dir=tmp_path / "r3")
    with pytest.raises(RenderFolderError, match="input.indices differs"):
        job_pipe(**job(video=vio.VideoClip(source, indices=range(0, N, 2))), render_dir=tmp_path / "r3")
    with pytest.raises(ValueError, match="pass fps="):
        job_pipe(**job(), output_path=tmp_path / "x.mp4")


def test_locks_full_disks_and_bad_folders(job_pipe, job_reference, tmp_path, monkeypatch):
    folder = tmp_path / "render"
    folder.mkdir()
    (folder / "lock").write_text(f"{os.getpid()} {os.uname().nodename}")
    with pytest.raises(RenderFolderError, match=f"in use by process {os.getpid()}"):
        job_pipe(**job(), render_dir=folder)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (folder / "lock").write_text(f"{dead.pid} {os.uname().nodename}")  # a stale lock is taken over
    interrupted_render(job_pipe, folder, at_step=1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(RenderFolderError, match="not empty and holds no render"):
        job_pipe(**job(), render_dir=tmp_path / "full")
    monkeypatch.setattr(render_folder.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    with pytest.raises(RenderFolderError, match="needs about [0-9]+ KiB and .* 1000 bytes free"):  # not "0.00 GiB"
        job_pipe(**job(), render_dir=tmp_path / "small")
    assert not (tmp_path / "small").exists()  # an early refusal leaves no empty folder
    monkeypatch.undo()
    write = render_folder.DiskFrames.write

    def full_disk(self, start, values):
        if ".step-0002" in self.path.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, start, values)

    monkeypatch.setattr(render_folder.DiskFrames, "write", full_disk)
    with pytest.raises(RenderFolderError, match="disk .* is full; the folder is intact and resumable"):
        job_pipe(**job(), render_dir=folder)
    monkeypatch.undo()
    assert np.array_equal(job_pipe(**job(), render_dir=folder).frames[0], job_reference["main"])


def test_a_resume_keeps_what_step_end_callbacks_changed(job_pipe, tmp_path):
    """diffusers' SDCFGCutoffCallback drops the negative branch at step 0; a render resumed at step 2 must too."""
    from diffusers.callbacks import SDCFGCutoffCallback

    cutoff = lambda: SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0)  # noqa: E731
    expected = job_pipe(**job(callback_on_step_end=cutoff())).frames[0]
    interrupted_render(job_pipe, tmp_path / "r", at_step=2, callback_on_step_end=cutoff())
    resumed = job_pipe(**job(callback_on_step_end=cutoff()), render_dir=tmp_path / "r")
    assert np.array_equal(resumed.frames[0], expected)


STEADY = '''
import ctypes, sys
import numpy as np
from diffutoon import memory

class MallInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
if not hasattr(libc, "mallinfo2"):
    sys.exit(3)
libc.mallinfo2.restype = MallInfo

def mapped_while_held():  # how many of four 1536x1536 RGB frames (7 MB) get a mapping of their own
    base = libc.mallinfo2().hblks
    buffers = [np.ones((1536, 1536, 3), np.uint8) for _ in range(4)]
    mapped = libc.mallinfo2().hblks - base
    del buffers
    return mapped

fixed = memory.steady_host_memory() if sys.argv[1] == "steady" else None
big = np.ones(24 << 20, np.uint8)
del big  # a large free: glibc raises its mmap threshold to 24 MiB, unless it was fixed
print(fixed, mapped_while_held())
'''


def test_host_memory_steady_maps_frame_sized_buffers_after_a_large_free():
    """glibc raises its mmap threshold after a large free, and from then on frame-sized buffers come from the heap
    (bench/RESULTS.md "Host memory": what made a long render's anonymous memory settle 40-170 MB higher at random);
    `steady_host_memory` (called before every render on an accelerator) puts the default back for good, unless the
    user set one."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env["PYTHONPATH"] = str(ROOT)
    run = lambda how, **extra: subprocess.run([sys.executable, "-c", STEADY, how], env=dict(env, **extra),  # noqa: E731
                                              capture_output=True, text=True)
    out = run("steady")
    if out.returncode == 3:
        pytest.skip("not glibc >= 2.33 (no mallinfo2)")
    assert out.stdout.split() == ["True", "4"], out.stderr  # each buffer mapped, and unmapped when freed
    assert run("dynamic").stdout.split() == ["None", "0"]  # glibc's own way: from the heap after the large free
    assert run("steady", MALLOC_MMAP_THRESHOLD_="33554432").stdout.split() == ["False", "0"]  # the user's setting stands
