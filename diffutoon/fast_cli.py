"""The command line of fast mode and previews (issue 17): `diffutoon render --fast [PRESET] --preview PATH
--preview-vae SOURCE`, as an option group and the pipeline arguments it maps to (diffutoon/fast.py, previews.py)."""

from __future__ import annotations

from pathlib import Path

from diffutoon.fast import PRESETS

# The command line: `diffutoon render --fast [PRESET] --preview PATH --preview-vae SOURCE`


def add_cli_options(parser):
    """The fast-draft and preview options, in their own group of `parser`."""
    g = parser.add_argument_group("fast drafts and previews (README 'Fast mode')")
    g.add_argument("--fast", nargs="?", const="auto", choices=["auto", "off", *PRESETS], metavar="PRESET",
                   help="few-step sampling with a distilled --motion-adapter (an AnimateDiff-Lightning "
                        "animatediff_lightning_Nstep_diffusers.safetensors file, or AnimateLCM: wangfuyun/AnimateLCM or "
                        f"its folder): {', '.join(PRESETS)}; without a value, the adapter's own preset")
    g.add_argument("--preview", type=_preview_path, metavar="PATH",
                   help="keep a preview of the clean-video estimate up to date after every step: .png/.jpg (a strip "
                        "of frames) or .mp4/.gif (every frame); the render folder always holds previews/latest.png")
    g.add_argument("--preview-vae", metavar="SOURCE",
                   help="an AutoencoderTiny for sharper previews, e.g. madebyollin/taesd (default: a linear colour map)")
    return parser


def _preview_path(text: str) -> Path:
    import argparse

    from diffutoon.previews import Previewer

    try:
        Previewer.check(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("preview must be None, True, False or", "use")) from None
    return Path(text)


def check_cli(args, out, scheduler) -> None:
    """Before any frame is read or model loaded, one ValueError for: a --preview over the output or the input, or a
    --fast (or none) that the --motion-adapter, known by its name, does not take (`scheduler`: the pipeline's)."""
    import torch

    from diffutoon.fast import fast_settings, source_kind
    from diffutoon.previews import Previewer

    if getattr(args, "preview", None) is not None:
        Previewer.check(args.preview, out, args.input)
    fast = getattr(args, "fast", None)
    if fast != "off":
        fast_settings(scheduler, source_kind(args.motion_adapter), fast, args.steps, args.guidance_scale, args.strength,
                      torch.Generator())


def cli_arguments(args, pipe) -> dict:
    """The pipeline arguments of those options (the preview VAE loaded onto the pipeline's device)."""
    kwargs = {"fast_mode": getattr(args, "fast", None), "preview": getattr(args, "preview", None)}
    source = getattr(args, "preview_vae", None)
    if source:
        from diffusers import AutoencoderTiny

        try:
            vae = AutoencoderTiny.from_pretrained(source, torch_dtype=pipe.vae.dtype)
        except Exception as e:
            raise ValueError(f"--preview-vae {source}: could not load it as an AutoencoderTiny ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
        kwargs["preview_vae"] = vae.to(pipe._execution_device).eval()
    return kwargs
