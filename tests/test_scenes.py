"""Scene cuts (issue 19): each shot renders on its own; a video without cuts renders exactly as before."""

import numpy as np
import pytest
from conftest import make_video
from render_job import N, SIZE, job

from diffutoon import scenes
from diffutoon import video as vio
from diffutoon.distributed import shares
from diffutoon.reuse import window_chunks
from pipeline_diffutoon import _as_source, _scene_cuts, shot_windows, sliding_windows


def cut_clip(path, first=20, second=20, size=64):
    """A file with one hard cut at frame `first`: two slowly moving, unrelated patterns."""
    a = make_video(200, size)[:first]
    b = 255 - make_video(200, size, seed=5)[:second]
    return vio.write_video(path, list(np.concatenate([a, b])), 8, progress=False)


@pytest.mark.parametrize("n, length, stride, cuts", [(30, 16, 8, [10]), (40, 16, 8, [3, 17, 18]), (9, 4, 3, [5]),
                                                     (25, 8, 4, [1, 24])])
def test_no_window_spans_a_cut_and_each_shot_ends_with_an_aligned_window(n, length, stride, cuts):
    windows = shot_windows(n, length, stride, cuts)
    bounds = [0, *cuts, n]
    expected = []
    for start, end in zip(bounds[:-1], bounds[1:]):  # eq. 2 on each shot alone, written out again
        s = start
        while True:
            expected.append((s, min(s + length, end)))
            if s + length >= end:
                break
            s += stride
    assert windows == expected
    assert not any(s < c < e for s, e in windows for c in cuts)
    assert {e for s, e in windows} >= set(bounds[1:])  # every shot's last window ends at the shot's end
    chunks = window_chunks(windows)  # reuse across windows: each frame in one chunk, no chunk across a cut
    assert [i for s, e in chunks for i in range(s, e)] == list(range(n))
    assert not any(s < c < e for s, e in chunks for c in cuts)
    for world in (2, 3):  # the processes' contiguous shares still cover every window once
        assert [w for share in shares(windows, world) for w in share] == windows
    assert shot_windows(n, length, stride, None) == shot_windows(n, length, stride, []) == sliding_windows(n, length, stride)


def test_a_video_without_cuts_renders_exactly_as_before(job_pipe, job_reference):
    assert np.array_equal(job_pipe(**job(), scene_cuts=[]).frames[0], job_reference["main"])
    seen = []
    out = job_pipe(**job(edit=True), scene_cuts="auto", progress_callback=lambda p: seen.append(p.get("scene_cuts")))
    assert seen[-1] == [] and np.array_equal(out.frames[0], job_reference["edit"])  # no cut found: one shot


def test_a_shot_does_not_depend_on_the_frames_of_another(job_pipe, job_reference):
    video, seen = job()["video"], []
    other = video.copy()
    other[5:] = 255 - make_video(N - 5, SIZE, seed=3)  # another second shot
    first = job_pipe(**job(edit=True), scene_cuts=[5], progress_callback=lambda p: seen.append(p.get("scene_cuts")))
    second = job_pipe(**job(edit=True, video=other), scene_cuts=[5])
    assert seen[-1] == [5]
    assert np.array_equal(first.frames[0][:5], second.frames[0][:5])  # shot 1, bit for bit
    assert np.array_equal(first.color_frames[:5], second.color_frames[:5])  # the editing branch's FastBlend too
    assert not np.array_equal(first.frames[0][5:], second.frames[0][5:])
    assert not np.array_equal(first.frames[0][:5], job_reference["edit"][:5])  # without the cut shot 1 sees shot 2


def test_auto_finds_a_hard_cut_in_a_video_file_and_lists_are_checked(tmp_path):
    path = cut_clip(tmp_path / "cut.mp4")
    assert _scene_cuts("auto", _as_source(path), "scene_cuts") == [20]  # decoded a chunk of frames at a time
    smooth = make_video(200, 64)[:30]
    assert scenes.detect_cuts(lambda s, e: smooth[s:e], 30) == []
    assert _scene_cuts([7, 3, 7], _as_source(smooth), "scene_cuts") == [3, 7]
    for bad, message in [([0], r"\[0\] outside 1..29"), ([30], r"\[30\] outside"), ("sometimes", "must be 'auto'"),
                         ([2.5], "whole frame indices")]:
        with pytest.raises(ValueError, match=message):
            _scene_cuts(bad, _as_source(smooth), "scene_cuts")


def test_the_editing_branchs_own_scene_cuts_are_checked_before_any_model_runs(job_pipe, monkeypatch):
    def no_models(*args, **kwargs):
        raise AssertionError("a model ran")

    monkeypatch.setattr(job_pipe, "prepare_control_frames", no_models)
    for bad, message in [([100], r"\[100\] outside 1..8"), ("sometimes", "must be 'auto'")]:
        kwargs = job(edit=True)
        kwargs["edit_kwargs"]["scene_cuts"] = bad
        with pytest.raises(ValueError, match=message):
            job_pipe(**kwargs)


def test_cli_maps_keyframes_and_cuts_to_the_rendered_frames_and_prints_the_cuts(tmp_path, monkeypatch, capsys):
    import PIL.Image
    from distributed_job import tiny_load

    from diffutoon import cli

    source = cut_clip(tmp_path / "in.mp4", 15, 15)  # 64x64, 8 fps, a cut at frame 15
    painted = 255 - vio.VideoClip(source).read(8, 9)[0]
    PIL.Image.fromarray(painted).save(tmp_path / "p.png")
    monkeypatch.setattr(cli, "_check_sources", lambda sources: None)
    monkeypatch.setattr(cli, "_load_pipeline", tiny_load)
    options = [str(source), "--height", "32", "--width", "32", "--steps", "1", "--context-length", "4",
               "--context-stride", "2", "--device", "cpu", "--dtype", "float32", "--in-memory"]
    assert cli.main(["render", *options, "--max-frames", "18", "-o", str(tmp_path / "out")]) == 0  # cuts: auto
    assert "scene cuts at rendered frames: 15 (source frame 15); 2 shot(s)" in capsys.readouterr().err
    assert len(list((tmp_path / "out").glob("*.png"))) == 18

    looks = []  # what the pipeline would be given, from here on
    monkeypatch.setattr(cli, "_render", lambda args, *a, **k: looks.append(args.look))
    key = f"{tmp_path / 'p.png'}"
    assert cli.main(["render", *options, "--start", "5", "-o", str(tmp_path / "x"), "--keyframe", f"8={key}",
                     "--keyframe", f"2.5s={key}", "--scene-cuts", "15,3s"]) == 0
    assert looks[-1]["scene_cuts"] == [10, 19] and sorted(looks[-1]["keyframes"]) == [3, 15]  # source 15 / 24, 8 / 20
    assert np.array_equal(looks[-1]["keyframes"][3], vio.resize_frames(painted[None], 32, 32)[0])
    assert cli.main(["render", *options, "-o", str(tmp_path / "x"), "--scene-cuts", "none"]) == 0
    assert looks[-1] == {}
    for extra, message in [(["--start", "5", "--keyframe", f"2={key}"], "frame 2 is outside the rendered frames 5..29"),
                           (["--every-nth", "2", "--keyframe", f"7={key}"], "frame 7 is not rendered (--every-nth): use "
                            "frame 6 or 8"),
                           (["--keyframe", "3=/nonexistent.png"], "no such image file /nonexistent.png"),
                           (["--keyframe", f"3={key}", "--edit-prompt", "red"], "--keyframe and --edit-prompt"),
                           (["--scene-cuts", "12,x"], "--scene-cuts: expected auto, none or frame numbers")]:
        assert cli.main(["render", *options, "-o", str(tmp_path / "bad"), *extra]) == 2
        assert message in capsys.readouterr().err
