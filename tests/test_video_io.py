"""Video in/out: lazy range reading, resize policies, atomic mp4/PNG writing with the right audio span.

The source clip is made with ffmpeg directly (not with the code under test): frame i is flat grey at level
GREY(i), and second k of its audio is a sine at TONE(k) Hz, so both frame order and audio span are checkable.
"""

import subprocess
from pathlib import Path

import numpy as np
import pytest

from diffutoon import video as vio

FPS, N, H, W = 12, 36, 48, 64  # 3 seconds


def GREY(i):
    return 16 + 6 * i


def TONE(k):
    return 300 + 300 * k  # 300, 600, 900 Hz


def make_source(path, n=N, fps=FPS, height=H, width=W, audio=True):
    """An mp4 (H.264 + AAC) made by ffmpeg itself: grey-coded frames, a tone that changes every second."""
    frames = np.stack([np.full((height, width, 3), GREY(i), np.uint8) for i in range(n)])
    cmd = [vio.ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{width}x{height}", "-framerate", str(fps), "-i", "-"]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"aevalsrc=0.5*sin(2*PI*(300+300*floor(t))*t):s=44100:d={n / fps}",
                "-c:a", "aac", "-b:a", "128k"]
    cmd += ["-c:v", "libx264", "-crf", "10", "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(cmd, input=frames.tobytes(), check=True)
    return Path(path)


def read_audio(path, rate=16000):
    """The first audio stream decoded to mono float samples."""
    pcm = subprocess.run([vio.ffmpeg_exe(), "-loglevel", "error", "-i", str(path), "-map", "0:a:0", "-ac", "1",
                          "-ar", str(rate), "-f", "s16le", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768


def tone_hz(samples, rate=16000):
    """Dominant frequency of a clean sine, from its zero crossings (robust to AAC's small errors)."""
    s = samples[len(samples) // 10: -len(samples) // 10 or None]  # skip codec ramp-in/out
    crossings = np.count_nonzero(np.diff(np.signbit(s)))
    return crossings / 2 / (len(s) / rate)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("src") / "source.mp4")


def test_reader_metadata_up_front(source):
    r = vio.VideoReader(source)
    assert (r.fps, r.num_frames, r.size, r.height, r.width) == (FPS, N, (W, H), H, W)
    assert r.has_audio and r.duration == pytest.approx(3.0)
    assert abs(vio.probe(source)["duration"] - 3.0) < 0.1


def test_frame_indices_and_span(source):
    r = vio.VideoReader(source)
    assert r.frame_indices() == list(range(N))
    assert r.frame_indices(start=5, end=20, every_nth=4) == [5, 9, 13, 17]
    assert r.frame_indices(start=5, every_nth=2, max_frames=3) == [5, 7, 9]
    assert r.frame_indices(start=30, end=1000) == list(range(30, N))  # end past the file is clamped
    # each kept frame stands for every_nth source frames: the span keeps the clip's real duration
    assert r.span([12, 14, 16]) == pytest.approx((1.0, 1.5))
    assert r.span([6]) == pytest.approx((0.5, 0.5 + 1 / FPS))
    assert r.span([6], every_nth=3) == pytest.approx((0.5, 0.75))  # one frame kept of every 3
    for bad in (dict(start=N), dict(start=10, end=10), dict(every_nth=0), dict(start=-1), dict(max_frames=0)):
        with pytest.raises(vio.VideoError):
            r.frame_indices(**bad)


def test_read_returns_the_requested_frames_in_bounded_chunks(source):
    r = vio.VideoReader(source, chunk_size=4)
    calls = []
    batch = r._vr.get_batch
    r._vr.get_batch = lambda idx: calls.append(list(idx)) or batch(idx)  # spy on decord
    idx = r.frame_indices(start=3, every_nth=3)  # 3, 6, ..., 33
    frames = vio.read_frames(r, idx, progress=False)
    assert frames.shape == (len(idx), H, W, 3) and frames.dtype == np.uint8
    np.testing.assert_allclose(frames.reshape(len(idx), -1).mean(1), [GREY(i) for i in idx], atol=2)
    assert [i for c in calls for i in c] == idx and max(map(len, calls)) <= 4  # never the whole file at once
    assert len(list(r)) == N  # plain iteration walks every frame


def test_resize_policies():
    frame = np.zeros((1, 40, 80, 3), np.uint8)
    frame[:, :, :20] = 255  # white left quarter
    frame[:, :, 20:60, 1] = 255  # green centre
    crop = vio.resize_frames(frame, 32, 32, "crop")  # covers: 40x80 -> 32x64, keeps the centre 32 columns
    assert crop.shape == (1, 32, 32, 3) and (crop[0, :, :, 0] < 10).all() and (crop[0, :, :, 1] > 245).all()
    pad = vio.resize_frames(frame, 32, 32, "pad")  # fits: 40x80 -> 16x32 with 8 black rows above and below
    assert pad.shape == (1, 32, 32, 3) and pad[0, :8].max() == 0 and pad[0, 24:].max() == 0
    assert pad[0, 12, 2].min() > 245 and pad[0, 12, 16, 1] > 245  # the white edge survives padding
    up = vio.resize_frames(np.full((2, 8, 8, 3), 77, np.uint8), 16, 24, "crop")
    assert up.shape == (2, 16, 24, 3) and (up == 77).all()
    assert vio.target_size(720, 1280, policy="short_side", short_side=512) == (512, 912)
    assert vio.target_size(1080, 607, policy="short_side", short_side=300) == (536, 304)
    assert vio.target_size(720, 1280, 256, 384, "pad") == (256, 384)
    with pytest.raises(ValueError):
        vio.target_size(720, 1280, policy="stretch", height=8, width=8)
    with pytest.raises(ValueError):
        vio.resize_frames(frame, 8, 8, "stretch")


def test_write_video_fps_frames_and_audio_span(source, tmp_path):
    r = vio.VideoReader(source)
    idx = r.frame_indices(start=12, end=24, every_nth=2)  # second 1 -> 2 of the source, 6 frames
    frames = vio.read_frames(r, idx, 32, 32, progress=False)
    out = vio.write_video(tmp_path / "out.mp4", iter(frames), fps=r.fps / 2, audio_from=source,
                          audio_span=r.span(idx), progress=False)
    o = vio.VideoReader(out)
    assert (o.fps, o.num_frames, o.size) == (6, 6, (32, 32))
    np.testing.assert_allclose(vio.read_frames(o, range(6), progress=False).reshape(6, -1).mean(1),
                               [GREY(i) for i in idx], atol=3)
    audio = read_audio(out)
    assert len(audio) / 16000 == pytest.approx(1.0, abs=0.05)
    assert tone_hz(audio) == pytest.approx(TONE(1), rel=0.03)  # the tone of second 1, not 0
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]  # no temporary left behind


def test_container_follows_the_suffix(source, tmp_path):
    for name, container in (("a.mkv", "matroska"), ("a.mov", "mov,mp4"), ("a.mp4", "mov,mp4")):
        out = vio.write_video(tmp_path / name, np.zeros((2, 16, 16, 3), np.uint8), fps=8, audio_from=source,
                              progress=False)
        assert f"Input #0, {container}" in vio._ffmpeg_info(out) and vio.probe(out)["has_audio"]


def test_write_video_float_frames_odd_size_ntsc_fps_no_audio(tmp_path):
    frames = np.full((5, 33, 47, 3), 0.5, np.float32)  # diffusers "np" output: floats in [0, 1]
    out = vio.write_video(tmp_path / "f.mp4", frames, fps=30000 / 1001, progress=False)
    o = vio.VideoReader(out)  # 48 px wide: decord 0.6 mis-copies such rows; the reader's fallback must cope
    assert o.num_frames == 5 and o.fps == pytest.approx(29.97, abs=0.01) and o.size == (48, 34)
    assert abs(int(o.read([2])[0, 10, 10, 0]) - 128) <= 2 and not o.has_audio


def test_existing_output_is_kept_without_overwrite_and_on_crash(tmp_path):
    out = tmp_path / "v.mp4"
    out.write_bytes(b"precious")
    frames = np.zeros((4, 16, 16, 3), np.uint8)
    with pytest.raises(FileExistsError, match="overwrite"):
        vio.write_video(out, frames, fps=8, progress=False)

    def crashing():  # a render that dies half way
        yield from frames
        raise RuntimeError("GPU fell off")

    with pytest.raises(RuntimeError, match="GPU fell off"):
        vio.write_video(out, crashing(), fps=8, overwrite=True, progress=False)
    assert out.read_bytes() == b"precious" and [p.name for p in tmp_path.iterdir()] == ["v.mp4"]
    vio.write_video(out, frames, fps=8, overwrite=True, progress=False)
    assert vio.VideoReader(out).num_frames == 4
    with pytest.raises(FileExistsError):
        vio.check_output(out)  # the early check the CLI runs before loading any model


def test_frames_folder_atomic(tmp_path):
    out = tmp_path / "frames"
    frames = np.stack([np.full((8, 8, 3), GREY(i), np.uint8) for i in range(3)])
    vio.write_output(out, frames, fps=8, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "00002.png"]
    import cv2

    assert cv2.imread(str(out / "00002.png"))[0, 0, 0] == GREY(2)
    with pytest.raises(FileExistsError):
        vio.write_frames_folder(out, frames, progress=False)

    def crashing():
        yield frames[0]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        vio.write_frames_folder(out, crashing(), overwrite=True, progress=False)
    assert len(list(out.iterdir())) == 3 and [p.name for p in tmp_path.iterdir()] == ["frames"]
    vio.write_frames_folder(out, frames[:2], overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png"]  # replaced, not merged


def test_unreadable_inputs_raise_video_error(source, tmp_path):
    data = source.read_bytes()
    (tmp_path / "half.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.mp4").write_text("not a video\n")
    (tmp_path / "empty.mp4").write_bytes(b"")
    for name in ("half.mp4", "text.mp4", "empty.mp4", "missing.mp4"):
        with pytest.raises(vio.VideoError, match=name):
            vio.VideoReader(tmp_path / name)
    with pytest.raises(vio.VideoError, match="not a file"):
        vio.VideoReader(tmp_path)


def test_demo_clip_is_a_moving_photo_with_sound(tmp_path):
    out = vio.make_demo_clip(tmp_path / "d.mp4", num_frames=12, height=64, width=96, fps=6)
    r = vio.VideoReader(out)
    assert (r.num_frames, r.fps, r.size) == (12, 6, (96, 64))
    frames = vio.read_frames(r, range(12), progress=False).astype(np.float32)
    assert frames.std() > 20  # a photograph, not a flat test pattern
    assert np.abs(frames[-1] - frames[0]).mean() > 10 and np.abs(frames[1] - frames[0]).mean() > 1  # it moves
    audio = read_audio(out)
    assert len(audio) / 16000 == pytest.approx(2.0, abs=0.05) and tone_hz(audio) == pytest.approx(440, rel=0.03)
