"""The controls of issues 17-19 in the web app: Fast draft, Max GPU memory, prompts at times, scene cuts, painted
keyframes and a style image. Their options are the CLI's (settings.Settings.argv), so are their checks and their
pipeline arguments (cli._resolve_look, cli._prompt_schedule, fast.fast_settings, style.load_style_adapter); this
module only runs them at the app's moments: checked when Render is pressed, resolved when the render starts."""

from __future__ import annotations

import argparse
import contextlib

from .. import cli
from ..models import CLIError
from .settings import UIError, one_line

NO_FAST = ("Fast draft needs a distilled motion adapter (AnimateDiff-Lightning or AnimateLCM), and this app's is not "
           "one: start it with `diffutoon ui --motion-adapter <animatediff_lightning_4step_diffusers.safetensors or "
           "wangfuyun/AnimateLCM>` for 4-step drafts. Meanwhile fewer Steps (4) and a smaller Width/Height give a "
           "quick rough look.")
NO_STYLE = ("A style image needs an IP-Adapter, which this app could not find: start it with `diffutoon ui "
            "--ip-adapter <h94/IP-Adapter or a local ip-adapter_sd15.bin>`.")


def adapter_kind(pipe):
    """The pipeline's motion adapter kind ("lightning-4", "animatelcm") or None (an ordinary AnimateDiff one)."""
    config = getattr(pipe, "config", None) or {}
    return config.get("motion_adapter_kind") if hasattr(config, "get") else None


def fast_choices(pipe):
    """The Fast draft choices for this pipeline, [(label, value)]: none without a distilled motion adapter."""
    from .. import fast

    made_for = fast.adapter_preset(adapter_kind(pipe))
    if made_for is None:
        return []
    family = fast.PRESETS[made_for].family
    presets = [made_for] + [n for n, p in fast.PRESETS.items() if p.family == family and n != made_for
                            and family == "lcm"]  # a Lightning file is made for its own step count only
    choices = [(f"Fast draft: {made_for} ({fast.PRESETS[made_for].steps} steps, the adapter's own)", "auto")]
    choices += [(f"Fast draft: {n} ({fast.PRESETS[n].steps} steps)", n) for n in presets[1:]]
    return choices + [("Off: sample with Steps and Guidance as set (the adapter is made for few steps)", "off")]


def draft_steps(args, pipe):
    """The steps a render takes: a Fast draft's preset's when its steps were left to it, else the asked ones."""
    from .. import fast

    preset = fast.adapter_preset(adapter_kind(pipe)) if args.fast == "auto" else args.fast
    if preset in fast.PRESETS and args.steps == fast.PAPER_STEPS:
        return fast.PRESETS[preset].steps
    return args.steps


def _quiet(args, **changes):
    ns = argparse.Namespace(**{**vars(args), "quiet": True, **changes})
    return ns


def check(args, reader, indices, height, width, pipe, ip_adapter, paths):
    """Everything these options need, checked before the job is queued, with the CLI's messages in the page's
    words: the prompts' positions, Fast draft against the motion adapter, the style image's IP-Adapter, the keyframes
    (read and sized) and the scene cuts' syntax (the detection itself runs with the render)."""
    try:
        cli._prompt_schedule(args, indices, reader.fps)
        cli._resolve_look(_quiet(args, scene_cuts="none" if args.scene_cuts == "auto" else args.scene_cuts),
                          reader, indices, height, width)
    except (CLIError, ValueError) as e:
        raise UIError(one_line(e, paths)) from e
    if args.fast and args.fast != "off":
        import torch

        from .. import fast

        if fast.adapter_preset(adapter_kind(pipe)) is None:
            raise UIError(NO_FAST)
        try:
            fast.fast_settings(pipe.scheduler, adapter_kind(pipe), args.fast, args.steps, args.guidance_scale,
                               args.strength, torch.Generator())
        except ValueError as e:  # the pipeline's words for its argument, in the page's
            raise UIError("Fast draft " + " ".join(str(e).replace("fast_mode=", "").split())) from e
    if args.style_image is not None and not ip_adapter:
        raise UIError(NO_STYLE)


def resolve(args, reader, indices, height, width):
    """cli._resolve_look at the start of the render (scene cuts "auto" detected now): args.look, the cuts found."""
    quiet = _quiet(args)
    try:
        cli._resolve_look(quiet, reader, indices, height, width)
    except (CLIError, ValueError) as e:
        raise UIError(one_line(e)) from e
    args.look = quiet.look
    return args.look.get("scene_cuts")


@contextlib.contextmanager
def style_adapter(pipe, args, ip_adapter):
    """The IP-Adapter loaded for a render with a style image (the CLI's `load_style_adapter`, with the app's
    --ip-adapter) and unloaded after: renders without one run the pipeline as it was."""
    if args.style_image is None:
        yield
        return
    from .. import style

    try:
        style.load_style_adapter(pipe, _quiet(args, ip_adapter=ip_adapter))
    except Exception as e:
        raise UIError(f"Style image: could not load the IP-Adapter ({one_line(e)})") from e
    try:
        yield
    finally:
        pipe.unload_ip_adapter()
