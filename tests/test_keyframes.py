"""Painted keyframes (issue 19): FastBlend's interpolation of the user's frames is the tile ControlNet's input."""

import numpy as np
import PIL.Image
import pytest
import torch
from render_job import N, SIZE, job

from diffutoon.render_folder import RenderFolderError

KF = dict(minimum_patch_size=5, num_iter=2)  # FastBlend's pyramid needs this at 32x32 (the default wants >= 46 px)


def painted():
    """Two repainted frames of the test video: frame 1 at the render's size, frame 6 painted at twice the size."""
    v = job()["video"]
    big = PIL.Image.fromarray(np.roll(v[6], 5, axis=1)[:, :, ::-1].copy()).resize((2 * SIZE, 2 * SIZE), PIL.Image.NEAREST)
    return {1: 255 - v[1], 6: big}


def interrupted(pipe, folder, **kwargs):
    def stop(progress):
        if progress.get("stage") == "denoising" and progress.get("step") == 1 and progress.get("window") == 1:
            pipe._interrupt = True
    out = pipe(**job(), render_dir=folder, progress_callback=stop, **kwargs)
    assert out.interrupted and out.frames is None


def test_keyframes_are_the_tile_input_and_fastblend_interpolates_the_frames_between(job_pipe, job_reference, tmp_path):
    from fastblend import interpolate_video

    video, keys = job()["video"], painted()
    resized = {1: keys[1], 6: np.asarray(keys[6].resize((SIZE, SIZE), PIL.Image.LANCZOS))}  # same aspect: a resize
    folder = tmp_path / "render"
    out = job_pipe(**job(), keyframes=keys, keyframe_kwargs=KF, render_dir=folder, keep_render_dir=True)
    tile = np.load(folder / "conditions" / "1-tile.npy")  # what the tile ControlNet reads, window by window
    for k in (1, 6):
        assert np.array_equal(tile[k], resized[k])
    expected = interpolate_video(video, resized, device="cpu", progress=False, **KF)  # FastBlend's API, directly
    between = [i for i in range(N) if i not in (1, 6)]
    assert np.array_equal(tile[between], expected[between])
    assert all(np.abs(tile[i].astype(int) - video[i]).mean() > 20 for i in between)  # the painting's colours
    assert not np.array_equal(out.frames[0], job_reference["main"])


def test_the_render_folders_room_check_counts_the_keyframes_frames(job_pipe, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from diffutoon import render_folder

    without = render_folder.folder_bytes(N, SIZE, SIZE, 2, job_pipe.vae_scale_factor, {}, 2)
    monkeypatch.setattr(render_folder.shutil, "disk_usage", lambda path: SimpleNamespace(free=without + 1000))
    with pytest.raises(RenderFolderError, match="the render folder needs about"):  # the guide and colour videos too
        job_pipe(**job(), keyframes=painted(), keyframe_kwargs=KF, render_dir=tmp_path / "render")


def test_keyframe_errors_come_before_any_model_runs(job_pipe):
    v, calls = job()["video"], []
    hook = job_pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for kwargs, message in [
            (dict(keyframes={N: v[0]}), rf"keyframes at frames \[{N}\] lie outside the video's {N} frames"),
            (dict(keyframes={0: np.zeros((SIZE, SIZE + 16, 3), np.uint8)}),
             f"keyframe 0 is {SIZE + 16}x{SIZE}, but the video is {SIZE}x{SIZE} and the render {SIZE}x{SIZE}"),
            (dict(keyframes={0: "/nonexistent.png"}), "keyframe 0: no such image file /nonexistent.png"),
            (dict(keyframes={0: v[0]}, edit_prompt="red"), "either `keyframes` or `edit_prompt` / `color_video`"),
            (dict(keyframes={0: v[0]}, keyframe_kwargs=dict(window_size=3)), r"keyframe_kwargs has unknown settings"),
            (dict(keyframes={0: v[0]}, keyframe_kwargs=None), "too small for one pyramid level"),  # the defaults
            (dict(keyframes=[v[0]]), "keyframes must be a non-empty dict"),
            (dict(keyframes=None), "pass keyframes too"),  # FastBlend's options alone would be ignored
        ]:
            with pytest.raises(ValueError, match=message):
                job_pipe(**job(), **{"keyframe_kwargs": KF, **kwargs})
    finally:
        hook.remove()
    assert not calls


def test_resume_refuses_a_changed_keyframe_and_resumes_unchanged_ones_bit_identically(job_pipe, tmp_path):
    keys = painted()
    kwargs = dict(keyframes=keys, keyframe_kwargs=KF, scene_cuts=[5])
    reference = job_pipe(**job(), **kwargs)
    assert np.array_equal(reference.color_frames[1], keys[1])  # in memory, the colour video comes back
    reference = reference.frames[0]
    folder = tmp_path / "render"
    interrupted(job_pipe, folder, **kwargs)
    changed = keys[1].copy()
    changed[0, 0, 0] ^= 1  # one bit of one pixel
    with pytest.raises(RenderFolderError, match="holds a different render.*keyframes.1 differs"):
        job_pipe(**job(), render_dir=folder, **{**kwargs, "keyframes": {**keys, 1: changed}})
    with pytest.raises(RenderFolderError, match="holds a different render.*scene_cuts differs"):
        job_pipe(**job(), render_dir=folder, **{**kwargs, "scene_cuts": [4]})
    assert np.array_equal(job_pipe(**job(), render_dir=folder, **kwargs).frames[0], reference)


def _render(rank, pipe, kwargs):
    torch.set_num_threads(1)
    return pipe(**job(), **kwargs).frames


def test_two_processes_give_the_frames_of_one_with_keyframes_and_scene_cuts(job_pipe, tmp_path):
    from test_distributed import spawn

    # windows (0, 4), (3, 5) | (5, 9): the two processes' shares meet at the cut, where nothing is shared
    kwargs = dict(keyframes=painted(), keyframe_kwargs=KF, scene_cuts=[5])
    results, errors, codes = spawn(2, tmp_path, _render, job_pipe, kwargs)
    assert not errors and codes == [0, 0]
    assert np.array_equal(results[0][0], job_pipe(**job(), **kwargs).frames[0]) and results[1] is None
