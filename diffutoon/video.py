"""Video in and out: lazy decoding by frame range, resizing, atomic mp4 / PNG writing with the source's audio.

Reading goes through decord in chunks (a long file is never decoded whole); writing pipes raw RGB to the
ffmpeg binary shipped with imageio-ffmpeg (H.264, yuv420p) and muxes the matching span of the source's
audio back in. Outputs are written to a temporary name beside the target and moved into place only once
complete, so a crash never leaves a truncated file where a video is expected.

    >>> from diffutoon.video import VideoReader, read_frames, write_video, make_demo_clip
    >>> _ = make_demo_clip("/tmp/demo.mp4", num_frames=16, height=64, width=64, fps=8, overwrite=True)
    >>> reader = VideoReader("/tmp/demo.mp4")
    >>> reader.fps, reader.num_frames, reader.size
    (8.0, 16, (64, 64))
    >>> idx = reader.frame_indices(start=4, every_nth=2)
    >>> frames = read_frames(reader, idx, height=32, width=48, policy="crop", progress=False)
    >>> frames.shape
    (6, 32, 48, 3)
    >>> _ = write_video("/tmp/out.mp4", frames, fps=reader.fps / 2, audio_from="/tmp/demo.mp4",
    ...                 audio_span=reader.span(idx), overwrite=True, progress=False)
"""

import contextlib
import errno
import functools
import glob
import math
import os
import re
import shutil
import subprocess
import tempfile
import wave
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from .render_folder import _alive  # one liveness check for lock files and stale partial outputs

RESIZE_POLICIES = ("crop", "pad", "short_side")
MUXERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}  # suffix -> ffmpeg muxer
VIDEO_SUFFIXES = tuple(MUXERS)


class VideoError(Exception):
    """A video that cannot be read or written; the message is meant to be shown to the user as is."""


def ffmpeg_exe():
    """Path of the ffmpeg binary shipped with imageio-ffmpeg (no system ffmpeg needed)."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


@contextlib.contextmanager
def _quiet_stderr():
    # decord's C++ logger and libav print straight to fd 2; silence them so errors stay one line.
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (embedded interpreters): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _ffmpeg_info(path):
    # `ffmpeg -i` alone prints the streams (and complains that no output was given)
    return subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True,
                          errors="replace").stderr


def probe(path):
    """Parse `ffmpeg -i` output: {"duration": seconds or None, "has_audio": bool, "audio": description}.

    >>> probe("/tmp/demo.mp4")["has_audio"]
    True
    """
    out = _ffmpeg_info(path)
    m = re.search(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)", out)
    duration = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]) if m else None
    audio = re.search(r"Stream #\d+:\d+.*?: Audio: (.*)", out)
    return {"duration": duration, "has_audio": audio is not None, "audio": audio[1] if audio else None}


def _fps_fraction(fps):
    # 29.97002997 -> 30000/1001, 12.5 -> 25/2: ffmpeg wants an exact rational time base.
    return Fraction(fps).limit_denominator(1001)


class VideoReader:
    """Lazy reader of any file ffmpeg can decode; frames come out as uint8 RGB (n, H, W, 3).

    Only metadata is read on open; frames are decoded on demand with `read(indices)` or `iter_chunks`.

    >>> r = VideoReader("/tmp/demo.mp4")
    >>> r.read([0, 5]).shape
    (2, 64, 64, 3)
    """

    def __init__(self, path, chunk_size=16):
        self.path = Path(path)
        self.chunk_size = chunk_size
        if not self.path.exists():
            raise VideoError(f"input video not found: {self.path}")
        if not self.path.is_file():
            raise VideoError(f"input is not a file: {self.path}")
        if not os.access(self.path, os.R_OK):
            raise VideoError(f"input video is not readable (permissions): {self.path}")
        info = _ffmpeg_info(self.path)
        self.rotation = _rotation(info)  # the display rotation players apply (phone videos), in degrees
        self._resize_to, self._pipe, self._source_index = None, None, None
        if self.rotation or re.search(r"Input #0, gif,", info):  # decord ignores rotation and cannot read GIFs
            self._open_pipe(info)
            return
        import decord

        decord.logging.set_level(decord.logging.QUIET)
        try:
            with _quiet_stderr():
                # one decoder thread: 720p measured 123 MB vs 563 MB with auto threads, same speed on 2 cores,
                # and decoding is never the bottleneck next to diffusion
                self._vr = decord.VideoReader(str(self.path), ctx=decord.cpu(0), num_threads=1)
                self.num_frames = len(self._vr)
                self.fps = float(self._vr.get_avg_fps())
                first = self._first_frame(decord)
        except Exception as e:  # decord raises RuntimeError / DECORDError with C++ context
            if not re.search(r"Stream #.*: Video:", info) and "Audio:" in info:
                raise VideoError(f"{self.path} has no video stream (audio only): pass a video file") from e
            raise VideoError(f"cannot read {self.path} as a video (truncated, corrupt or not a video file)") from e
        if not self.num_frames or first is None or not (self.fps > 0 and math.isfinite(self.fps)):
            raise VideoError(f"{self.path} has no decodable video frames")
        self.height, self.width = first.shape[1:3]
        self._audio = None
        with _quiet_stderr():
            starts = self._vr.get_frame_timestamp(range(self.num_frames))
        self._constant_rate(starts[:, 0], starts[-1, 1])

    def _open_pipe(self, info):
        """Rotated videos and GIFs: frames decoded by the ffmpeg binary, upright as players show them."""
        size = re.search(r"Stream #.*?: Video: .*?, (\d+)x(\d+)", info)
        if not size:
            raise VideoError(f"cannot read {self.path} as a video (truncated, corrupt or not a video file)")
        w, h = int(size[1]), int(size[2])
        self.width, self.height = (h, w) if self.rotation in (90, 270) else (w, h)
        starts, end = _packet_times(self.path)
        if not len(starts):
            raise VideoError(f"{self.path} has no decodable video frames")
        self._pipe = _PipeDecoder(self.path, self.width, self.height)
        self.num_frames, self.fps, self._audio = len(starts), len(starts) / max(end - starts[0], 1e-6), None
        self._constant_rate(starts, end, always=True)
        self.read([0])  # a file that decodes no frame fails here

    def _constant_rate(self, starts, end, always=False):
        """Variable frame rate: the frames as a constant-rate video at the source's average rate, each output frame
        the source frame shown at the middle of its interval; the duration (and so the audio sync) is kept."""
        gaps = np.diff(starts)
        if not always and (len(gaps) == 0 or np.abs(gaps - np.median(gaps)).max() <= 0.25 * np.median(gaps)):
            return  # constant rate: decord's frames and rate as they are
        n, duration = len(starts), float(end - starts[0])
        if not (duration > 0 and math.isfinite(duration)):
            return
        self.fps = n / duration
        middles = starts[0] + (np.arange(n) + 0.5) / self.fps
        self._source_index = np.clip(np.searchsorted(starts, middles, side="right") - 1, 0, n - 1)

    def _first_frame(self, decord):
        if not self.num_frames:
            return None
        try:
            return self._batch([0])
        except Exception:
            size = re.search(r"Stream #.*?: Video: .*?, (\d+)x(\d+)", _ffmpeg_info(self.path))
            if not size:
                raise
        # decord 0.6 mis-copies frames whose RGB rows libav pads (widths 16, 24, 48, 72...): decode at a
        # slightly wider size, which decord copies right, and scale back to the true size in _batch
        w, h = int(size[1]), int(size[2])
        for wider in (w + 2, w + 4, w + 6, w + 8):
            self._vr = decord.VideoReader(str(self.path), ctx=decord.cpu(0), num_threads=1, width=wider, height=h)
            self._resize_to = (w, h)
            try:
                return self._batch([0])
            except Exception:
                continue
        raise VideoError(f"decord cannot decode {self.path} at its size {w}x{h}")

    @property
    def size(self):
        """(width, height) of the source frames, as PIL writes sizes."""
        return (self.width, self.height)

    @property
    def duration(self):
        """Length of the video stream in seconds (num_frames / fps)."""
        return self.num_frames / self.fps

    @property
    def has_audio(self):
        if self._audio is None:
            self._audio = probe(self.path)["has_audio"]
        return self._audio

    def __len__(self):
        return self.num_frames

    def frame_indices(self, start=0, end=None, every_nth=1, max_frames=None):
        """Indices of the frames [start, end) taking every `every_nth`, at most `max_frames` of them.

        >>> VideoReader("/tmp/demo.mp4").frame_indices(start=2, end=12, every_nth=3, max_frames=3)
        [2, 5, 8]
        """
        end = self.num_frames if end is None else min(int(end), self.num_frames)
        if start < 0 or every_nth < 1 or (max_frames is not None and max_frames < 1):
            raise VideoError("start must be >= 0, every_nth >= 1 and max_frames >= 1")
        if start >= end:
            raise VideoError(f"empty frame range: start={start}, end={end}, but {self.path.name} has "
                             f"{self.num_frames} frames ({self.duration:.2f} s at {self.fps:g} fps)")
        indices = list(range(int(start), end, int(every_nth)))
        return indices[:max_frames] if max_frames else indices

    def span(self, indices, every_nth=None):
        """Time span (t0, t1) in seconds that `indices` cover: the audio to keep with those frames.

        Each kept frame stands for `every_nth` source frames (default: the gap between the first two), so the
        span is len * every_nth / fps long.

        >>> VideoReader("/tmp/demo.mp4").span([4, 6, 8])
        (0.5, 1.25)
        """
        step = every_nth or (indices[1] - indices[0] if len(indices) > 1 else 1)
        t0 = indices[0] / self.fps
        return (t0, t0 + len(indices) * step / self.fps)

    def _batch(self, indices):
        if self._source_index is not None:  # a variable-rate source: the frames shown at the output's times
            indices = [int(self._source_index[i]) for i in indices]
        if self._pipe is not None:
            return self._pipe.get(indices)
        batch = self._vr.get_batch(list(indices))
        batch = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
        if self._resize_to:
            batch = np.stack([cv2.resize(f, self._resize_to, interpolation=cv2.INTER_AREA) for f in batch])
        return batch

    def read(self, indices):
        """Decode exactly these frames, as uint8 (len(indices), H, W, 3). Keep `indices` short (one chunk)."""
        try:
            with _quiet_stderr():
                return self._batch(indices)
        except IndexError:  # a caller's mistake, not a broken file
            raise
        except Exception as e:
            raise VideoError(f"cannot decode frames {indices[0]}..{indices[-1]} of {self.path} "
                             "(file truncated or corrupt?)") from e

    def iter_chunks(self, indices=None, chunk_size=None):
        """Yield uint8 arrays of at most `chunk_size` frames: memory stays bounded by one chunk."""
        indices = list(range(self.num_frames)) if indices is None else list(indices)
        chunk_size = chunk_size or self.chunk_size
        for i in range(0, len(indices), chunk_size):
            yield self.read(indices[i:i + chunk_size])

    def __iter__(self):
        for chunk in self.iter_chunks():
            yield from chunk


def _rotation(info):
    """The display rotation (0, 90, 180, 270, clockwise) that ffmpeg's display matrix or rotate tag gives."""
    m = re.search(r"[Dd]isplay ?[Mm]atrix: rotation of (-?[\d.]+) degrees", info)
    if m:
        return round(-float(m[1]) / 90) % 4 * 90  # the matrix rotates counter-clockwise
    m = re.search(r"rotate\s*:\s*(-?\d+)", info)
    return round(float(m[1]) / 90) % 4 * 90 if m else 0


def _packet_times(path):
    """(start times in seconds in display order, end of the last frame) of the first video stream's packets."""
    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-v", "error", "-i", str(path), "-map", "0:v:0", "-c", "copy",
                          "-f", "framecrc", "-"], capture_output=True, text=True, errors="replace").stdout
    tb = re.search(r"#tb 0: (\d+)/(\d+)", out)
    rows = [line.split(",") for line in out.splitlines() if line.startswith("0,")]
    if not tb or not rows:
        return np.zeros(0), 0.0
    unit = int(tb[1]) / int(tb[2])
    pts = np.array(sorted(int(r[2]) for r in rows), np.float64) * unit
    last = max(rows, key=lambda r: int(r[2]))
    return pts, pts[-1] + max(int(last[3]), 1) * unit


class _PipeDecoder:
    """Frames decoded in order by the ffmpeg binary (autorotated, every frame kept): a read at or after the last one
    goes on decoding, a read before it starts again, so reading chunk by chunk decodes the file once."""

    def __init__(self, path, width, height):
        self.path, self.size, self.proc, self.next, self.last = path, (height, width), None, 0, None

    def get(self, indices):
        out = np.empty((len(indices), *self.size, 3), np.uint8)
        for k in sorted(range(len(indices)), key=lambda k: indices[k]):
            if self.proc is None or indices[k] < self.next - 1:
                self.close()
                self.proc = subprocess.Popen([ffmpeg_exe(), "-v", "error", "-i", str(self.path), "-map", "0:v:0",
                                              "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                self.next, self.last = 0, None
            while self.next <= indices[k]:
                data = self.proc.stdout.read(self.size[0] * self.size[1] * 3)
                if len(data) < self.size[0] * self.size[1] * 3:
                    self.close()
                    raise IndexError(f"frame {indices[k]} is past the end of {self.path}")
                self.last, self.next = data, self.next + 1
            out[k] = np.frombuffer(self.last, np.uint8).reshape(*self.size, 3)
        return out

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def target_size(src_height, src_width, height=None, width=None, policy="crop", short_side=None):
    """The (height, width) frames are resized to. "short_side" keeps the aspect ratio: the short side
    becomes `short_side` and both sides are rounded to a multiple of 8; the others need height and width.

    >>> target_size(720, 1280, policy="short_side", short_side=512)
    (512, 912)
    >>> target_size(720, 1280, 512, 512)
    (512, 512)
    """
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"resize policy must be one of {RESIZE_POLICIES}, got {policy!r}")
    if policy == "short_side":
        if not short_side or short_side < 8:
            raise ValueError("policy 'short_side' needs short_side >= 8")
        scale = short_side / min(src_height, src_width)
        return (max(8, round(src_height * scale / 8) * 8), max(8, round(src_width * scale / 8) * 8))
    if not height or not width:
        raise ValueError(f"policy {policy!r} needs both height and width")
    return (int(height), int(width))


def resize_frames(frames, height, width, policy="crop"):
    """Resize uint8 frames (n, H, W, 3) to (n, height, width, 3).

    crop: scale to cover the target then cut the centre (the reference's behaviour); pad: scale to fit
    inside and pad with black; short_side: as crop (the target already has the source's aspect ratio,
    see `target_size`, so at most a few pixels are cut).

    >>> resize_frames(np.zeros((2, 48, 64, 3), np.uint8), 32, 32).shape
    (2, 32, 32, 3)
    """
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"resize policy must be one of {RESIZE_POLICIES}, got {policy!r}")
    frames = np.asarray(frames)
    n, h, w = frames.shape[:3]
    if (h, w) == (height, width):
        return frames
    fit = min if policy == "pad" else max
    scale = fit(height / h, width / w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    # INTER_AREA avoids aliasing when shrinking; bicubic keeps edges when enlarging
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    out = np.zeros((n, height, width, 3), np.uint8)
    for i, frame in enumerate(frames):
        r = cv2.resize(frame, (new_w, new_h), interpolation=interp)
        if policy == "pad":
            y, x = (height - new_h) // 2, (width - new_w) // 2
            out[i, y:y + new_h, x:x + new_w] = r
        else:
            y, x = (new_h - height) // 2, (new_w - width) // 2
            out[i] = r[y:y + height, x:x + width]
    return out


def read_frames(reader, indices, height=None, width=None, policy="crop", progress=True, chunk_size=None):
    """Decode `indices` chunk by chunk, resizing each chunk at once: only the resized video is held in RAM.

    >>> read_frames(VideoReader("/tmp/demo.mp4"), range(8), 32, 32, progress=False).shape
    (8, 32, 32, 3)
    """
    indices = list(indices)
    if height is None or width is None:
        height, width = reader.height, reader.width
    out = np.empty((len(indices), height, width, 3), np.uint8)
    bar = tqdm(total=len(indices), desc="decoding video", unit="frame", disable=not progress)
    i = 0
    for chunk in reader.iter_chunks(indices, chunk_size):
        out[i:i + len(chunk)] = resize_frames(chunk, height, width, policy)
        i += len(chunk)
        bar.update(len(chunk))
    bar.close()
    return out


def to_uint8(frames):
    """Frames as uint8: float arrays are taken as [0, 1] (diffusers' "np" output), PIL images converted.

    >>> to_uint8(np.ones((1, 2, 2, 3), np.float32)).max()
    np.uint8(255)
    """
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    if np.issubdtype(frames.dtype, np.floating):
        return (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    return np.clip(frames, 0, 255).astype(np.uint8)


def _iter_frames(frames):
    # accept an (n, H, W, 3) array, a list of frames / PIL images, or an iterable of chunks
    for item in frames:
        item = to_uint8(item)
        if item.ndim == 4:
            yield from item
        elif item.ndim == 3:
            yield item
        else:
            raise ValueError(f"expected frames of shape (H, W, 3), got {item.shape}")


def check_output(path, overwrite=False):
    """Fail early (before any expensive work) if `path` exists and overwrite is off. Creates nothing: the writers
    make the missing parent folders when they write (and remove them again if the write fails).

    >>> check_output("/tmp/new-video.mp4", overwrite=True)
    PosixPath('/tmp/new-video.mp4')
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")
    if path.exists() and path.is_dir() != (path.suffix.lower() not in VIDEO_SUFFIXES):
        raise FileExistsError(f"{path} exists and is a {'folder' if path.is_dir() else 'file'}; "
                              "choose another output path")
    if path.is_dir() and (foreign := [p.name for p in path.iterdir() if not FRAME_NAME.fullmatch(p.name)]):
        raise FileExistsError(f"{path} holds files that are not frames this tool wrote ({foreign[0]}...), which "
                              "--overwrite would delete: choose another output folder")
    return path


def output_bytes(path, num_frames, height, width):
    """A generous estimate of what the output will take: PNGs at half the raw size, H.264 at a 50th of it."""
    raw = num_frames * height * width * 3
    return raw // 50 if Path(path).suffix.lower() in VIDEO_SUFFIXES else raw // 2


def check_room(path, needed_bytes):
    """Before any work: the output can be created where asked (a probe file in its nearest existing folder) and that
    disk has about `needed_bytes` free. One-line VideoError otherwise."""
    folder = Path(path).absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise VideoError(f"cannot write {path}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise VideoError(f"cannot write {path}: {folder} is not writable ({e.strerror or e}); choose another output "
                         "path") from None
    free = shutil.disk_usage(folder).free
    if needed_bytes > free:
        raise VideoError(f"the output {path} needs about {needed_bytes / 2**20:.1f} MiB and {folder} has "
                         f"{free / 2**20:.1f} MiB free: free some space, or write it elsewhere")


FRAME_NAME = re.compile(r"\d{5,}\.png")  # what write_frames_folder writes, and all that --overwrite may replace


def _disk_full(error, path):
    """ENOSPC / EDQUOT as one line; other errors as they are."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return VideoError(f"the disk holding {path} is full (no space left on device); nothing was written there: "
                          "free some space and run again")
    return error


def _remove_stale_partials(path):
    """The hidden `.<name>.partial-<pid>` a killed writer left beside `path`: removed when its process is gone."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makes_parents(write):
    # the output's missing parent folders are made only when writing, and removed again if the write fails
    @functools.wraps(write)
    def wrapper(path, *args, **kwargs):
        missing = [folder for folder in Path(path).absolute().parents if not folder.exists()]  # deepest first
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return write(path, *args, **kwargs)
        except BaseException:
            for folder in missing:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
    return wrapper


def _partial_name(path):
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


@_makes_parents
def write_video(path, frames, fps, audio_from=None, audio_span=None, overwrite=False, crf=18, preset="medium",
                progress=True, total=None, comment=None):
    """Encode frames to an H.264 (yuv420p) mp4 at `fps`, with the audio of `audio_from` between
    `audio_span` = (t0, t1) seconds muxed in (AAC), written atomically. Returns the path.

    frames: an (n, H, W, 3) array, or any iterable of frames or chunks, uint8 or float in [0, 1]. Odd sizes
    are padded by one black pixel (yuv420p needs even sides). No audio when `audio_from` has none. `comment`: the
    container's comment tag.

    >>> write_video("/tmp/grey.mp4", np.full((8, 64, 64, 3), 128, np.uint8), fps=8, overwrite=True,
    ...             progress=False)
    PosixPath('/tmp/grey.mp4')
    """
    path = check_output(path, overwrite)
    if not fps or fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if total is None and hasattr(frames, "__len__"):
        total = len(frames)
    it = _iter_frames(frames)
    first = next(it, None)
    if first is None:
        raise ValueError("no frames to write")
    h, w = first.shape[:2]
    audio = audio_from is not None and probe(audio_from)["has_audio"]
    tmp = _partial_name(path)
    _remove_stale_partials(path)
    cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-framerate", str(_fps_fraction(fps)), "-i", "-"]
    if audio:
        t0, t1 = audio_span if audio_span is not None else (0.0, None)
        cmd += ["-ss", f"{t0:.6f}"] + (["-t", f"{t1 - t0:.6f}"] if t1 is not None else []) + ["-i", str(audio_from)]
        cmd += ["-map", "0:v:0", "-map", "1:a:0", "-c:a", "aac", "-b:a", "192k"]
    cmd += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", "libx264", "-preset", preset, "-crf", str(crf),
            "-pix_fmt", "yuv420p", "-movflags", "+faststart"] + (["-metadata", f"comment={comment}"] if comment else [])
    cmd += ["-f", MUXERS.get(path.suffix.lower(), "mp4"), str(tmp)]
    bar = tqdm(total=total, desc="writing video", unit="frame", disable=not progress)
    count = 0
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: ffmpeg can never block on a full stderr
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log)
        try:
            for frame in _chain(first, it):
                if frame.shape[:2] != (h, w):
                    raise ValueError(f"all frames must have the same size; got {frame.shape[:2]} after {(h, w)}")
                proc.stdin.write(np.ascontiguousarray(frame[..., :3]).tobytes())
                count += 1
                bar.update(1)
            proc.stdin.close()
            rc = proc.wait()
        except BaseException as e:
            proc.kill()
            proc.wait()
            tmp.unlink(missing_ok=True)
            if isinstance(e, BrokenPipeError):
                log.seek(0)
                msg = " ".join(log.read().decode(errors="replace").split())[-500:]
                raise _ffmpeg_error(path, msg, "stopped while writing") from None
            raise
        finally:
            bar.close()
        if rc != 0:
            tmp.unlink(missing_ok=True)
            log.seek(0)
            raise _ffmpeg_error(path, " ".join(log.read().decode(errors="replace").split())[-500:], "failed writing")
    try:  # the file on disk, re-read: all the frames are there (a full disk can end a file early)
        _fsync(tmp)
        written = VideoReader(tmp).num_frames
    except (OSError, VideoError) as e:
        tmp.unlink(missing_ok=True)
        raise _disk_full(e, path) if isinstance(e, OSError) else VideoError(f"{path} could not be read back after "
                                                                            "writing it; nothing was written") from e
    if written != count:
        tmp.unlink(missing_ok=True)
        raise VideoError(f"{path} read back with {written} of {count} frames (disk full?); nothing was written")
    if path.exists() and not overwrite:  # appeared while we were encoding: never clobber it
        tmp.unlink(missing_ok=True)
        raise FileExistsError(f"{path} appeared while rendering; result left unwritten")
    os.replace(tmp, path)
    _fsync(path.parent)
    return path


def _ffmpeg_error(path, log, what):
    if "No space left" in log or "Disk quota" in log:
        return _disk_full(OSError(errno.ENOSPC, "No space left on device"), path)
    return VideoError(f"ffmpeg {what} {path}: {log}")


def _chain(first, rest):
    yield first
    yield from rest


@_makes_parents
def write_frames_folder(path, frames, overwrite=False, progress=True, total=None):
    """Write frames as a folder of PNGs (00000.png, 00001.png, ...), atomically: built under a temporary
    name beside it, then renamed; an existing folder is replaced only with overwrite. Returns the path.

    >>> write_frames_folder("/tmp/frames", np.zeros((3, 8, 8, 3), np.uint8), overwrite=True, progress=False)
    PosixPath('/tmp/frames')
    >>> sorted(p.name for p in Path("/tmp/frames").iterdir())
    ['00000.png', '00001.png', '00002.png']
    """
    path = check_output(path, overwrite)
    if total is None and hasattr(frames, "__len__"):
        total = len(frames)
    tmp = _partial_name(path)
    _remove_stale_partials(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for i, frame in enumerate(tqdm(_iter_frames(frames), total=total, desc="writing frames", unit="frame",
                                       disable=not progress)):
            _write_png(tmp / f"{i:05d}.png", frame)
        _fsync(tmp)
        if path.exists():  # rename the old one away first: the folder is never half old, half new
            check_output(path, overwrite)  # still only our frames
            if not overwrite:
                raise FileExistsError(f"{path} appeared while rendering; result left unwritten")
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and _disk_full(e, path) is not e:
            raise _disk_full(e, path) from e
        raise
    return path


def _write_png(file, frame):
    """One PNG written, flushed, fsynced and checked: encoded in memory, so a full disk is an error, not a 0-byte
    file that cv2.imwrite reports as written."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    if not ok:
        raise VideoError(f"could not encode frame {file.name} as PNG")
    with open(file, "wb") as f:
        f.write(data.tobytes())
        f.flush()
        os.fsync(f.fileno())
    if file.stat().st_size != len(data):
        raise OSError(errno.ENOSPC, f"{file} is {file.stat().st_size} of {len(data)} bytes")


def write_output(path, frames, fps, audio_from=None, audio_span=None, overwrite=False, progress=True, total=None):
    """write_video for video suffixes (.mp4, .mov, .m4v, .mkv), write_frames_folder for anything else."""
    if Path(path).suffix.lower() in VIDEO_SUFFIXES:
        return write_video(path, frames, fps, audio_from, audio_span, overwrite, progress=progress, total=total)
    return write_frames_folder(path, frames, overwrite, progress=progress, total=total)


def sine_wav(path, seconds, freq=440.0, rate=44100, volume=0.3):
    """Write a mono 16-bit sine tone as a WAV file (the demo's soundtrack)."""
    t = np.arange(int(round(seconds * rate))) / rate
    pcm = (volume * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
    return Path(path)


def demo_frames(num_frames=16, height=64, width=64, photo="chelsea"):
    """A real photograph (scikit-image's `chelsea` cat or `astronaut`) seen through a camera that pans
    left to right while zooming in: uint8 (num_frames, height, width, 3)."""
    import skimage.data

    img = getattr(skimage.data, photo)()
    ih, iw = img.shape[:2]
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        p = i / max(1, num_frames - 1)
        zoom = 1.0 + 0.35 * p  # the view shrinks to 1/1.35 of the covering crop
        s = max(height / ih, width / iw) * zoom  # photo pixels -> frame pixels
        vw = width / s  # view width in photo pixels
        cx = vw / 2 + (iw - vw) * (0.2 + 0.6 * p)  # pan across the photo
        cy = ih / 2
        m = np.array([[s, 0, width / 2 - s * cx], [0, s, height / 2 - s * cy]], np.float32)
        frames[i] = cv2.warpAffine(img, m, (width, height), flags=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REFLECT)
    return frames


def make_demo_clip(path, num_frames=16, height=64, width=64, fps=8, photo="chelsea", overwrite=False):
    """Write a short mp4 with sound made from a real photograph with camera motion (pan + zoom) and a
    440 Hz tone: a real file to push through the whole pipeline offline. Returns the path.

    >>> VideoReader(make_demo_clip("/tmp/demo.mp4", 16, 64, 64, 8, overwrite=True)).num_frames
    16
    """
    frames = demo_frames(num_frames, height, width, photo)
    with tempfile.TemporaryDirectory() as d:
        wav = sine_wav(Path(d) / "tone.wav", num_frames / fps)
        return write_video(path, frames, fps, audio_from=wav, overwrite=overwrite, progress=False)


class VideoClip:
    """A lazy selection of a video file's frames at an output size: what the pipeline reads a range at a time, so that
    a long video is never decoded whole (`pipe(video=VideoClip(...))`, or `pipe(video="file.mp4")`).

    >>> clip = VideoClip("/tmp/demo.mp4", indices=range(0, 16, 2), height=32, width=32)
    >>> len(clip), clip.shape, clip.fps, clip.read(0, 3).shape
    (8, (8, 32, 32, 3), 4.0, (3, 32, 32, 3))
    """

    def __init__(self, path_or_reader, indices=None, height=None, width=None, policy="crop", audio=True):
        self.reader = path_or_reader if isinstance(path_or_reader, VideoReader) else VideoReader(path_or_reader)
        self.audio = audio  # whether the output keeps the source's audio
        self.indices = list(range(self.reader.num_frames)) if indices is None else list(indices)
        if not self.indices:
            raise VideoError(f"no frames selected from {self.reader.path}")
        self.height, self.width = int(height or self.reader.height), int(width or self.reader.width)
        self.policy = policy
        self.path = self.reader.path
        self.step = self.indices[1] - self.indices[0] if len(self.indices) > 1 else 1
        self.fps = self.reader.fps / self.step  # keeps the timing of every n-th frame

    def __len__(self):
        return len(self.indices)

    @property
    def shape(self):
        return (len(self.indices), self.height, self.width, 3)

    def read(self, start, end):
        """uint8 frames [start, end) of the selection, resized: (n, height, width, 3)."""
        chunk = self.reader.read(self.indices[start:end])
        return resize_frames(chunk, self.height, self.width, self.policy)

    def audio_span(self):
        """The seconds of the source's audio that go with the selection."""
        return self.reader.span(self.indices, self.step)

    def selection(self):
        """The selection as the render folder records it."""
        return {"indices": [self.indices[0], self.indices[-1], self.step, len(self.indices)],
                "size": [self.height, self.width], "policy": self.policy, "fps": self.reader.fps}
