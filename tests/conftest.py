"""Shared fixtures: tiny random-weight components, built once per session, never downloaded."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite must never reach the Hub
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# the input-hash and memory-estimate caches of this run: never the user's ~/.cache/diffutoon
os.environ.setdefault("DIFFUTOON_CACHE", tempfile.mkdtemp(prefix="diffutoon-test-cache-"))

import numpy as np
import pytest
import torch

# toy-sized models: one thread is as fast as two when idle, and ~100x faster than two fighting for a busy CPU
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipe():
    """A tiny `DiffutoonPipeline` shared by tests that do not change it (build your own to mutate one)."""
    from diffutoon.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_video(num_frames: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """A smooth moving pattern as uint8 (N, H, W, 3): structured enough for the annotators, cheap to make."""
    y, x = np.mgrid[0:size, 0:size] / size
    frames = []
    for t in range(num_frames):
        phase = 2 * np.pi * (t / max(num_frames, 1) + seed * 0.1)
        r = np.sin(6 * x + phase) * 0.5 + 0.5
        g = np.cos(5 * y - phase) * 0.5 + 0.5
        b = np.sin(4 * (x + y) + 2 * phase) * 0.5 + 0.5
        frames.append(np.stack([r, g, b], -1))
    return (np.stack(frames) * 255).round().astype(np.uint8)


@pytest.fixture
def video():
    return make_video(10)


def save_sd15_folder(folder, parts):
    """An SD1.5 checkpoint folder laid out as on the Hub (2D UNet, PNDMScheduler) at folder/sd15, with the motion
    adapter (folder/adapter) and the ControlNets (folder/cn0, folder/cn1) beside it; returns folder/sd15."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                            unet=parts["unet"], scheduler=PNDMScheduler(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder / "sd15")
    parts["motion_adapter"].save_pretrained(folder / "adapter")
    for i, net in enumerate(parts["controlnet"]):
        net.save_pretrained(folder / f"cn{i}")
    return folder / "sd15"


@pytest.fixture(scope="session")
def job_pipe():
    """The tiny pipeline of tests/render_job.py (editing ControlNets included), shared by the render-folder and
    distributed tests."""
    from render_job import build

    return build()


@pytest.fixture(scope="session")
def job_reference(job_pipe):
    """render_job.py's render with everything in one process's memory: the main pass, and with the editing branch."""
    from render_job import job

    return {"main": job_pipe(**job()).frames[0], "edit": job_pipe(**job(edit=True)).frames[0]}
