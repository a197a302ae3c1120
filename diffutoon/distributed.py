"""One video over several processes and machines with torch.distributed (issue 12), bit-identical to one process.

A pipeline call made inside an initialised process group of more than one process (torchrun) splits the render:

- every denoising step, each rank runs a contiguous share of the sliding windows, balanced by frames (contiguous so
  that the per-frame work reused across overlapping windows still pays), and the ranks assemble the full-length noise
  prediction so that each frame's sum over windows runs in the same order as on one process (0 + c1 + c2 + ...):
  rank r sums its windows' weighted predictions; the frames it shares with the previous rank's windows are summed
  only once that rank's running sum has arrived (send/recv in rank order, a few frames per rank); then every rank
  sends the frames it owns (those whose last window is its own) to every other rank (all_gather), and all take the
  same scheduler step on the same full-length prediction. Per step each rank receives about one full-length
  prediction (N x 4 x h x w float32, padded to the largest share) plus its shared frames;
- condition frames: each rank makes those its windows read; VAE encoding and decoding go round-robin, a chunk of
  frames per rank at a time; rank 0 gets the decoded frames in order and alone writes the output;
- the render's state: rank 0's run (a render folder, or memory) is the one that persists: lock, manifest,
  checkpoints; the other ranks keep what they need in memory, so a shared folder path is not needed (several
  machines). Where to resume and which stages are done is rank 0's answer, broadcast with its checkpoint, so a render
  may resume with any number of processes;
- faults: before each exchange the ranks trade a small status message (on gloo: a dead peer is noticed at once, a hung
  one after DIFFUTOON_DIST_TIMEOUT seconds), so an error on one rank, or a different call on another, stops every rank
  with one message naming it.

Only the standard library, numpy and torch are imported here: the module ships beside the pipeline file.
"""

from __future__ import annotations

import datetime
import os

import numpy as np
import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("DIFFUTOON_DIST_TIMEOUT", 1800)))
RESUME = ("with render_dir, the folder keeps the last completed step: run the same command again, with any number of "
          "processes, to resume")
PIECE = 16  # frames per broadcast: host memory holds one piece
_CONTROL = {}  # the gloo group for status messages when the default group is NCCL (made once per process)


class DistributedError(RuntimeError):
    """Another process of a split render failed, died, hangs or was given another render: every process stops."""


def process_group(distributed: bool | None = None) -> Group | None:
    """The group splitting a call, or None. `distributed` None: split inside an initialised torch.distributed process
    group of more than one process; False: never (each process renders on its own); True: require one."""
    if distributed is False:
        return None
    ready = dist.is_available() and dist.is_initialized()
    if distributed and not ready:
        raise ValueError("distributed=True needs an initialised torch.distributed process group: launch with torchrun "
                         "and call torch.distributed.init_process_group() first (or leave distributed=None).")
    return Group() if ready and dist.get_world_size() > 1 else None


def process_rank(group) -> int:
    """This process's rank in `group`; 0 alone."""
    return 0 if group is None else group.rank


def shares(windows: list[tuple[int, int]], world: int) -> list[list[tuple[int, int]]]:
    """Contiguous shares of `windows`, one per rank, balanced by frames: a window goes to the rank whose equal part of
    the total frame count holds the window's first frame. The last ranks get none when windows are fewer than ranks.

    >>> shares([(0, 4), (3, 7), (6, 10)], 2)
    [[(0, 4), (3, 7)], [(6, 10)]]
    """
    total, done, out = sum(e - s for s, e in windows), 0, [[] for _ in range(world)]
    for s, e in windows:
        out[world * done // total].append((s, e))
        done += e - s
    return out


def map_chunks(group, what: str, items, fn, dst: int | None = None):
    """(item, fn(item)) for every item, in order. Alone: computed here, lazily. In a group: item k is computed by rank
    k % world and the results are exchanged a round at a time: every rank gets every result (dst None), or only rank
    `dst` (the others yield nothing). fn returns a numpy array or a tensor (the same kind comes back)."""
    if group is None:
        return ((item, fn(item)) for item in items)
    return group.map(what, items, fn, dst)


def broadcast_frames(group, frames, what: str = "sharing frames"):
    """Rank 0's frame array (N, ...) copied into every rank's `frames`; returns `frames`."""
    return frames if group is None else group.broadcast_frames(what, frames)


def _describe(error) -> str | None:
    return None if error is None else f"{type(error).__name__}: {error}"


def _meta(payload) -> tuple | None:
    """What a receiver needs to rebuild a payload from bytes."""
    if payload is None:
        return None
    kind = "numpy" if isinstance(payload, np.ndarray) else "torch"
    dtype = torch.from_numpy(np.empty(0, payload.dtype)).dtype if kind == "numpy" else payload.dtype
    return kind, tuple(payload.shape), str(dtype).removeprefix("torch.")


def _nbytes(meta) -> int:
    return 0 if meta is None else int(np.prod(meta[1])) * torch.empty(0, dtype=getattr(torch, meta[2])).element_size()


def _as_bytes(payload) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(payload)) if isinstance(payload, np.ndarray) else payload
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _from_bytes(data: torch.Tensor, meta):
    kind, shape, dtype = meta
    tensor = data.view(getattr(torch, dtype)).reshape(shape).cpu()
    return tensor.numpy() if kind == "numpy" else tensor


def _differences(a, b, prefix: str = "") -> list[str]:
    """The keys (dotted paths) where two identity dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".") or "the render"]


def _shared(error) -> bool:
    """True when every rank already knows of `error` (raised by an exchange)."""
    return isinstance(error, DistributedError) or getattr(error, "_diffutoon_shared", False)


class Group:
    """The processes of the default torch.distributed group, as one render sees them."""

    def __init__(self):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        backend = str(dist.get_backend())
        # NCCL moves tensors between GPUs; gloo (CPU) moves host tensors
        self.device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        self.control = None if "gloo" in backend else _control_group()  # statuses on gloo: a dead peer shows at once
        self.exchanges = 0  # status exchanges so far: ranks at different counts are out of step
        self.bytes_received = 0  # tensor bytes this rank received (padding included), for the bench

    # -- status: the small message every exchange starts with

    def agree(self, what: str, error: BaseException | None = None, interrupted: bool = False, info=None) -> list:
        """Trade (count, what, error, interrupted, info) with every rank; raise this rank's `error`, else a
        DistributedError if another rank failed or is elsewhere in the program. Returns every rank's status."""
        self.exchanges += 1
        every = [None] * self.world
        try:
            dist.all_gather_object(every, (self.exchanges, what, _describe(error), interrupted, info), group=self.control)
        except Exception as e:
            raise self.lost(what, e) from e
        if error is not None:
            try:
                error._diffutoon_shared = True  # the others know: no second message when it leaves the call
            except AttributeError:
                pass
            raise error
        for r, (_, where, failure, _, _) in enumerate(every):
            if failure is not None:
                raise DistributedError(f"process {r} of {self.world} failed while {where}: {failure}. Every process "
                                       f"stops; {RESUME}.")
        if len({(count, where) for count, where, *_ in every}) > 1:
            places = "; ".join(f"process {r} {where} (exchange {count})" for r, (count, where, *_) in enumerate(every))
            raise DistributedError(f"the processes are out of step: {places}. Give every process the same call.")
        return every

    def lost(self, what: str, error: BaseException) -> DistributedError:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        return DistributedError(f"process {self.rank} of {self.world} lost contact with the others while {what} "
                                f"({first}): another process died, was killed, or hangs (past the process group's "
                                f"timeout). Every process stops; {RESUME}.")

    def broadcast_object(self, what: str, obj=None, error: BaseException | None = None):
        """Rank 0's small picklable `obj` on every rank."""
        return self.agree(what, error, info=obj if self.rank == 0 else None)[0][4]

    # -- tensors

    def exchange(self, what: str, payload=None, error: BaseException | None = None, interrupted: bool = False,
                 dst: int | None = None):
        """Every rank's payload (numpy array, tensor or None), in rank order, on every rank (dst None) or on rank
        `dst` (the others get None); None on every rank if one was interrupted. Errors as in `agree`."""
        every = self.agree(what, error, interrupted, _meta(payload))
        if any(status[3] for status in every):
            return None
        return self._gather(what, [status[4] for status in every], payload, dst)

    def _gather(self, what: str, metas: list, payload, dst: int | None):
        """all_gather (or gather to `dst`) of payloads whose metas every rank knows, as bytes padded to the largest."""
        sizes = [_nbytes(meta) for meta in metas]
        receives = dst is None or dst == self.rank
        if not max(sizes):
            return [None] * self.world if receives else None
        flat = torch.zeros(max(sizes), dtype=torch.uint8, device=self.device)
        if payload is not None:
            flat[: sizes[self.rank]] = _as_bytes(payload).to(self.device)
        buffers = [torch.empty_like(flat) for _ in range(self.world)] if receives else None
        try:
            dist.all_gather(buffers, flat) if dst is None else dist.gather(flat, buffers, dst=dst)
        except Exception as e:
            raise self.lost(what, e) from e
        if not receives:
            return None
        self.bytes_received += flat.numel() * (self.world - 1)
        return [None if m is None else _from_bytes(b[:n], m) for b, n, m in zip(buffers, sizes, metas)]

    def send(self, what: str, array: np.ndarray, dst: int):
        try:
            dist.send(torch.from_numpy(np.ascontiguousarray(array)).to(self.device), dst)
        except Exception as e:
            raise self.lost(what, e) from e

    def recv(self, what: str, shape: tuple, src: int) -> np.ndarray:
        buffer = torch.empty(shape, dtype=torch.float32, device=self.device)
        try:
            dist.recv(buffer, src)
        except Exception as e:
            raise self.lost(what, e) from e
        self.bytes_received += buffer.numel() * 4
        return buffer.cpu().numpy()

    def broadcast_frames(self, what: str, frames):
        """Rank 0's frame array copied into every rank's `frames` (same shape), PIECE frames at a time."""
        self.agree(what)
        dtype = torch.from_numpy(np.empty(0, frames.dtype)).dtype
        for start in range(0, len(frames), PIECE):
            end = min(start + PIECE, len(frames))
            if self.rank == 0:
                piece = torch.from_numpy(np.ascontiguousarray(frames.read(start, end))).to(self.device)
            else:
                piece = torch.empty((end - start, *frames.shape[1:]), dtype=dtype, device=self.device)
            try:
                dist.broadcast(piece, src=0)
            except Exception as e:
                raise self.lost(what, e) from e
            if self.rank:
                frames.write(start, piece.cpu().numpy())
                self.bytes_received += piece.numel() * piece.element_size()
        return frames

    # -- the work

    def map(self, what: str, items, fn, dst: int | None = None):
        """See `map_chunks`."""
        items = list(items)
        for first in range(0, len(items), self.world):
            result, error = None, None
            if first + self.rank < len(items):
                try:
                    result = fn(items[first + self.rank])
                except Exception as e:
                    error = e
            results = self.exchange(what, result, error, dst=dst)
            if results is not None:
                yield from zip(items[first : first + self.world], results)

    def span(self, windows: list[tuple[int, int]]) -> tuple[int, int]:
        """The frames [start, end) this rank's windows read: from the canonical chunk (diffutoon/reuse.py) holding
        its first window's first frame (the chunk starts where an earlier window ends) to its last window's end."""
        mine = shares(windows, self.world)[self.rank]
        if not mine:
            return 0, 0
        return max((e for _, e in windows if e <= mine[0][0]), default=0), mine[-1][1]

    def denoise(self, predict, windows: list[tuple[int, int]], out, on_window=None, interrupted=lambda: False):
        """The full-length noise prediction written into `out` (a frame array (N, C, h, w)) on every rank, equal bit
        for bit to one process summing every window's weighted prediction in window order; None if a rank was
        interrupted. `predict(windows)` yields (start, end, weighted prediction (1, C, f, h, w)) for those windows."""
        split = shares(windows, self.world)
        busy = [r for r in range(self.world) if split[r]]
        before, after = [r for r in busy if r < self.rank], [r for r in busy if r > self.rank]
        mine, frame, error, stopped = split[self.rank], tuple(out.shape[1:]), None, False
        if mine:
            lo, hi = mine[0][0], mine[-1][1]
            head = split[before[-1]][-1][1] if before else lo  # frames [lo, head) are in earlier ranks' windows too
            total, parts = np.zeros((hi - lo, *frame), np.float32), []
        try:
            done = 0
            for start, end, weighted in predict(mine) if mine else ():
                w = weighted[0].transpose(0, 1).numpy()
                if start < head:  # added after the earlier ranks' sum arrives, as one process would
                    parts.append((start, w[: head - start]))
                first = max(start, head)
                total[first - lo : end - lo] += w[first - start :]
                done += 1
                if on_window is not None:
                    on_window()
            stopped = done < len(mine) if mine else bool(interrupted())
        except Exception as e:
            error = e
        if any(status[3] for status in self.agree("denoising", error, stopped)):
            return None  # every rank drops the step
        if mine:
            if before and head > lo:  # the earlier ranks' running sum of the shared frames, then this rank's windows
                shared = self.recv("denoising", (head - lo, *frame), before[-1])
                for start, w in parts:
                    shared[start - lo : start - lo + len(w)] += w
                total[: head - lo] = shared
            if after and split[after[0]][0][0] < hi:  # nothing is shared when a scene cut falls between the shares
                self.send("denoising", total[split[after[0]][0][0] - lo :], after[0])
        # each frame's final value is on the rank holding its last window: from there to every rank
        owned = {r: (split[r][0][0], split[nxt][0][0] if nxt is not None else len(out))
                 for r, nxt in zip(busy, busy[1:] + [None])}
        metas = [("numpy", (owned[r][1] - owned[r][0], *frame), "float32") if r in owned else None
                 for r in range(self.world)]
        payload = total[owned[self.rank][0] - lo : owned[self.rank][1] - lo] if mine else None
        for r, values in enumerate(self._gather("denoising", metas, payload, None)):
            if values is not None:
                out.write(owned[r][0], values)
        return out


def _control_group():
    key = id(dist.group.WORLD)
    if key not in _CONTROL:
        _CONTROL[key] = dist.new_group(backend="gloo", timeout=TIMEOUT)
    return _CONTROL[key]


# ----------------------------------------------------------------------------------------------------------------
# The render's state over a group


def open_shared_run(group: Group, identity: dict, open_run, windows: dict, chunk: int) -> SharedRun:
    """Check that every rank was given the same render (`identity`: settings, input, models, versions), then open
    the run: `open_run(True)` on rank 0 (its render folder, if any: lock, manifest), `open_run(False)` elsewhere
    (memory). `windows`: {frame-array name prefix: the windows that read those frames} (e.g. "conditions/")."""
    every = group.agree("starting the render", info=identity)
    for r, status in enumerate(every):
        differences = _differences(every[0][4], status[4])
        if differences:
            raise DistributedError(f"process {r} of {group.world} was given another render than process 0: "
                                   f"{', '.join(differences[:6])} differ. Give every process the same call (inputs, "
                                   "settings, seed, models, versions).")
    run, error = None, None
    try:
        run = open_run(group.rank == 0)
    except Exception as e:
        error = e
    group.agree("opening the render state", error)
    return SharedRun(run, group, windows, chunk)


class _Share:
    """A chunk log whose chunks outside this rank's frames read as done: no window here reads them."""

    def __init__(self, log, span: tuple[int, int], chunk: int):
        self.log, (self.lo, self.hi), self.chunk = log, span, chunk

    def done(self, k: int) -> bool:
        return not (k * self.chunk < self.hi and self.lo < (k + 1) * self.chunk) or self.log.done(k)

    def mark(self, k: int):
        self.log.mark(k)

    def all_done(self) -> bool:
        return all(self.done(k) for k in range(self.log.num_chunks))


class SharedRun:
    """A render's state (InMemoryRender / RenderFolder of diffutoon/render_folder.py) on one rank of a group: rank 0's
    persists; where to resume and which stages are done is rank 0's answer, broadcast. Everything else is this rank's
    own run."""

    def __init__(self, run, group: Group, windows: dict, chunk: int):
        self.run, self.group, self.chunk = run, group, chunk
        self.spans = {prefix: group.span(w) for prefix, w in windows.items()}

    def __getattr__(self, name):
        return getattr(self.run, name)

    def frames(self, name: str, shape, dtype) -> tuple:
        array, log = self.run.frames(name, shape, dtype)
        span = next((s for prefix, s in self.spans.items() if name.startswith(prefix)), None)
        return array, log if span is None else _Share(log, span, self.chunk)

    def stage_done(self, name: str) -> bool:
        return self.group.broadcast_object(f"checking the {name} stage", self.run.stage_done(name))

    def resume(self, name: str):
        found, error, what = None, None, f"resuming the {name} pass"
        if self.group.rank == 0:
            try:
                found = self.run.resume(name)
            except Exception as e:
                error = e
        head = self.group.broadcast_object(what, found and (found[0], tuple(found[1].shape), found[2]), error)
        if head is None:
            return None
        step, shape, state = head
        frames = found[1] if self.group.rank == 0 else self.run.latents(name, step, shape)
        return step, self.group.broadcast_frames(what, frames), state

    def __enter__(self):
        self.run.__enter__()
        return self

    def __exit__(self, kind, error, traceback):
        if error is None or (isinstance(error, Exception) and not _shared(error)):
            try:  # the others learn how this rank ended; this rank learns how they did
                self.group.agree("finishing the call", error)
            except DistributedError as other:
                if error is None:  # this rank is done, another failed: fail too, the folder stays
                    self.run.__exit__(DistributedError, other, None)
                    raise
            except Exception:
                pass  # this rank's own error, raised again by `with`
        return self.run.__exit__(kind, error, traceback)
