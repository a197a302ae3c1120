"""Fast mode (issue 17): AnimateDiff-Lightning / AnimateLCM adapters loaded from files in their real layouts, the presets'
consistency checks, bit-identical resume after SIGKILL and 2 processes == 1 in fast mode, and live previews."""

import json
import re
import signal

import numpy as np
import pytest
import torch
from conftest import save_sd15_folder
from render_job import job
from safetensors.torch import save_file
from test_distributed import spawn as spawn_group
from test_render_folder import spawn as spawn_job

from diffutoon import fast, previews, report
from diffutoon import video as vio
from diffutoon.tiny import tiny_components
from pipeline_diffutoon import DiffutoonDDIMScheduler, DiffutoonPipeline, sliding_windows

TINY_ADAPTER = dict(motion_norm_num_groups=4, motion_num_attention_heads=2)  # what the weights cannot say
RANK, ALPHA = 4, 2.0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny SD1.5 folder + ControlNets, a Lightning single file and an AnimateLCM folder (adapter + kohya LoRA),
    random weights in the real files' key layouts."""
    d = tmp_path_factory.mktemp("fast_models")
    parts = tiny_components(seed=0)
    sd15 = save_sd15_folder(d, parts)
    gen = torch.Generator().manual_seed(5)
    # Lightning: exactly the keys of diffusers' MotionAdapter state dict (the Hub file's layout), other values
    lightning = {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in parts["motion_adapter"].state_dict().items()}
    save_file(lightning, str(d / "animatediff_lightning_2step_diffusers.safetensors"))
    # AnimateLCM: a diffusers adapter folder with the kohya-layout spatial LoRA beside it
    parts["motion_adapter"].save_pretrained(d / "AnimateLCM")
    lora, state = {}, {}
    for name, module in parts["unet"].named_modules():
        if isinstance(module, torch.nn.Linear) and ".attentions." in name:
            out_f, in_f = module.weight.shape
            down, up = torch.randn(RANK, in_f, generator=gen) / in_f**0.5, torch.randn(out_f, RANK, generator=gen)
            key = "lora_unet_" + name.replace(".", "_")
            state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(ALPHA)})
            lora[name] = (down, up)
    save_file(state, str(d / "AnimateLCM" / fast.LCM_LORA))
    nets = [str(d / "cn0"), str(d / "cn1")]
    return dict(sd15=str(sd15), nets=nets, lightning=d / "animatediff_lightning_2step_diffusers.safetensors",
                lightning_state=lightning, lcm=d / "AnimateLCM", lora=lora, unet=parts["unet"])


def test_a_lightning_file_loads_into_the_motion_modules_and_asks_for_its_preset(models):
    adapter, kind, lora = fast.load_motion_adapter(models["lightning"], TINY_ADAPTER)
    assert (kind, lora) == ("lightning-2", None)
    assert adapter.state_dict().keys() == models["lightning_state"].keys()
    pipe = DiffutoonPipeline.from_models(models["sd15"], str(models["lightning"]), models["nets"],
                                         torch_dtype=torch.float32, motion_adapter_config=TINY_ADAPTER)
    assert pipe.config.motion_adapter_kind == "lightning-2"
    motion = {k: v for k, v in pipe.unet.state_dict().items() if ".motion_modules." in k}
    assert len(motion) == len(models["lightning_state"])
    for key, value in models["lightning_state"].items():  # the UNet's motion modules are the file's tensors
        torch.testing.assert_close(pipe.unet.state_dict()[key.replace("mid_block.", "mid_block.")], value, rtol=0, atol=0)
    video = np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match=r"AnimateDiff-Lightning 2-step, made for fast_mode='lightning-2'.*takes 2 "
                                         r"steps, this call 10.*guidance <= 1, this call asks for 7"):
        pipe(video=video, prompt="a girl")  # the paper's 10 DDIM steps at guidance 7: refused before any model runs
    with pytest.raises(ValueError, match="does not fit this pipeline's motion adapter"):
        pipe(video=video, prompt="a girl", fast_mode="lightning-4")
    scheduler, steps, guidance, _ = fast.fast_settings(pipe.scheduler, "lightning-2", "auto", 10, 7.0, 1.0, None)
    assert (type(scheduler).__name__, scheduler.config.timestep_spacing, scheduler.config.beta_schedule, steps,
            guidance) == ("EulerDiscreteScheduler", "trailing", "linear", 2, 1.0)


def test_animatelcm_adapter_and_its_lora_fused_at_08(models):
    pipe = DiffutoonPipeline.from_models(models["sd15"], str(models["lcm"]), models["nets"], torch_dtype=torch.float32)
    assert pipe.config.motion_adapter_kind == "animatelcm"
    assert not any("lora" in k for k in pipe.unet.state_dict())  # fused: no LoRA layers left for set_adapters to drop
    for name, (down, up) in models["lora"].items():  # W + 0.8 (alpha / rank) up @ down, by hand
        expected = models["unet"].get_submodule(name).weight + fast.LCM_LORA_SCALE * ALPHA / RANK * up @ down
        torch.testing.assert_close(pipe.unet.get_submodule(name).weight, expected, rtol=1e-5, atol=1e-6)
    scheduler, steps, guidance, generator = fast.fast_settings(pipe.scheduler, "animatelcm", "auto", 10, 7.0, 1.0, None)
    assert (type(scheduler).__name__, scheduler.config.beta_schedule, steps, guidance) == ("LCMScheduler", "linear", 4, 1.0)
    assert isinstance(generator, torch.Generator)  # LCM's per-step noise needs one whose state checkpoints keep


def test_inconsistent_settings_are_one_clear_error():
    ddim = DiffutoonDDIMScheduler()
    with pytest.raises(ValueError, match="fast_mode must be None, 'off', 'auto' or one of lightning-1"):
        fast.fast_settings(ddim, None, "turbo", 10, 7.0, 1.0, None)
    with pytest.raises(ValueError, match="it needs guidance <= 2, this call asks for 5"):
        fast.fast_settings(ddim, None, "lcm-4", 6, 5.0, 1.0, None)
    with pytest.raises(ValueError, match="fast_mode='auto' needs a distilled motion adapter"):
        fast.fast_settings(ddim, None, "auto", 10, 7.0, 1.0, None)
    with pytest.raises(ValueError, match="keeps no step of 2"):
        fast.fast_settings(ddim, None, "lightning-2", 10, 7.0, 0.3, None)
    # asked for explicitly: a distilled adapter sampled as the call says
    assert fast.fast_settings(ddim, "lightning-4", "off", 10, 7.0, 1.0, None)[:3] == (ddim, 10, 7.0)
    assert fast.fast_settings(ddim, None, None, 10, 7.0, 1.0, None)[:3] == (ddim, 10, 7.0)  # default: untouched


def test_euler_model_input_is_scaled_as_diffusers_does():
    from diffusers import EulerDiscreteScheduler

    from diffutoon.render_folder import HostFrames

    scheduler = fast.PRESETS["lightning-4"].scheduler()
    scheduler.set_timesteps(4)
    t = scheduler.timesteps[0]
    x = HostFrames(np.random.default_rng(0).standard_normal((5, 4, 2, 2)).astype(np.float32))
    sigma = float(scheduler.sigmas[0])
    scaled = fast.model_input(scheduler, t, x, lambda: HostFrames(np.zeros((5, 4, 2, 2), np.float32)))
    np.testing.assert_allclose(scaled.array, x.array / (sigma**2 + 1) ** 0.5, rtol=1e-6)
    assert isinstance(scheduler, EulerDiscreteScheduler) and [int(v) for v in scheduler.timesteps] == [999, 749, 499, 249]
    ddim = DiffutoonDDIMScheduler()
    ddim.set_timesteps(2)
    assert fast.model_input(ddim, 999, x, None) is x  # the paper's sampler: no copy


def fast_job(preset, steps):
    return job(num_inference_steps=steps, fast_mode=preset)


@pytest.mark.parametrize("preset, steps", [("lightning-2", 2), ("lcm-4", 3)])
def test_sigkill_then_resume_in_fast_mode_is_bit_identical(job_pipe, tmp_path, preset, steps):
    folder = tmp_path / "render"
    proc = spawn_job(folder, tmp_path / "x.npy", "--kill", "main", "1", "2", "--fast", preset, str(steps))
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((folder / "manifest.json").read_text())["passes"]["main"]["completed_steps"] == 1
    resumed = job_pipe(**fast_job(preset, steps), render_dir=folder).frames[0]
    assert np.array_equal(resumed, job_pipe(**fast_job(preset, steps)).frames[0])


def test_the_identity_is_what_samples_not_how_it_was_asked(job_pipe, monkeypatch):
    """A resume is refused only when the sampling differs: None and "off" (the pipeline's scheduler), a preset with its
    steps left to it or given the same, are each one render; another preset or scheduler is another."""
    seen = []

    class Stop(Exception):
        pass

    def open_render(self, render_dir, fresh, progress_callback, arguments, source, height, width, edit_settings):
        seen.append(json.dumps(self._render_identity(arguments, source, edit_settings)["settings"], sort_keys=True))
        raise Stop

    monkeypatch.setattr(DiffutoonPipeline, "_open_render", open_render)
    for kwargs in [dict(), dict(fast_mode="off"), dict(num_inference_steps=10, fast_mode="lightning-2"),
                   dict(num_inference_steps=2, guidance_scale=1.0, fast_mode="lightning-2"),
                   dict(num_inference_steps=10, fast_mode="lightning-4"), dict(num_inference_steps=10, fast_mode="lcm-4")]:
        with pytest.raises(Stop):
            job_pipe(**{**job(num_inference_steps=10), **kwargs})
    assert seen[0] == seen[1] and seen[2] == seen[3] and len(set(seen)) == 4


def _fast_render(rank, job_pipe):
    return job_pipe(**fast_job("lcm-4", 3)).frames


def test_two_processes_give_the_frames_of_one_in_fast_mode(job_pipe, tmp_path):
    results, errors, codes = spawn_group(2, tmp_path, _fast_render, job_pipe)
    assert not errors and codes == [0, 0]
    assert np.array_equal(results[0][0], job_pipe(**fast_job("lcm-4", 3)).frames[0]) and results[1] is None


def test_previews_and_fast_mode_off_leave_the_render_unchanged(job_pipe, job_reference, tmp_path):
    import PIL.Image

    strip, seen = tmp_path / "render" / "previews" / "latest.png", {}

    def look(progress):  # while the render runs: the strip of the last step's estimate, and the video beside
        if progress.get("preview_step") and progress["preview_step"] not in seen:
            seen[progress["preview_step"]] = (progress["preview"], np.asarray(PIL.Image.open(strip)).shape)

    out = job_pipe(**job(), fast_mode="off", render_dir=tmp_path / "render", preview=tmp_path / "live.mp4",
                   progress_callback=look, keep_render_dir=True)
    assert np.array_equal(out.frames[0], job_reference["main"])  # previews on == off (the reference)
    assert seen == {step: (str(tmp_path / "live.mp4"), (4, 8 * 4, 3)) for step in (1, 2, 3)}  # 8 frames of 4x4
    assert (tmp_path / "live.mp4").stat().st_size > 0 and previews.is_preview(tmp_path / "live.mp4")
    previews.Previewer.check(tmp_path / "live.mp4")  # so the next render may replace it
    # the quality report: in the folder, in the result, and from the frames the call returned
    saved = json.loads((tmp_path / "render" / "report.json").read_text())
    assert saved == out.report == json.loads((tmp_path / "render" / "progress.json").read_text())["report"]
    expected = report.quality_report((out.frames[0] * 255).round().astype(np.uint8), job()["video"],
                                     sliding_windows(9, 4, 3))
    assert saved == pytest.approx(expected, rel=1e-9)


def test_a_preview_over_the_output_is_refused_before_any_work(job_pipe, tmp_path, monkeypatch):
    def no_models(*args, **kwargs):
        raise AssertionError("a model ran")

    monkeypatch.setattr(job_pipe, "prepare_control_frames", no_models)
    out, frames = tmp_path / "out.mp4", tmp_path / "frames"
    for output, preview in [(out, out), (frames, frames / "live.png")]:  # it made the output "exist" after all the work
        with pytest.raises(ValueError, match="preview .* is \\(in\\) the render's output_path"):
            job_pipe(**job(), output_path=output, fps=8, preview=preview)
    assert not out.exists() and not frames.exists()
    import PIL.Image

    for name in ("mine.png", "mine.gif", "mine.mp4"):  # a user's own file where the preview would go: kept as it is
        mine = tmp_path / name
        if name.endswith(".mp4"):
            vio.write_video(mine, np.zeros((2, 8, 8, 3), np.uint8), fps=8, progress=False)
        else:
            PIL.Image.new("RGB", (8, 8)).save(mine)
        before = mine.read_bytes()
        with pytest.raises(ValueError, match="exists and is not a live preview this project wrote"):
            job_pipe(**job(), preview=mine)
        assert mine.read_bytes() == before and not previews.is_preview(mine)
    for name in ("p.png", "p.jpg", "p.webp"):  # what previews write carries their mark
        assert previews.is_preview(previews._write_image(tmp_path / name, np.zeros((4, 8, 3), np.uint8)))
    assert previews.is_preview(previews._write_video(tmp_path / "p.gif", np.zeros((2, 4, 4, 3), np.uint8), 8))


def test_the_quality_report_against_fastblend_metrics_and_by_hand():
    from fastblend.metrics import warping_error

    from conftest import make_video

    source = make_video(9, 32)
    rng = np.random.default_rng(0)
    frames = np.clip(source.astype(int) // 2 + rng.integers(0, 60, source.shape), 0, 255).astype(np.uint8)
    windows = [(0, 4), (3, 7), (6, 9)]  # = sliding_windows(9, 4, 3): edges at 3, 4, 6, 7
    got = report.QualityReport(windows, 9)
    for start in range(0, 9, 4):  # a chunk at a time, as the output is written
        got.add(frames[start : start + 4], source[start : start + 4])
    got = got.result()
    pairs = [warping_error(frames[i : i + 2], source[i : i + 2]) for i in range(8)]
    seams = [2, 3, 5, 6]  # pairs (i, i + 1) with a window edge between them
    inside = [i for i in range(8) if i not in seams]
    assert got["warping_error"] == pytest.approx(warping_error(frames, source), rel=1e-6)
    assert got["seam_score"] == pytest.approx(np.mean([pairs[i] for i in seams]) / np.mean([pairs[i] for i in inside]),
                                              rel=1e-6)
    assert got["pixel_mae"] == pytest.approx(np.abs(frames.astype(float) - source).mean(), rel=1e-12)
    assert (got["frames"], got["seam_pairs"], got["inside_pairs"]) == (9, 4, 4)
    assert "seam score" in report.summary(got)
    # shots cut at frame 4 (windows (0, 4), (4, 8), (5, 9) per shot): the pair (3, 4) counts nowhere
    cut = report.quality_report(frames, source, [(0, 4), (4, 8), (5, 9)], scene_cuts=[4])
    seams, inside = [4, 7], [0, 1, 2, 5, 6]
    assert cut["warping_error"] == pytest.approx(np.mean([pairs[i] for i in seams + inside]), rel=1e-6)
    assert cut["seam_score"] == pytest.approx(np.mean([pairs[i] for i in seams]) / np.mean([pairs[i] for i in inside]),
                                              rel=1e-6)
    assert (cut["seam_pairs"], cut["inside_pairs"]) == (2, 5)


def test_the_preview_estimate_and_colours_match_independent_computations():
    from diffusers import DDIMScheduler

    gen = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 4, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, generator=gen)
    ours = DiffutoonDDIMScheduler()
    theirs = DDIMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    theirs.set_timesteps(10)
    x0 = theirs.step(eps, theirs.timesteps[2], x).pred_original_sample
    torch.testing.assert_close(previews.ddim_x0(ours, theirs.timesteps[2], x, eps), x0, rtol=1e-5, atol=1e-5)
    rgb = previews.latent_to_rgb(x).numpy()
    by_hand = np.clip((np.tensordot(x.numpy(), np.array(previews.LATENT_RGB), axes=([1], [0])) + 1) * 127.5, 0, 255)
    assert np.abs(rgb.astype(float) - by_hand).max() <= 0.5 + 1e-4
    with pytest.raises(ValueError, match="preview must be None, True, False or a path ending in"):
        previews.Previewer.check("live.txt")


def test_the_cli_renders_a_fast_draft_with_a_preview_and_prints_the_report(tmp_path, monkeypatch, capsys):
    from distributed_job import tiny_load

    from diffutoon import cli
    from diffutoon import video as vio

    source = vio.make_demo_clip(tmp_path / "in.mp4", num_frames=5, height=32, width=32, fps=8)
    options = ["--height", "32", "--width", "32", "--context-length", "4", "--context-stride", "2", "--device", "cpu",
               "--dtype", "float32", "-q"]
    monkeypatch.setattr(cli, "_check_sources", lambda sources: None)
    monkeypatch.setattr(cli, "_load_pipeline", tiny_load)
    assert cli.main(["render", str(source), "-o", str(tmp_path / "out.mp4"), "--fast", "lightning-2",
                     "--preview", str(tmp_path / "live.png"), "--keep-work-dir", *options]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("wrote") and out[-1].startswith("quality: warping error")
    assert (tmp_path / "live.png").exists() and (tmp_path / "out.mp4.parts" / "previews" / "latest.png").exists()
    assert json.loads((tmp_path / "out.mp4.parts" / "report.json").read_text())["frames"] == 5
    # the tiny models are no distilled adapter: --fast alone (its preset) is one line, and so is a bad preview path
    assert cli.main(["render", str(source), "-o", str(tmp_path / "o2.mp4"), "--fast", *options]) == 2
    assert "fast_mode='auto' needs a distilled motion adapter" in capsys.readouterr().err
    assert cli.main(["render", str(source), "-o", str(tmp_path / "o3.mp4"), "--preview", "p.txt", *options]) == 2
    assert "--preview: use a path ending in .png" in capsys.readouterr().err


def test_the_cli_refuses_fast_and_preview_mistakes_before_reading_frames_or_loading_models(tmp_path, monkeypatch, capsys):
    from diffutoon import cli
    from diffutoon import video as vio

    def no_work(*args, **kwargs):
        raise AssertionError("frames read or models loaded")

    source = vio.make_demo_clip(tmp_path / "in.mp4", num_frames=3, height=32, width=32, fps=8)
    lightning = tmp_path / "animatediff_lightning_4step_diffusers.safetensors"
    lightning.write_bytes(b"")  # known by its name, as the loader knows it
    monkeypatch.setattr(cli, "_check_sources", lambda sources: None)
    monkeypatch.setattr(cli, "_resolve_look", no_work)  # --scene-cuts auto reads every frame
    monkeypatch.setattr(cli, "_load_pipeline", no_work)
    out = tmp_path / "out.mp4"
    for extra, message in [(["--fast"], "fast_mode='auto' needs a distilled motion adapter"),
                           (["--motion-adapter", str(lightning)], "made for fast_mode='lightning-4'"),
                           (["--motion-adapter", str(lightning), "--fast", "lcm-4"], "does not fit"),
                           (["--preview", str(out)], "is \\(in\\) the render's output_path"),
                           (["--preview", str(source)], "is \\(in\\) the render's input video|exists and is not a live preview")]:
        assert cli.main(["render", str(source), "-o", str(out), "--device", "cpu", "-q", *extra]) == 2, extra
        assert re.search(message, capsys.readouterr().err), extra
