"""The `diffutoon` command end to end, offline, on generated files with sound.

The source is made by ffmpeg itself: frame i is flat grey GREY(i), second k of the audio a sine at TONE(k) Hz,
so the output's frame rate, frame count, audio duration AND which audio span was kept are all checkable.
Model runs use tiny random-weight components (`demo`, or `render` on local folders saved from them).
"""

import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest

from diffutoon import cli
from diffutoon import video as vio
from test_video_io import FPS, GREY, TONE, make_source, read_audio, tone_hz  # the same ffmpeg-made source

ROOT = Path(__file__).resolve().parents[1]


def offline_env(tmp_path):
    """No Hub, and an empty cache: nothing can come from outside."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), PYTHONPATH=str(ROOT))
    env.pop("HF_HUB_CACHE", None)
    return env


def run_cli(args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "diffutoon", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=env.get("HF_HOME", "/tmp").rsplit("/", 1)[0])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("src") / "source.mp4")


def assert_one_line_error(err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("diffutoon") and "error:" in lines[0] and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


# ------------------------------------------------------------------------------------------------ errors
def test_unreadable_inputs_are_one_line_errors(source, tmp_path, capfd):
    data = source.read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.mp4").write_text("this is not a video\n")
    cases = {"truncated.mp4": "truncated", "notes.mp4": "not a video", "missing.mp4": "not found"}
    for name, needle in cases.items():
        assert cli.main(["render", str(tmp_path / name), "-o", str(tmp_path / "o.mp4")]) == 2
        out, err = capfd.readouterr()  # fd-level: decord's and libav's C logging would show up here
        assert_one_line_error(err, name, needle)
        assert out == ""
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--steps", "0"], "--steps: must be >= 1"),
    (["--height", "500"], "--height: must be a multiple of 8"),
    (["--resize", "stretch"], "--resize: invalid choice"),
    (["--start", "abc"], "--start: expected a frame number"),
    (["--strength", "1.5"], "--strength: must be <= 1"),
    (["--guidance-scale", "x"], "--guidance-scale: expected a number"),
    (["--context-stride", "16"], "--context-stride (16) must be smaller than --context-length (16)"),
    (["--start", "10s"], "empty frame range"),
    (["--start", "20", "--end", "20"], "empty frame range"),
    (["--base", "./models/anime.safetensors"], "--base ./models/anime.safetensors: no such file or folder"),
    (["--textual-inversion", "emb.pt"], "--textual-inversion emb.pt: no such file or folder"),
    (["-o", "out.webm"], "cannot write out.webm: use a video file (.mp4, .m4v, .mov, .mkv) or a folder"),
    (["--lora", "owner/style-lora@strong"], "--lora owner/style-lora@strong: the scale after @ must be a number"),
])
def test_bad_option_values_are_one_line_errors(source, tmp_path, capfd, argv, needle):
    assert cli.main(["render", str(source), "-o", str(tmp_path / "o.mp4"), *argv]) == 2
    assert_one_line_error(capfd.readouterr().err, needle)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(vio.VideoError):
        cli.main(["render", str(tmp_path / "missing.mp4"), "--debug"])


def test_existing_output_fails_before_any_model_loads(source, tmp_path, capfd, monkeypatch):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"keep me")
    monkeypatch.setattr(cli, "_load_pipeline", lambda *a: pytest.fail("models loaded before the output check"))
    assert cli.main(["render", str(source), "-o", str(out)]) == 2
    assert_one_line_error(capfd.readouterr().err, "already exists", "--overwrite")
    assert out.read_bytes() == b"keep me"


def test_unreachable_hub_names_the_model_and_how_to_fetch_it(source, tmp_path, local_models):
    env = offline_env(tmp_path)
    r = run_cli(["render", str(source), "-o", str(tmp_path / "o.mp4")], env)
    assert r.returncode == 2
    assert_one_line_error(r.stderr, "'stable-diffusion-v1-5/stable-diffusion-v1-5' (--base)",
                          "hf download stable-diffusion-v1-5/stable-diffusion-v1-5",
                          "guoyww/animatediff-motion-adapter-v1-5-2")
    # with a local base, the first model missing is the motion adapter
    r = run_cli(["render", str(source), "-o", str(tmp_path / "o.mp4"), "--base", str(local_models / "base")], env)
    assert r.returncode == 2
    assert_one_line_error(r.stderr, "'guoyww/animatediff-motion-adapter-v1-5-2' (--motion-adapter)",
                          "hf download guoyww/animatediff-motion-adapter-v1-5-2")
    assert "stable-diffusion-v1-5" not in r.stderr and not (tmp_path / "o.mp4").exists()


# ------------------------------------------------------------------------------------------------ end to end
def check_output(path, n, fps, audio_seconds, tones):
    """Frame count, fps, audio length, and `tones` = [(t0, t1, source second)]: the output's audio between
    t0 and t1 seconds must carry the tone of that second of the source (the right span was kept)."""
    o = vio.VideoReader(path)
    assert (o.num_frames, o.fps) == (n, pytest.approx(fps))
    audio = read_audio(path)
    assert len(audio) / 16000 == pytest.approx(audio_seconds, abs=0.05)
    for t0, t1, second in tones:
        assert tone_hz(audio[int(t0 * 16000): int(t1 * 16000)]) == pytest.approx(TONE(second), rel=0.03)
    return o


@pytest.fixture
def identity_pipeline(monkeypatch):
    """`render` with the model steps replaced by the identity: the CLI's own plumbing (range, resize, fps,
    audio span, overwrite, output kinds) checked frame by frame in a second, no model involved."""
    monkeypatch.setattr(cli, "_check_sources", lambda sources: None)  # the default Hub models are not cached here
    monkeypatch.setattr(cli, "_load_pipeline", lambda args, device, dtype: (None, None))

    def identity(args, pipe, clip, detector, edit_extra=None, output_path=None, fps=None, **render_folder):
        """What the pipeline does with `output_path` (tests/test_render_folder.py), minus the models."""
        chunks = (clip.read(i, i + 4) for i in range(0, len(clip), 4))
        vio.write_output(output_path, chunks, fps, audio_from=clip.path if clip.audio else None,
                         audio_span=clip.audio_span(), overwrite=True, progress=False, total=len(clip))
        return SimpleNamespace(path=output_path, frames=None)

    monkeypatch.setattr(cli, "_run_pipeline", identity)


def greys(path, n):
    return np.round(vio.read_frames(vio.VideoReader(path), range(n), progress=False).reshape(n, -1).mean(1))


def test_range_fps_audio_span_and_overwrite(source, tmp_path, capfd, identity_pipeline):
    out = tmp_path / "toon.mp4"
    size = ["--height", "32", "--width", "40", "-q"]
    # frames 12, 16, ..., 32 (seconds 1-3), every 4th: 6 frames at 3 fps, with the audio of seconds 1-3
    argv = ["render", str(source), "-o", str(out), "--start", "1s", "--every-nth", "4", *size]
    assert cli.main(argv) == 0
    assert f"wrote {out}: 6 frames at 3 fps (2.00 s), with audio" in capfd.readouterr().out
    o = check_output(out, n=6, fps=3, audio_seconds=2.0, tones=[(0, 1, 1), (1, 2, 2)])
    assert o.size == (40, 32)
    np.testing.assert_allclose(greys(out, 6), [GREY(i) for i in range(12, 36, 4)], atol=3)
    before = out.stat().st_mtime_ns, out.read_bytes()

    assert cli.main(argv) == 2  # exists, no --overwrite: untouched
    assert_one_line_error(capfd.readouterr().err, "already exists", "--overwrite")
    assert (out.stat().st_mtime_ns, out.read_bytes()) == before

    # --overwrite with another range replaces it: frames 3, 9, 15 (--max-frames cuts at 3) at 2 fps
    argv = ["render", str(source), "-o", str(out), "--start", "3", "--end", "30", "--every-nth", "6",
            "--max-frames", "3", "--overwrite", *size]
    assert cli.main(argv) == 0
    check_output(out, n=3, fps=2, audio_seconds=1.5, tones=[(0, 0.7, 0), (0.8, 1.5, 1)])  # source 0.25-1.75 s
    np.testing.assert_allclose(greys(out, 3), [GREY(3), GREY(9), GREY(15)], atol=3)
    assert [p.name for p in tmp_path.iterdir()] == ["toon.mp4"]  # no temporaries left


def test_png_folder_fps_override_and_no_audio(source, tmp_path, identity_pipeline):
    frames_dir = tmp_path / "frames"
    argv = ["render", str(source), "--max-frames", "3", "--height", "16", "--width", "24", "-q"]
    assert cli.main(argv + ["-o", str(frames_dir)]) == 0
    assert sorted(p.name for p in frames_dir.iterdir()) == [f"{i:05d}.png" for i in range(3)]
    assert cli.main(argv + ["-o", str(tmp_path / "silent.mp4"), "--no-audio", "--fps", "25"]) == 0
    silent = vio.VideoReader(tmp_path / "silent.mp4")
    assert (silent.num_frames, silent.fps, silent.has_audio) == (3, 25, False)


@pytest.fixture(scope="module")
def local_models(tmp_path_factory):
    """Tiny random models saved the way real ones are laid out: an SD1.5 folder, a motion adapter folder,
    two ControlNet folders, annotator weights, an A1111 embedding named like the default negative, a LoRA."""
    import torch
    from controlnet_aux.lineart import Generator
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from diffutoon.tiny import tiny_components

    d = tmp_path_factory.mktemp("models")
    c = tiny_components(seed=0)
    StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=c["unet"],
                            scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(d / "base")
    c["motion_adapter"].save_pretrained(d / "motion")
    for name, net in zip(("lineart", "tile"), c["controlnet"]):
        net.save_pretrained(d / name)
    (d / "annotators").mkdir()
    for name in ("sk_model.pth", "sk_model2.pth"):
        torch.save(Generator(3, 1, 3).state_dict(), d / "annotators" / name)
    a1111 = {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(10, 32)},
             "name": "verybadimagenegative_v1.3", "step": 1000, "sd_checkpoint": None, "sd_checkpoint_name": None}
    torch.save(a1111, d / "verybadimagenegative_v1.3.pt")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffusers.utils import convert_state_dict_to_diffusers

    unet = tiny_components(seed=1)["unet"]  # a LoRA trained on "another" SD1.5 UNet of the same shape
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(d / "lora", lora)
    return d


def test_render_with_local_models_offline(source, local_models, tmp_path, capfd, monkeypatch):
    loaded = []
    load = cli._load_pipeline
    monkeypatch.setattr(cli, "_load_pipeline", lambda *a: loaded.append(load(*a)) or loaded[-1])  # spy
    out = tmp_path / "render.mp4"
    m = local_models
    argv = ["render", str(source), "-o", str(out), "--base", str(m / "base"), "--motion-adapter", str(m / "motion"),
            "--lineart-controlnet", str(m / "lineart"), "--tile-controlnet", str(m / "tile"),
            "--annotators", str(m / "annotators"), "--textual-inversion", str(m / "verybadimagenegative_v1.3.pt"),
            "--lora", f"{m / 'lora' / 'pytorch_lora_weights.safetensors'}@0.8",
            "--start", "6", "--end", "30", "--every-nth", "12", "--height", "48", "--width", "80", "--resize", "pad",
            "--steps", "1", "--context-length", "4", "--context-stride", "2", "--device", "cpu", "-q"]
    assert cli.main(argv) == 0, capfd.readouterr().err
    # frames 6 and 18 at 1 fps: the audio of source seconds 0.5 to 2.5
    check_output(out, n=2, fps=1, audio_seconds=2.0, tones=[(0, 0.45, 0), (0.55, 1.45, 1), (1.55, 2, 2)])
    assert vio.VideoReader(out).size == (80, 48)
    pipe, detector = loaded[0]
    vocab = pipe.tokenizer.get_vocab()  # the 10-vector embedding: its keyword and 9 extra tokens
    assert "verybadimagenegative_v1.3" in vocab and "verybadimagenegative_v1.3_9" in vocab
    assert pipe.get_active_adapters() == ["lora0"]


@pytest.mark.skipif(os.environ.get("DIFFUTOON_SKIP_SLOW") == "1", reason="DIFFUTOON_SKIP_SLOW=1")
def test_demo_runs_offline_in_minutes(tmp_path):
    """The shipped `diffutoon demo`, defaults untouched, as a user runs it: offline, empty Hub cache."""
    t = time.time()
    r = run_cli(["demo", "-o", str(tmp_path / "diffutoon-demo.mp4")], offline_env(tmp_path), timeout=240)
    seconds = time.time() - t
    assert r.returncode == 0, r.stderr[-2000:]
    assert "random weights prove the install, not the art" in r.stdout and "RANDOM-weight" in r.stdout
    o = vio.VideoReader(tmp_path / "diffutoon-demo.mp4")
    assert (o.num_frames, o.fps, o.size, o.has_audio) == (16, 8, (64, 64), True)
    assert len(read_audio(o.path)) / 16000 == pytest.approx(2.0, abs=0.05)
    print(f"demo: {seconds:.1f} s")  # timed in bench/, never asserted here


def test_a_killed_render_resumes_from_its_work_dir_with_the_same_frames(tmp_path, monkeypatch, capfd, caplog):
    """Issue 10 as a user meets it: `diffutoon render` killed (SIGKILL) mid-render, the same command again resumes
    ("resuming ... at step k of n") and writes what an uninterrupted render writes; a changed prompt is refused in
    one line; --fresh starts over; the work dir goes once the output is written. Only the killed run is a process of
    its own (the others run `main` here: the same code, without a second start of torch)."""
    env = offline_env(tmp_path)
    for key in ("HF_HUB_OFFLINE", "HF_HOME"):
        monkeypatch.setenv(key, env[key])
    clip = vio.make_demo_clip(tmp_path / "in.mp4", num_frames=8, height=32, width=32, fps=8)
    demo = ["demo", "--input", str(clip), "--steps", "3", "--height", "32", "--width", "32", "-q"]
    work, out = tmp_path / "work", tmp_path / "frames"
    argv = [*demo, "-o", str(out), "--work-dir", str(work)]
    proc = subprocess.Popen([sys.executable, "-m", "diffutoon", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert cli.main([*demo, "-o", str(tmp_path / "ref"), "--in-memory"]) == 0  # the reference, meanwhile
    progress, deadline = work / "progress.json", time.time() + 240
    while proc.poll() is None and time.time() < deadline:  # kill it once step 2 is under way
        try:
            if json.loads(progress.read_text()).get("step", 0) >= 1:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -9 and not out.exists() and (work / "manifest.json").exists()
    capfd.readouterr()
    assert cli.main([*argv, "--prompt", "a cat"]) == 2
    assert_one_line_error(capfd.readouterr().err, "holds a different render", "prompt differs", "--fresh")
    caplog.clear()
    assert cli.main(argv) == 0
    assert "resuming the main pass at step 2 of 3" in capfd.readouterr().err + caplog.text  # (pytest takes the log)
    frames = lambda folder: [np.asarray(PIL.Image.open(p)) for p in sorted(folder.iterdir())]  # noqa: E731
    assert all(np.array_equal(a, b) for a, b in zip(frames(out), frames(tmp_path / "ref"), strict=True))
    assert not work.exists()
    caplog.clear()
    assert cli.main([*demo, "-o", str(tmp_path / "again"), "--work-dir", str(work), "--fresh", "--keep-work-dir"]) == 0
    assert "resuming" not in capfd.readouterr().err + caplog.text and (work / "manifest.json").exists()


def test_a_refused_resume_names_the_options_of_the_new_settings():
    for key, option in [("fast_mode", "--fast"), ("scene_cuts", "--scene-cuts"), ("edit.scene_cuts", "--scene-cuts"),
                        ("keyframes", "--keyframe"), ("long_prompt", "--long-prompt"), ("style.image", "--style-image"),
                        ("style.scales", "--style-scale")]:
        assert cli._cli_words(f"settings.{key} differs (1 in the folder, 2 now)") == f"{option} differs (1 in the folder, 2 now)"


def test_render_options_map_onto_the_pipeline_with_the_reference_defaults():
    """Every generation option reaches the pipeline under its own name; the defaults are SPEC's main pass."""
    import pipeline_diffutoon

    seen = {}

    class Pipe:  # records what the CLI passes, returns a "pil" video as the pipeline does
        def __call__(self, video=None, **kwargs):
            seen.update(kwargs, video=video)
            return type("Out", (), {"frames": [[PIL.Image.new("RGB", video.shape[1:3][::-1], (128,) * 3)] * len(video)]})()

    real = inspect.signature(pipeline_diffutoon.DiffutoonPipeline.__call__).parameters
    frames = np.zeros((3, 16, 24, 3), np.uint8)
    args = cli.build_parser().parse_args(["render", "in.mp4"])
    cli._run_pipeline(args, Pipe(), frames, detector="det", render_dir=Path("r"), fresh=False, keep_render_dir=False,
                      output_path=Path("o.mp4"), fps=8.0)  # what _render adds: the render folder, the output file
    assert set(seen) <= set(real)  # no option goes to an argument the real pipeline lacks
    assert seen["video"] is frames and seen["lineart_detector"] == "det" and seen["output_type"] == "pil"
    expected = dict(num_inference_steps=10, guidance_scale=7.0, context_length=16, context_stride=8,
                    controlnet_conditioning_scale=[0.5, 0.5], clip_skip=1, strength=1.0, height=16, width=24,
                    negative_prompt="verybadimagenegative_v1.3", decode_chunk_size=8)
    assert {k: seen[k] for k in expected} == expected
    assert (args.height, args.width, args.resize) == (1536, 1536, "crop")  # the reference's size and crop
    args = cli.build_parser().parse_args([
        "render", "in.mp4", "--steps", "3", "--guidance-scale", "5.5", "--context-length", "12", "--context-stride",
        "4", "--lineart-scale", "0.7", "--tile-scale", "0.2", "--clip-skip", "0", "--strength", "0.6", "--seed", "7",
        "--prompt", "a cat", "--negative-prompt", "blurry", "--decode-chunk-size", "2"])
    cli._run_pipeline(args, Pipe(), frames, None)
    assert {k: seen[k] for k in ("num_inference_steps", "guidance_scale", "context_length", "context_stride",
                                 "controlnet_conditioning_scale", "clip_skip", "strength", "prompt",
                                 "negative_prompt", "decode_chunk_size")} == dict(
        num_inference_steps=3, guidance_scale=5.5, context_length=12, context_stride=4,
        controlnet_conditioning_scale=[0.7, 0.2], clip_skip=0, strength=0.6, prompt="a cat",
        negative_prompt="blurry", decode_chunk_size=2)
    assert seen["generator"].initial_seed() == 7
    # the CLI's default models are the pipeline's (SPEC's Hub ids)
    hub = pipeline_diffutoon.HUB_MODELS
    names = ("base", "motion_adapter", "lineart", "tile", "annotators", "softedge", "depth")
    assert (cli.DEFAULT_BASE, cli.DEFAULT_MOTION_ADAPTER, cli.DEFAULT_LINEART, cli.DEFAULT_TILE, cli.DEFAULT_ANNOTATORS,
            cli.DEFAULT_SOFTEDGE, cli.DEFAULT_DEPTH) == tuple(hub[name] for name in names)
    assert cli.DEFAULT_NEGATIVE_TOKEN == pipeline_diffutoon.DEFAULT_NEGATIVE_PROMPT


def test_edit_prompt_reaches_the_editing_branch():
    import pipeline_diffutoon

    seen = {}

    class Pipe:
        def __call__(self, video=None, **kwargs):
            seen.update(kwargs)
            return type("Out", (), {"frames": [video]})()

    real = inspect.signature(pipeline_diffutoon.DiffutoonPipeline.__call__).parameters
    args = cli.build_parser().parse_args(["render", "in.mp4", "--edit-prompt", "orange clothes, night",
                                          "--edit-steps", "5"])
    cli._run_pipeline(args, Pipe(), np.zeros((2, 8, 8, 3), np.uint8), None)
    assert set(seen) <= set(real)
    assert seen["edit_prompt"] == "orange clothes, night"  # SPEC 2's defaults otherwise: 512x512, strength 0.9
    assert seen["edit_kwargs"] == dict(height=512, width=512, num_inference_steps=5, strength=0.9)
    assert set(seen["edit_kwargs"]) <= set(inspect.signature(pipeline_diffutoon.DiffutoonPipeline.make_color_video)
                                           .parameters)
    assert "edit_controlnets" in inspect.signature(pipeline_diffutoon.DiffutoonPipeline.from_models).parameters
    assert ("--softedge-controlnet", "lllyasviel/control_v11p_sd15_softedge") in cli._model_sources(args)[0]


def test_deflicker_smooths_flicker_and_keeps_timing_and_audio(source, tmp_path, capfd):
    rng = np.random.default_rng(0)
    texture = rng.integers(60, 190, (32, 32, 3), dtype=np.uint8)
    gains = np.array([0.7, 1.3] * 6)  # 12 frames that flicker: 1 s at 12 fps
    style = np.clip(texture[None] * gains[:, None, None, None], 0, 255).astype(np.uint8)
    vio.write_video(tmp_path / "style.mp4", style, FPS, audio_from=source, audio_span=(1.0, 2.0), progress=False)
    vio.write_video(tmp_path / "guide.mp4", np.repeat(texture[None], 12, 0), FPS, progress=False)
    out = tmp_path / "smooth.mp4"
    assert cli.main(["deflicker", str(tmp_path / "style.mp4"), "--guide", str(tmp_path / "guide.mp4"), "-o", str(out),
                     "--start", "2", "--end", "7", "--window-size", "2", "--device", "cpu", "-q"]) == 0
    assert f"wrote {out}: 5 frames at 12 fps (0.42 s), with audio" in capfd.readouterr().out
    check_output(out, n=5, fps=12, audio_seconds=5 / 12, tones=[(0, 5 / 12, 1)])
    before = vio.read_frames(vio.VideoReader(tmp_path / "style.mp4"), range(2, 7), progress=False)
    after = vio.read_frames(vio.VideoReader(out), range(5), progress=False)
    # the brightness swing between frames shrinks by more than half
    assert np.ptp(after.reshape(5, -1).mean(1)) < 0.5 * np.ptp(before.reshape(5, -1).mean(1))


# ------------------------------------------------------------------------------------------------ issue 9, section 4
def no_model_loads(monkeypatch):
    monkeypatch.setattr(cli, "_load_pipeline", lambda *a: pytest.fail("models loaded"))


def local_argv(models, source, out, *extra):
    m = models
    return ["render", str(source), "-o", str(out), "--base", str(m / "base"), "--motion-adapter", str(m / "motion"),
            "--lineart-controlnet", str(m / "lineart"), "--tile-controlnet", str(m / "tile"),
            "--annotators", str(m / "annotators"), "--textual-inversion", str(m / "verybadimagenegative_v1.3.pt"),
            "--max-frames", "2", "--height", "16", "--width", "16", "--steps", "1", "--context-length", "4",
            "--context-stride", "2", "--device", "cpu", *extra]


def test_output_that_is_the_input_is_refused_through_links_too(source, tmp_path, capfd, monkeypatch):
    no_model_loads(monkeypatch)
    same = tmp_path / "same.mp4"
    same.write_bytes(source.read_bytes())
    (tmp_path / "symlink.mp4").symlink_to(same)
    os.link(same, tmp_path / "hardlink.mp4")
    for out in ("same.mp4", "symlink.mp4", "hardlink.mp4"):
        assert cli.main(["render", str(same), "-o", str(tmp_path / out), "--overwrite"]) == 2
        assert_one_line_error(capfd.readouterr().err, f"the output {tmp_path / out} is the input ({same})",
                              "write the result to another path")
    guide = tmp_path / "guide.mp4"
    guide.write_bytes(source.read_bytes())
    assert cli.main(["deflicker", str(same), "--guide", str(guide), "-o", str(guide), "--overwrite"]) == 2
    assert_one_line_error(capfd.readouterr().err, f"is --guide ({guide})")
    assert same.read_bytes() == guide.read_bytes() == source.read_bytes()  # nothing was replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["guide.mp4", "hardlink.mp4", "same.mp4", "symlink.mp4"]


@pytest.mark.parametrize("option, needle", [
    (["--context-length", "40", "--context-stride", "8"], "--context-length 40 exceeds the motion modules' limit of 32"),
    (["--clip-skip", "3"], "--clip-skip 3 is not below the text encoder's 3 layers"),
])
def test_model_limits_are_checked_before_loading(source, tmp_path, capfd, monkeypatch, local_models, option, needle):
    no_model_loads(monkeypatch)
    assert cli.main(local_argv(local_models, source, tmp_path / "o.mp4", *option)) == 2
    assert_one_line_error(capfd.readouterr().err, needle)
    assert list(tmp_path.iterdir()) == []


def test_quiet_means_quiet(source, tmp_path, capfd, monkeypatch, local_models):
    """-q silences diffusers' and transformers' loading bars and warnings (the embedding resize of a textual inversion
    included), and puts their settings back for the rest of the process."""
    import diffusers.utils.logging as diffusers_logging

    monkeypatch.setattr(cli, "_render", lambda *a, **k: None)  # loading is what is noisy
    argv = local_argv(local_models, source, tmp_path / "o.mp4")  # with an A1111 embedding: the text encoder grows
    before = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
    assert cli.main(argv) == 0
    loud = capfd.readouterr().err
    assert "Loading pipeline components" in loud  # what -q must silence is there without it
    assert cli.main(argv + ["-q"]) == 0
    assert capfd.readouterr() == ("", "")
    assert (diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()) == before


def test_failed_render_leaves_no_output_folders(source, tmp_path, capfd, local_models):
    (tmp_path / "not-a-model").mkdir()
    out = tmp_path / "newdir" / "x" / "o.mp4"
    argv = local_argv(local_models, source, out, "-q")
    argv[argv.index("--base") + 1] = str(tmp_path / "not-a-model")
    assert cli.main(argv) == 2
    assert_one_line_error(capfd.readouterr().err, "could not load the models")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-model"]


def test_corrupt_lora_names_the_option_and_the_file(source, tmp_path, capfd, local_models):
    bad = tmp_path / "style.safetensors"
    bad.write_bytes(b"\xff" * 64)  # a header length no file has
    assert cli.main(local_argv(local_models, source, tmp_path / "o.mp4", "--lora", f"{bad}@0.7", "-q")) == 2
    assert_one_line_error(capfd.readouterr().err, f"--lora {bad}: could not load it as a LoRA (SafetensorError")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["style.safetensors"]


def test_missing_guide_is_named(source, tmp_path, capfd):
    assert cli.main(["deflicker", str(source), "--guide", str(tmp_path / "missing.mp4"), "-o", str(tmp_path / "o.mp4")]) == 2
    assert_one_line_error(capfd.readouterr().err, f"guide video not found: {tmp_path / 'missing.mp4'} (--guide)")
    assert list(tmp_path.iterdir()) == []


def test_audio_only_input_says_no_video_stream(tmp_path, capfd):
    vio.sine_wav(tmp_path / "tone.wav", 0.5)
    subprocess.run([vio.ffmpeg_exe(), "-loglevel", "error", "-i", str(tmp_path / "tone.wav"), "-c:a", "aac",
                    str(tmp_path / "song.m4a")], check=True)
    for name in ("tone.wav", "song.m4a"):
        assert cli.main(["render", str(tmp_path / name), "-o", str(tmp_path / "o.mp4")]) == 2
        assert_one_line_error(capfd.readouterr().err, f"{tmp_path / name} has no video stream (audio only)")
    assert not (tmp_path / "o.mp4").exists()
