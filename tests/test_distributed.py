"""One video over several processes (issue 12): gloo on CPU, tiny models, bit-identical to one process.

The processes are forked from this one (the tiny pipeline already built, nothing imported twice) and joined in a
gloo process group through a file; the torchrun test launches the real CLI.
"""

import itertools
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.distributed as dist
from conftest import make_video
from render_job import SIZE, job

from diffutoon import video as vio
from diffutoon.distributed import Group, broadcast_frames, map_chunks, process_group, shares
from diffutoon.render_folder import HostFrames
from pipeline_diffutoon import sliding_windows

ROOT = Path(__file__).resolve().parents[1]
WAIT = 240  # seconds a test waits for its processes to stop on their own: a hang fails the test
_spawns = itertools.count()


def _worker(rank, world, folder, fn, args):
    code = 0
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world,
                                timeout=timedelta(seconds=WAIT // 2))
        (folder / f"{rank}.pkl").write_bytes(pickle.dumps(fn(rank, *args)))
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 (reported to the test)
        (folder / f"{rank}.err").write_text(f"{type(e).__name__}: {e}")
        code = 1
    os._exit(code)  # no pytest teardown in a forked child


def spawn(world, tmp_path, fn, *args):
    """fn(rank, *args) in `world` forked processes of one gloo group: ({rank: result}, {rank: error}, exit codes)."""
    folder = tmp_path / f"spawn-{next(_spawns)}"
    folder.mkdir()
    procs = [multiprocessing.get_context("fork").Process(target=_worker, args=(r, world, folder, fn, args))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(WAIT)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    assert not hung, f"processes {hung} did not stop within {WAIT} s"
    results = {r: pickle.loads((folder / f"{r}.pkl").read_bytes()) for r in range(world) if (folder / f"{r}.pkl").exists()}
    errors = {r: (folder / f"{r}.err").read_text() for r in range(world) if (folder / f"{r}.err").exists()}
    return results, errors, [p.exitcode for p in procs]


# ---------------------------------------------------------------------------------------------------------------
# The split and the exact assembly, without models: up to 4 windows per frame over 4 ranks

LAYOUTS = [(13, 4, 1), (10, 4, 3), (30, 16, 8), (9, 6, 2), (5, 8, 4)]  # (frames, window, stride); the last: 1 window


def fake_predictions(shape=(2, 3, 3)):
    """Weighted window predictions (1, C, f, h, w) of wide dynamic range, so that the order of a sum shows."""
    def predict(windows):
        for s, e in windows:
            g = torch.Generator().manual_seed(1000 * s + e)
            scale = torch.exp(4 * torch.randn((1, shape[0], e - s, *shape[1:]), generator=g))
            yield s, e, torch.randn((1, shape[0], e - s, *shape[1:]), generator=g) * scale
    return predict


def one_process(windows, n, shape=(2, 3, 3)):
    out = np.zeros((n, *shape), np.float32)
    for s, e, w in fake_predictions(shape)(windows):
        out[s:e] = out[s:e] + w[0].transpose(0, 1).numpy()
    return out


def _assemble(rank):
    group = Group()
    sums = {layout: group.denoise(fake_predictions(), sliding_windows(*layout),
                                  HostFrames(np.full((layout[0], 2, 3, 3), np.nan, np.float32))).array
            for layout in LAYOUTS}
    every = list(map_chunks(group, "test", range(7), lambda i: np.full(3, i)))
    to_rank0 = list(map_chunks(group, "test", range(5), lambda i: torch.full((2,), float(i)), dst=0))
    frames = broadcast_frames(group, HostFrames(np.arange(40).reshape(20, 2) if rank == 0 else np.zeros((20, 2), int)))
    return sums, every, to_rank0, frames.array


def test_shares_are_contiguous_balanced_by_frames_and_may_be_empty():
    windows = sliding_windows(1000, 16, 8)
    for world in (2, 3, 8, 32, 200):
        split = shares(windows, world)
        assert [w for share in split for w in share] == windows  # contiguous, in order, every window once
        frames = [sum(e - s for s, e in share) for share in split if share]
        assert max(frames) - min(frames) <= 16 or len(frames) < world
    assert shares([(0, 4)], 3) == [[(0, 4)], [], []]
    assert shares(sliding_windows(7, 4, 1), 2) == [[(0, 4), (1, 5)], [(2, 6), (3, 7)]]


def test_four_processes_assemble_the_sum_of_one_process_bit_for_bit(tmp_path):
    results, errors, codes = spawn(4, tmp_path, _assemble)
    assert not errors and codes == [0] * 4
    naive_differs = False
    for layout in LAYOUTS:
        exact = one_process(sliding_windows(*layout), layout[0])
        for r in range(4):
            assert np.array_equal(results[r][0][layout], exact), (layout, r)
        # what the chain avoids: adding each rank's own partial sum changes the rounding
        partials = [one_process(share, layout[0]) for share in shares(sliding_windows(*layout), 4)]
        naive_differs |= not np.array_equal(sum(partials[1:], partials[0]), exact)
    assert naive_differs
    for r in range(4):
        _, every, to_rank0, frames = results[r]
        assert [i for i, _ in every] == list(range(7)) and all((x == i).all() for i, x in every)
        assert [i for i, _ in to_rank0] == (list(range(5)) if r == 0 else [])
        assert np.array_equal(frames, np.arange(40).reshape(20, 2))


# ---------------------------------------------------------------------------------------------------------------
# The pipeline: 2 processes give the frames of 1


def scenarios(tmp_path):
    """name -> the call; every process makes the same one."""
    return {
        "main": job(),  # 3 windows over 2 processes
        "stride 1": job(video=make_video(7, SIZE), context_length=4, context_stride=1, num_inference_steps=2),
        "one window": job(video=make_video(4, SIZE)),  # more processes than windows
        "edit": job(edit=True),
        "img2img into png": job(strength=0.6, decode_chunk_size=2, output_path=tmp_path / "png"),
        "alone": job(distributed=False),  # each process renders everything on its own
    }


def _render_scenarios(rank, job_pipe, tmp_path):
    return {name: job_pipe(**kwargs).frames for name, kwargs in scenarios(tmp_path / "split").items()}


def png_frames(folder):
    return np.stack([np.asarray(PIL.Image.open(p)) for p in sorted(Path(folder).glob("*.png"))])


def test_two_processes_give_the_frames_of_one(job_pipe, job_reference, tmp_path):
    results, errors, codes = spawn(2, tmp_path, _render_scenarios, job_pipe, tmp_path)
    assert not errors and codes == [0, 0]
    for name, kwargs in scenarios(tmp_path / "one").items():
        frames = job_reference[name] if name in job_reference else job_pipe(**kwargs).frames
        if name == "img2img into png":  # streamed into a folder: rank 0 wrote it
            assert results[0][name] is None and results[1][name] is None
            assert np.array_equal(png_frames(tmp_path / "split" / "png"), png_frames(tmp_path / "one" / "png"))
            continue
        expected = frames if name in job_reference else frames[0]
        assert np.array_equal(results[0][name][0], expected), name
        if name == "alone":
            assert np.array_equal(results[1][name][0], expected)
        else:
            assert results[1][name] is None, name  # rank 0 alone has the frames


def test_off_gives_identical_output_without_a_group_or_with_one_process(job_pipe, job_reference, tmp_path):
    assert process_group() is None
    with pytest.raises(ValueError, match="needs an initialised torch.distributed process group"):
        job_pipe(**job(), distributed=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        assert process_group() is None  # one process: nothing to split
        frames = job_pipe(**job(), distributed=True).frames[0]
    finally:
        dist.destroy_process_group()
    assert np.array_equal(frames, job_reference["main"])


# ---------------------------------------------------------------------------------------------------------------
# Faults


def _faults(rank, job_pipe):
    seen = {}
    try:  # process 1 was given another prompt
        job_pipe(**job(prompt="a boy" if rank else "a girl dancing"))
    except Exception as e:
        seen["mismatch"] = f"{type(e).__name__}: {e}"

    def fail(progress):
        if rank == 1 and progress.get("stage") == "denoising" and progress.get("step") == 1:
            raise ValueError("boom")
    try:
        job_pipe(**job(), progress_callback=fail)
    except Exception as e:
        seen["raised"] = f"{type(e).__name__}: {e}"
    seen["after"] = job_pipe(**job(num_inference_steps=1)).frames  # the group still works
    return seen


def test_a_rank_that_raises_or_was_given_another_render_stops_every_rank(job_pipe, tmp_path):
    results, errors, codes = spawn(2, tmp_path, _faults, job_pipe)
    assert not errors and codes == [0, 0]
    for r in range(2):
        assert "DistributedError: process 1 of 2 was given another render than process 0: settings.prompt differ" \
            in results[r]["mismatch"]
    assert results[1]["raised"] == "ValueError: boom"
    assert results[0]["raised"].startswith("DistributedError: process 1 of 2 failed while denoising: ValueError: boom")
    assert np.array_equal(results[0]["after"][0], job_pipe(**job(num_inference_steps=1)).frames[0])


def _killed(rank, job_pipe, folder, victim, edit):
    def die(progress):
        where = (progress.get("pass"), progress.get("stage"), progress.get("step"), progress.get("window"))
        if rank == victim and where == ("main", "denoising", 1, 1):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup: a crash, an out-of-memory kill, a lost node
    job_pipe(**job(edit=edit), render_dir=folder, progress_callback=die)


def _resumed(rank, job_pipe, folder, edit):
    return job_pipe(**job(edit=edit), render_dir=folder).frames


@pytest.mark.parametrize("victim, branch", [(1, "main"), (0, "edit")])  # "edit": its finished stage is resumed too
def test_a_killed_rank_stops_the_other_and_the_render_resumes_with_one_or_two_processes(job_pipe, job_reference, tmp_path,
                                                                                        victim, branch):
    folder, edit = tmp_path / "render", branch == "edit"
    results, errors, codes = spawn(2, tmp_path, _killed, job_pipe, folder, victim, edit)
    survivor = 1 - victim
    assert codes[victim] == -signal.SIGKILL and codes[survivor] == 1
    assert errors[survivor].startswith(f"DistributedError: process {survivor} of 2 lost contact with the others")
    assert "run the same command again, with any number of processes, to resume" in errors[survivor]
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    results, errors, codes = spawn(2, tmp_path, _resumed, job_pipe, folder, edit)
    assert not errors and np.array_equal(results[0][0], job_reference[branch])
    assert np.array_equal(job_pipe(**job(edit=edit), render_dir=copy).frames[0], job_reference[branch])  # one process


# ---------------------------------------------------------------------------------------------------------------
# torchrun -m diffutoon render


def test_torchrun_renders_what_one_process_renders_and_only_rank_0_writes_and_prints(tmp_path, monkeypatch):
    from distributed_job import tiny_load

    from diffutoon import cli

    source = vio.make_demo_clip(tmp_path / "in.mp4", num_frames=7, height=SIZE, width=SIZE, fps=8)
    options = ["--height", str(SIZE), "--width", str(SIZE), "--steps", "2", "--context-length", "4",
               "--context-stride", "2", "--decode-chunk-size", "2", "--device", "cpu", "--dtype", "float32"]
    monkeypatch.setattr(cli, "_check_sources", lambda sources: None)
    monkeypatch.setattr(cli, "_load_pipeline", tiny_load)
    assert cli.main(["render", str(source), "-o", str(tmp_path / "one"), "-q", *options]) == 0
    logs = tmp_path / "logs"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "--log-dir", str(logs), "--redirects", "3", str(ROOT / "tests" / "distributed_job.py"),
                           str(source), "-o", str(tmp_path / "two"), *options],
                          env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=WAIT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.array_equal(png_frames(tmp_path / "two"), png_frames(tmp_path / "one"))
    out = {rank: "".join(p.read_text() for p in logs.rglob(f"{rank}/std*.log")) for rank in (0, 1)}
    assert "wrote" in out[0] and "denoising" in out[0]
    assert "wrote" not in out[1] and "denoising" not in out[1] and "loading models" not in out[1]
