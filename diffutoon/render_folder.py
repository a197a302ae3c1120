"""The render folder (issue 10): a render's state on disk, so that a long render survives a crash and host memory
stays bounded by a window, not by the video's length.

    <render_dir>/manifest.json              what this render is (settings, input, models, versions) and how far it got
    <render_dir>/progress.json              live progress, rewritten after every window (read it from outside)
    <render_dir>/lock                       "pid host" of the process rendering into the folder
    <render_dir>/conditions/<i>-<kind>.npy  uint8 (N, H, W, 3) per ControlNet; <i>-<kind>.done one byte per chunk
    <render_dir>/latents/step-<k>.npy       float32 (N, 4, h, w) after k completed steps (step-0000: the start)
    <render_dir>/edit/...                   the editing branch's own frames, conditions, latents and colour video
    <render_dir>/scratch/                   the noise-prediction accumulator; safe to delete

Every file is written, flushed, fsynced and renamed into place (or, for the frame arrays, filled chunk by chunk and
recorded as done only once flushed), so a crash at any instant leaves the old state or the new one. The same calls
on `InMemoryRender` keep everything in host memory: the pipeline runs one code path with or without a folder.

Only the standard library, numpy and torch are imported here: the module ships beside the pipeline file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import torch

FORMAT = 1
MARKER = ".diffutoon-render-folder"  # written first into a folder this project makes: only such folders are ever deleted
CHUNK = 16  # frames per chunk of a condition array: the unit of "written" bookkeeping
KEEP_CHECKPOINTS = 2  # the newest and the one before it: a corrupt newest one falls back to the previous step


class RenderFolderError(RuntimeError):
    """A render folder that cannot be used as asked; the message says what to do. `resumable`: running the same
    command again continues the render (a full disk once freed), else a rerun repeats the error."""

    def __init__(self, message: str, resumable: bool = False):
        super().__init__(message)
        self.resumable = resumable


def format_bytes(n: float) -> str:
    """1.50 GiB, 12.3 MiB, 512 KiB, 300 bytes: a size under 0.01 GiB is not shown as 0.00 GiB."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.0f} KiB" if n >= 2**10 else f"{max(int(n), 0)} bytes"


# ---------------------------------------------------------------------------------------------------------------
# Durable files


def fsync_dir(path: Path):
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, durable: bool = True):
    """Write `data` to `path` so that a crash leaves the old file or the new one: temp file, flush, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_json(path: Path, obj, durable: bool = True):
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), durable)


def sha256_file(path: Path, block: int = 1 << 24) -> str:
    """Checksum read a block at a time: host memory holds one block, whatever the file's size."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            digest.update(data)
    return digest.hexdigest()


def _disk_full(error: OSError, folder: Path) -> RenderFolderError | OSError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return RenderFolderError(f"the disk holding the render folder {folder} is full; the folder is intact and "
                                 "resumable: free some space and run the same command again", resumable=True)
    return error


# ---------------------------------------------------------------------------------------------------------------
# Frame arrays: frames on the first axis, read and written a range of frames at a time


class HostFrames:
    """Frames held in host memory (a numpy array, frames on the first axis)."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape, self.dtype = array.shape, array.dtype

    def __len__(self):
        return self.shape[0]

    def read(self, start: int, end: int) -> np.ndarray:
        return self.array[start:end]

    def write(self, start: int, values):
        self.array[start : start + len(values)] = values

    def flush(self):
        pass


class DiskFrames:
    """Frames in a .npy file. Each access maps the file only for that range of frames, so host memory holds one
    range at a time (a long-lived mapping would keep every page it touched resident); `np.load(path, mmap_mode="r")`
    shows the whole array to a person."""

    def __init__(self, path: Path, shape=None, dtype=None):
        self.path = Path(path)
        if shape is not None:  # create: a sparse file whose blocks are reserved now, so a full disk fails here
            array = np.lib.format.open_memmap(self.path, mode="w+", dtype=dtype, shape=tuple(shape))
            offset, nbytes = array.offset, array.nbytes
            del array
            if nbytes:
                with open(self.path, "r+b") as f:
                    try:
                        os.posix_fallocate(f.fileno(), offset, nbytes)
                    except OSError as e:  # a file system without fallocate: the space is claimed as it is written
                        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                            raise
        array = np.load(self.path, mmap_mode="r")
        self.shape, self.dtype = array.shape, array.dtype
        del array

    def __len__(self):
        return self.shape[0]

    def read(self, start: int, end: int) -> np.ndarray:
        array = np.load(self.path, mmap_mode="r")
        out = np.array(array[start:end])
        del array
        return out

    def write(self, start: int, values):
        array = np.load(self.path, mmap_mode="r+")
        array[start : start + len(values)] = values
        array.flush()  # msync: the frames are on disk before anyone records them as written
        del array

    def flush(self):
        with open(self.path, "rb+") as f:
            os.fsync(f.fileno())


def randn_into(frames, generator=None, piece: int = 1 << 20):
    """Fill a frame array (N, C, h, w) with the noise `torch.randn((1, C, N, h, w), generator=generator)` would give,
    drawn a piece at a time so that host memory holds one piece. torch's CPU sampler fills 16 values at a time (the
    last 16 redrawn for a remainder), so pieces of a multiple of 16 values draw the same numbers as one call; other
    devices' generators draw the whole tensor."""
    n, c, rest = frames.shape[0], frames.shape[1], frames.shape[2:]
    per_frame = int(np.prod(rest))
    per_channel = n * per_frame
    total = c * per_channel
    if isinstance(generator, torch.Generator) and generator.device.type != "cpu":
        noise = torch.randn((1, c, n, *rest), generator=generator, device=generator.device).cpu()
        frames.write(0, noise[0].transpose(0, 1).numpy())
        return
    offset = 0
    while offset < total:
        size = min(piece, total - offset)
        if total - offset - size < 16:  # never leave a remainder under 16 values: one call draws it with this piece
            size = total - offset
        values = torch.randn(size, generator=generator).numpy()
        q = offset
        while q < offset + size:  # the piece's part in each channel: a run of values over whole and partial frames
            channel, within = divmod(q, per_channel)
            stop = min(offset + size, (channel + 1) * per_channel) - channel * per_channel
            first, last = within // per_frame, -(-stop // per_frame)
            block = np.array(frames.read(first, last))
            rows = block[:, channel].reshape(last - first, per_frame)  # a view into block
            flat = rows.reshape(-1).copy()
            flat[within - first * per_frame : stop - first * per_frame] = values[q - offset : q - offset + stop - within]
            rows[:] = flat.reshape(rows.shape)
            frames.write(first, block)
            q += stop - within
        offset += size


class ChunkLog:
    """Which CHUNK-frame chunks of a frame array are written: one byte per chunk, in memory or in a file."""

    def __init__(self, num_frames: int, path: Path | None = None):
        self.num_chunks = -(-num_frames // CHUNK)
        self.path = path
        if path is None:
            self.bytes = bytearray(self.num_chunks)
        elif not Path(path).exists() or Path(path).stat().st_size != self.num_chunks:
            atomic_write(path, bytes(self.num_chunks))

    def done(self, chunk: int) -> bool:
        if self.path is None:
            return bool(self.bytes[chunk])
        with open(self.path, "rb") as f:
            f.seek(chunk)
            return f.read(1) == b"\x01"

    def mark(self, chunk: int):
        if self.path is None:
            self.bytes[chunk] = 1
            return
        fd = os.open(self.path, os.O_WRONLY)  # one byte at the chunk's offset: several processes may mark at once
        try:
            os.pwrite(fd, b"\x01", chunk)
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# The render's state: in memory, or in a folder


class InMemoryRender:
    """A render with no folder: frame arrays in host memory, no checkpoints, progress to the callback only."""

    completed = False  # set once the output is complete: only then does a folder go
    group = None  # diffutoon.distributed.Group when the render is split over processes (a SharedRun says so)

    def __init__(self, progress_callback=None):
        self.progress_callback = progress_callback
        self.resumed = []  # what a resume found done: "conditions", "main step 6"...
        self.progress = {"stage": "reading", "started_at": time.time()}
        self._stage_started = (time.time(), 0)
        self._stages = set()

    # frame arrays
    def frames(self, name: str, shape, dtype) -> tuple:
        """(frame array, chunk log) named e.g. "conditions/0-lineart"; reopened as they are on a resume."""
        return HostFrames(np.empty(shape, dtype)), ChunkLog(shape[0])

    def latents(self, name: str, step: int, shape):
        """A new frame array for the latents of `name` ("main", "edit") after `step` completed steps."""
        return HostFrames(np.empty(shape, np.float32))

    def scratch(self, name: str, shape):
        """A zeroed float32 accumulator."""
        return HostFrames(np.zeros(shape, np.float32))

    # stages and checkpoints
    def stage_done(self, name: str) -> bool:
        return name in self._stages

    def finish_stage(self, name: str):
        self._stages.add(name)

    def checkpoint(self, name: str, step: int, latents, state: dict | None = None):
        pass

    def resume(self, name: str):
        """(completed steps, latents, scheduler state) of the newest intact checkpoint of pass `name`, or None."""
        return None

    # progress
    def report(self, **fields):
        """Merge `fields` into the progress dict, estimate the time left, publish it."""
        now = time.time()
        if fields.get("stage", self.progress.get("stage")) != self.progress.get("stage") or \
                fields.get("pass", self.progress.get("pass")) != self.progress.get("pass"):
            self._stage_started = (now, fields.get("done", 0))
        self.progress.update(fields, updated_at=now)
        t0, done0 = self._stage_started
        done, total = self.progress.get("done"), self.progress.get("total")
        rate = (done - done0) / (now - t0) if done is not None and done > done0 and now > t0 else None
        self.progress["eta_seconds"] = (total - done) / rate if rate and total is not None else None
        self._publish()
        if self.progress_callback is not None:
            self.progress_callback(dict(self.progress))

    def _publish(self):
        pass

    def finish(self, complete: bool = True):
        """The output is written: a complete render's folder may go when the `with` block ends."""
        self.completed = complete
        self.report(stage="done" if complete else "interrupted", done=self.progress.get("total"))

    def close(self, success: bool, keep: bool = False):
        pass

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        self.close(success=self.completed and kind is None, keep=self.keep)

    keep = False


class RenderFolder(InMemoryRender):
    """A render's state in a folder (layout in the module docstring): resumable after a crash at any instant."""

    def __init__(self, path, identity: dict, fresh: bool = False, progress_callback=None, needed_bytes: int = 0,
                 keep: bool = False):
        super().__init__(progress_callback)
        self.keep = keep
        self.path = Path(path).absolute()
        self.identity = json.loads(json.dumps(identity))  # as it will read back from the manifest
        if self.path.exists() and not self.path.is_dir():
            raise RenderFolderError(f"render folder {self.path} is a file: choose a folder path")
        made = [folder for folder in [self.path, *self.path.parents] if not folder.exists()]  # deepest first
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock(fresh)
        except OSError as e:
            raise RenderFolderError(f"cannot use {self.path} as the render folder: {e.strerror or e}") from e
        try:
            self._open(fresh, needed_bytes, created=bool(made))
        except BaseException:
            self._unlock()
            if made and not (self.path / "manifest.json").exists():  # a refusal leaves no empty folder behind
                (self.path / MARKER).unlink(missing_ok=True)
                for folder in made:
                    with contextlib.suppress(OSError):
                        folder.rmdir()
            raise

    def _open(self, fresh: bool, needed_bytes: int, created: bool):
        manifest_file, ours = self.path / "manifest.json", is_render_folder(self.path)
        if not ours and any(p.name != "lock" for p in self.path.iterdir()):
            raise RenderFolderError(f"{self.path} is not empty and holds no render (it is not a render folder this "
                                    "tool made, so nothing in it is touched): choose an empty or new folder for the "
                                    "render state")
        manifest = None
        if manifest_file.exists():
            try:
                manifest = json.loads(manifest_file.read_text())
                if not isinstance(manifest, dict) or not isinstance(manifest.get("identity"), dict):
                    raise ValueError("not a manifest")
            except (ValueError, UnicodeDecodeError) as e:
                if not fresh:
                    raise RenderFolderError(f"the manifest of the render folder {self.path} is unreadable, so it "
                                            "cannot be resumed: start over with fresh=True (--fresh), or choose another "
                                            "folder") from e
                manifest = {}
        if manifest and not fresh:
            differences = identity_differences(manifest.get("identity", {}), self.identity)
            if manifest.get("format") != FORMAT:
                differences.insert(0, f"folder format {manifest.get('format')} (this version writes {FORMAT})")
            if differences:
                raise RenderFolderError(
                    f"render folder {self.path} holds a different render, so it cannot be resumed: "
                    + "; ".join(differences[:6]) + (f"; and {len(differences) - 6} more" if len(differences) > 6
                                                    else "")
                    + ". Start over with fresh=True (--fresh), or choose another folder.")
            self.manifest = manifest
        else:
            if manifest is not None:  # fresh: everything but the lock goes (the folder is ours: checked above)
                created = bool(manifest.get("created_folder", False))
                for child in self.path.iterdir():
                    if child.name not in ("lock", MARKER):
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
            self.manifest = {"format": FORMAT, "created_at": time.time(), "identity": self.identity,
                             "stages": [], "passes": {}, "created_folder": created}
        free = shutil.disk_usage(self.path).free
        if needed_bytes > free + self._bytes_on_disk():
            raise RenderFolderError(
                f"the render folder needs about {format_bytes(needed_bytes)} and {self.path} has "
                f"{format_bytes(free)} free: free some space, or choose a folder on a larger disk")
        if not (self.path / MARKER).exists():
            try:
                atomic_write(self.path / MARKER, f"diffutoon render folder, format {FORMAT}\n".encode())
            except OSError as e:
                raise _disk_full(e, self.path) from e
        self._write_manifest()
        self._stages = set(self.manifest["stages"])

    def _bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    # the lock: one render per folder at a time
    def _lock(self, fresh: bool = False):
        lock, me = self.path / "lock", f"{os.getpid()} {socket.gethostname()}"
        for attempt in range(20):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder, age = lock.read_text(errors="replace").split(), time.time() - lock.stat().st_mtime
                except FileNotFoundError:
                    continue  # just released
                if len(holder) == 2 and holder[1] == socket.gethostname() and holder[0].isdigit() and \
                        not _alive(int(holder[0])):
                    lock.unlink(missing_ok=True)  # a stale lock of a dead process: take it over
                    continue
                if len(holder) != 2 or not holder[0].isdigit():  # empty or garbage: its writer died, or is writing
                    if fresh or age > 5:
                        lock.unlink(missing_ok=True)
                        continue
                    if attempt < 19:
                        time.sleep(0.05)
                        continue
                    raise RenderFolderError(f"the lock {lock} of the render folder is empty or unreadable: if no "
                                            "render is using the folder, pass fresh=True (--fresh) or delete it")
                raise RenderFolderError(f"render folder {self.path} is in use by process {holder[0]} on "
                                        f"{holder[1]}: wait for it to finish, or stop it (if it is gone, delete {lock})")
            with os.fdopen(fd, "w") as f:
                f.write(me)
                f.flush()
                os.fsync(f.fileno())
            self._locked = True
            return
        raise RenderFolderError(f"could not take the lock {lock}: another process keeps taking it")

    def _unlock(self):
        if getattr(self, "_locked", False):
            (self.path / "lock").unlink(missing_ok=True)
            self._locked = False

    def _write_manifest(self):
        try:
            atomic_write_json(self.path / "manifest.json", self.manifest)
        except OSError as e:
            raise _disk_full(e, self.path) from e

    # frame arrays
    def frames(self, name: str, shape, dtype) -> tuple:
        file = self.path / f"{name}.npy"
        file.parent.mkdir(parents=True, exist_ok=True)
        try:
            existing = DiskFrames(file) if file.exists() else None
            if existing is None or existing.shape != tuple(shape) or existing.dtype != np.dtype(dtype):
                (self.path / f"{name}.done").unlink(missing_ok=True)
                existing = DiskFrames(file, shape, dtype)
            return existing, ChunkLog(shape[0], self.path / f"{name}.done")
        except OSError as e:
            raise _disk_full(e, self.path) from e

    def latents(self, name: str, step: int, shape):
        folder = self._latent_folder(name)
        folder.mkdir(parents=True, exist_ok=True)
        try:  # written under a temporary name, renamed in `checkpoint` once complete
            return DiskFrames(folder / f".step-{step:04d}.npy.partial", shape, np.float32)
        except OSError as e:
            raise _disk_full(e, self.path) from e

    def scratch(self, name: str, shape):
        (self.path / "scratch").mkdir(exist_ok=True)
        try:  # a new sparse file reads as zeros
            return DiskFrames(self.path / "scratch" / f"{name}.npy", shape, np.float32)
        except OSError as e:
            raise _disk_full(e, self.path) from e

    def _latent_folder(self, name: str) -> Path:
        return self.path / ("latents" if name == "main" else f"{name}/latents")

    # stages and checkpoints
    def finish_stage(self, name: str):
        super().finish_stage(name)
        self.manifest["stages"] = sorted(self._stages)
        self._write_manifest()

    def checkpoint(self, name: str, step: int, latents: DiskFrames, state: dict | None = None):
        """Make `latents` (from `self.latents(name, step, ...)`) and `state` (the scheduler's and the generator's,
        saved with torch.save) the durable state after `step` steps: fsync, rename, checksum, then the manifest names
        them; older checkpoints beyond KEEP_CHECKPOINTS go last."""
        folder = self._latent_folder(name)
        final = folder / f"step-{step:04d}.npy"
        try:
            latents.flush()
            os.replace(latents.path, final)
            fsync_dir(folder)
            latents.path = final
            entry = {"step": step, "file": str(final.relative_to(self.path)), "sha256": sha256_file(final)}
            if state is not None:
                state_file = folder / f"state-{step:04d}.pt"
                buffer = io.BytesIO()
                torch.save(state, buffer)
                atomic_write(state_file, buffer.getvalue())
                entry.update(state=str(state_file.relative_to(self.path)), state_sha256=sha256_file(state_file))
            record = self.manifest["passes"].setdefault(name, {"checkpoints": []})
            old = record["checkpoints"]
            record["checkpoints"] = [entry] + [c for c in old if c["step"] < step][: KEEP_CHECKPOINTS - 1]
            record["completed_steps"] = step
            self._write_manifest()
        except OSError as e:
            raise _disk_full(e, self.path) from e
        kept = {c["file"] for c in record["checkpoints"]} | {c.get("state") for c in record["checkpoints"]}
        for stale in folder.iterdir():
            if stale.name.startswith(("step-", "state-")) and str(stale.relative_to(self.path)) not in kept:
                stale.unlink(missing_ok=True)

    def resume(self, name: str):
        record = self.manifest["passes"].get(name)
        if not record:
            return None
        for entry in record["checkpoints"]:
            file = self.path / entry["file"]
            problem = None
            if not file.exists():
                problem = "is missing"
            elif sha256_file(file) != entry["sha256"]:
                problem = "is corrupt (its checksum differs from the manifest's)"
            elif entry.get("state") and (not (self.path / entry["state"]).exists() or
                                         sha256_file(self.path / entry["state"]) != entry["state_sha256"]):
                problem = "has a missing or corrupt scheduler/generator state"
            if problem is None:
                state = None
                if entry.get("state"):
                    state = torch.load(self.path / entry["state"], weights_only=False)
                return entry["step"], DiskFrames(file), state
            print(f"render folder: checkpoint {entry['file']} {problem}; falling back to the one before")
        raise RenderFolderError(f"no intact checkpoint of the {name} pass is left in {self.path}, so it cannot be "
                                "resumed: start over with fresh=True (--fresh)")

    # progress
    def _publish(self):
        try:
            atomic_write_json(self.path / "progress.json", self.progress, durable=False)  # readers see old or new
        except OSError as e:
            raise _disk_full(e, self.path) from e

    def __exit__(self, kind, error, traceback):
        super().__exit__(kind, error, traceback)
        if isinstance(error, OSError) and not isinstance(error, RenderFolderError):
            disk_full = _disk_full(error, self.path)
            if disk_full is not error:
                raise disk_full from error

    def close(self, success: bool, keep: bool = False):
        """Release the folder; on success it is removed unless `keep`. On failure it stays, resumable."""
        if success and not keep:
            if self.manifest.get("created_folder", True):
                shutil.rmtree(self.path, ignore_errors=True)
                return
            for child in self.path.iterdir():  # a folder the user made stays, emptied of what the render wrote
                if child.name != "lock":
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
            (self.path / "lock").unlink(missing_ok=True)
            self._locked = False
            return
        shutil.rmtree(self.path / "scratch", ignore_errors=True)
        self._unlock()


def is_render_folder(path) -> bool:
    """Whether `path` is a render folder this project made: its marker, or (folders from before the marker) a manifest
    of this format."""
    path = Path(path)
    if (path / MARKER).is_file():
        return True
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(manifest, dict) and {"format", "identity", "stages", "passes"} <= set(manifest)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------------------------
# Identities: what a render is, to refuse resuming a different one


def scheduler_state(scheduler) -> dict:
    """Everything a scheduler keeps between steps (step index, multistep history...), its config aside."""
    return {k: v for k, v in vars(scheduler).items() if k != "_internal_dict"}


def identity_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two identity dicts, e.g. "prompt: 'a' (folder) vs 'b' (now)"."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            show = lambda v: repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."  # noqa: E731
            out.append(f"{prefix}{key} differs ({show(a)} in the folder, {show(b)} now)")
    return out


def tensor_fingerprint(values) -> str:
    """A short hash of an array or tensor's shape, dtype and every value (frames, latents, generator states)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        values = values.float().numpy() if values.dtype == torch.bfloat16 else values.numpy()
    values = np.asarray(values)
    digest = hashlib.sha256(f"{values.shape} {values.dtype}".encode())
    digest.update(np.ascontiguousarray(values).data)
    return digest.hexdigest()[:16]


def _bits_sum(flat: torch.Tensor) -> int:
    """The sum of a tensor's raw bits read as integers: exact, so it does not depend on the order of the reduction
    (a float sum changes in its last digits with the number of threads, and a resume on another machine would be
    refused)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(flat.element_size())
    if ints is None:  # no model holds such tensors; their float sum is still a fingerprint
        return int(flat.double().sum().item() * 2**20)
    return int(flat.contiguous().view(ints).to(torch.int64).sum())


def module_fingerprint(module: torch.nn.Module) -> str:
    """Parameters and buffers (names, shapes, a strided sample and the exact sum of the bits of each), active adapters
    included: the same on every machine and thread count for the same weights."""
    digest = hashlib.sha256(type(module).__name__.encode())
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)].float().cpu().numpy()
            digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype} {_bits_sum(flat)}".encode())
            digest.update(sample.tobytes())
    for layer in module.modules():  # peft LoRA scales set by set_adapters live outside the parameters
        scaling = getattr(layer, "scaling", None)
        if isinstance(scaling, dict):
            digest.update(repr(sorted(scaling.items())).encode())
            digest.update(repr(getattr(layer, "active_adapters", None)).encode())
    return digest.hexdigest()[:16]


def file_fingerprint(path) -> dict:
    """A video file's identity: its size and the SHA-256 of its whole content, read a block at a time. The hash is
    kept in a small cache (`hash_cache_file()`) with the file's size, mtime and inode, so an unchanged file is hashed
    once, however often a render of it is resumed."""
    path = Path(path)
    stat = path.stat()
    key, stamp = str(path.resolve()), [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    cache_file = hash_cache_file()
    try:
        cache = json.loads(cache_file.read_text())
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError, UnicodeDecodeError):
        cache = {}
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return {"bytes": stat.st_size, "sha256": entry["sha256"]}
    digest = sha256_file(path)
    cache[key] = {"stamp": stamp, "sha256": digest}
    try:  # a cache that cannot be written only costs a rehash next time
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache_file, dict(list(cache.items())[-1000:]), durable=False)
    except OSError:
        pass
    return {"bytes": stat.st_size, "sha256": digest}


def hash_cache_file() -> Path:
    """$DIFFUTOON_CACHE (default $XDG_CACHE_HOME/diffutoon or ~/.cache/diffutoon) / input-hashes.json."""
    root = os.environ.get("DIFFUTOON_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
        "diffutoon"
    return Path(root) / "input-hashes.json"


def checkpoint_state(scheduler, generator, guidance_scale=None, cond=None) -> dict:
    """What a checkpoint keeps besides the latents, for a resume that continues exactly where the render stopped: the
    scheduler's and the generator's states, and what a step-end callback may have changed (guidance, embeddings)."""
    return {"scheduler": scheduler_state(scheduler) if scheduler is not None else None,
            "generator": generator.get_state() if isinstance(generator, torch.Generator) else None,
            "guidance_scale": guidance_scale,
            "embeds": None if cond is None else (cond.prompt_embeds, cond.negative_prompt_embeds)}


def restore_state(scheduler, generator, state: dict | None, pipe=None, cond=None):
    """Put back what `checkpoint_state` kept (the callbacks' changes into `pipe` and `cond`, when given)."""
    if not state:
        return
    if scheduler is not None and state.get("scheduler") is not None:
        vars(scheduler).update(state["scheduler"])
    if isinstance(generator, torch.Generator) and state.get("generator") is not None:
        generator.set_state(state["generator"])
    if cond is not None and state.get("embeds") is not None:
        cond.prompt_embeds, cond.negative_prompt_embeds = state["embeds"]
        pipe._guidance_scale = state["guidance_scale"]


def setting_identity(value):
    """A setting as the render folder's manifest records it: JSON values as they are, tensors, arrays, frame lists and
    generators by a fingerprint of their content, other objects by their type."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): setting_identity(v) for k, v in value.items()}
    if isinstance(value, torch.Generator):
        return f"generator {tensor_fingerprint(value.get_state())}"
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"tensor {tensor_fingerprint(value)}"
    if isinstance(value, (list, tuple)):
        if value and hasattr(value[0], "convert") and hasattr(value[0], "size"):  # PIL images
            return f"frames {tensor_fingerprint(np.stack([np.asarray(f) for f in value]))}"
        return [setting_identity(v) for v in value]
    modules = {k: v for k, v in sorted(vars(value).items()) if isinstance(v, torch.nn.Module)} \
        if hasattr(value, "__dict__") and not isinstance(value, torch.nn.Module) else {}
    if isinstance(value, torch.nn.Module):
        modules = {"": value}
    if modules:  # an annotator (controlnet-aux detectors hold their networks): its weights, not only its class
        return f"{type(value).__name__} " + "-".join(module_fingerprint(m) for m in modules.values())
    return type(value).__name__


def versions() -> dict:
    """The versions whose numerics a resume must share to be bit-identical."""
    import diffusers
    import transformers
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("diffutoon")
    except PackageNotFoundError:  # the pipeline file loaded from a Hub folder
        ours = "unknown"
    return {"diffutoon": ours, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__}


def folder_bytes(n: int, height: int, width: int, nets: int, factor: int, edit: dict, edit_nets: int) -> int:
    """About what a render folder holds at most: condition frames, checkpoints and the accumulator."""
    latents = n * 4 * (height // factor) * (width // factor) * 4
    total = n * height * width * 3 * nets + latents * 4  # 2 checkpoints, the one being written, the accumulator
    if edit:
        eh, ew = edit["height"], edit["width"]
        total += n * eh * ew * 3 * (3 + edit_nets) + n * 4 * (eh // factor) * (ew // factor) * 4 * 4
    return total
