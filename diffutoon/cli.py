"""The `diffutoon` command: render a video in toon style, deflicker a video with FastBlend, or run an offline demo.

    diffutoon render dance.mp4 -o dance-toon.mp4 --prompt "best quality, perfect anime illustration, light"
    diffutoon render dance.mp4 -o frames/ --start 2s --max-frames 64 --short-side 768 --resize short_side
    diffutoon deflicker dance-toon.mp4 --guide dance.mp4 -o dance-toon-smooth.mp4
    diffutoon demo                      # offline: tiny random-weight models, writes diffutoon-demo.mp4

Errors (missing or broken input, models neither cached nor downloadable, bad option values) print one line
and exit with status 2; `--debug` shows the traceback instead.

    >>> main(["render", "/nonexistent.mp4"])
    2
"""

import argparse
import bisect
import contextlib
import inspect
import math
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

from . import video as vio
# where the models come from and how they load: diffutoon.models, shared with the web app
from .models import (DEFAULT_ANNOTATORS, DEFAULT_BASE, DEFAULT_DEPTH, DEFAULT_LINEART, DEFAULT_MOTION_ADAPTER,  # noqa: F401
                     DEFAULT_NEGATIVE_EMBEDDING, DEFAULT_NEGATIVE_TOKEN, DEFAULT_PROMPT, DEFAULT_SOFTEDGE, DEFAULT_TILE,
                     CLIError, _check_device, _check_model_limits, _check_sources, _import_pipeline, _import_style,
                     _load_pipeline, _model_sources, _torch_setup)

DEMO_DISCLAIMER = ("NOTE: the demo uses tiny RANDOM-weight models. It proves the install works end to end "
                   "(file -> frames -> pipeline -> mp4 with sound); it does NOT show what Diffutoon looks "
                   "like. The output is expected to be noise-like.")
DEMO_FOOTER = "NOTE: random weights prove the install, not the art. Real results: `diffutoon render` (see --help)."


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # argparse prints the whole usage block; one line that says what to change is easier to act on
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# ---------------------------------------------------------------------------------------------- option types
def _number(kind, lo=None, hi=None, lo_open=False, multiple=None):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not math.isfinite(value):  # nan passes every comparison below
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if lo is not None and (value <= lo if lo_open else value < lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo}, got {text}")
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi}, got {text}")
        if multiple and value % multiple:
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple}, got {text} "
                                             f"(e.g. {max(multiple, round(value / multiple) * multiple)})")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _position(text):
    """A frame number ("120") or a time in seconds ("4.5s"); resolved against the video's fps later."""
    try:
        value = ("s", float(text[:-1])) if text.endswith("s") else ("f", int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a frame number (120) or seconds (4.5s), got {text!r}")
    if not math.isfinite(value[1]) or value[1] < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _frame(position, fps):
    if position is None:
        return None
    unit, value = position
    return int(round(value * fps)) if unit == "s" else value


def _timed_prompt(text):
    """POSITION=PROMPT of --prompt-at: a frame number or seconds (4.5s) of the input video, and the prompt there."""
    position, sep, prompt = text.partition("=")
    if not sep or not prompt.strip():
        raise argparse.ArgumentTypeError(f"expected POSITION=PROMPT, e.g. 96=\"a girl dancing, night\" or "
                                         f"4.5s=\"...\", got {text!r}")
    return _position(position.strip()), prompt


def _image_file(text):
    """A readable image file (checked now, before any model loads)."""
    import PIL.Image

    try:
        with PIL.Image.open(text) as image:
            image.verify()
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"cannot read {text} as an image ({type(e).__name__}: {e})")
    return Path(text)


def _prompt_schedule(args, indices, fps):
    """--prompt, with --prompt-at, as the pipeline's prompt: {rendered frame: prompt}. Positions are frames or seconds
    of the input video (as --start/--end), each moved to the first rendered frame at or after it."""
    if not getattr(args, "prompt_at", None):
        return args.prompt
    indices, schedule = list(indices), {0: args.prompt}
    for position, prompt in args.prompt_at:
        if position[0] == "s" and not fps:
            raise CLIError(f"--prompt-at {position[1]:g}s: this input has no frame rate, give a frame number")
        frame = _frame(position, fps)
        if not indices[0] <= frame <= indices[-1]:
            raise CLIError(f"--prompt-at {frame}: outside the rendered frames {indices[0]}..{indices[-1]} of the input "
                           "(--start/--end); use --prompt for the prompt at the start")
        schedule[bisect.bisect_left(indices, frame)] = prompt
    return schedule


# ---------------------------------------------------------------------------------------------- the parser
def _direction():
    direction = _Parser(add_help=False)
    g = direction.add_argument_group("directing the look (README \"Prompts over time\", \"A style image\")")
    g.add_argument("--prompt-at", type=_timed_prompt, action="append", default=[], metavar="POSITION=PROMPT",
                   help="the prompt from this frame or time (4.5s) of the input on, blended linearly from the one "
                   "before (repeatable; --prompt is the prompt at the start)")
    g.add_argument("--long-prompt", choices=("chunks", "reference", "truncate"), default="chunks",
                   help="prompts over 75 tokens: 75-token chunks with their own BOS/EOS (default), the authors' raw "
                   "split of the padded sequence, or truncated")
    g.add_argument("--style-image", type=_image_file, help="a style image (IP-Adapter)")
    g.add_argument("--style-scale", type=_number(float, 0), default=0.6, help="its weight (default %(default)s)")
    g.add_argument("--ip-adapter", help="IP-Adapter weights: a Hub id holding models/ip-adapter_sd15.bin (default "
                   "h94/IP-Adapter), owner/repo/path/file.bin, or a local file with image_encoder/ beside it")
    return direction


def _common():
    common = _Parser(add_help=False)
    common.add_argument("--overwrite", action="store_true", help="replace an existing output")
    common.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return common


def _memory_options():
    """--max-vram (issue 18): the memory plan's budget."""
    parser = _Parser(add_help=False)
    parser.add_argument("--max-vram", metavar="SIZE", type=_vram,
                        help="accelerator memory the render may use, weights included, e.g. 12GB: the pipeline picks "
                        "the fastest exact savings that fit (default on CUDA: the free memory) and prints its plan")
    return parser


def _vram(text):
    from diffutoon.memory import parse_bytes

    try:
        parse_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).replace("memory_budget=", "--max-vram ")) from None
    return text


def _memory_kwargs(args) -> dict:
    """The pipeline arguments of --max-vram, and a progress callback printing the plan's line once."""
    shown = []

    def show(progress):
        if "memory_plan" in progress and not shown and not args.quiet:
            shown.append(print(f"memory plan: {progress['memory_plan']}", flush=True))

    budget = getattr(args, "max_vram", None)
    return dict(progress_callback=show, **({"memory_budget": budget} if budget else {}))


def _span():
    span = _Parser(add_help=False)
    g = span.add_argument_group("frame range (numbers are frames, or seconds with an s: 2.5s)")
    g.add_argument("--start", type=_position, default=("f", 0), help="first frame (default 0)")
    g.add_argument("--end", type=_position, help="stop before this frame (default: the end)")
    g.add_argument("--every-nth", type=_number(int, 1), default=1, help="keep every n-th frame (default 1)")
    g.add_argument("--max-frames", type=_number(int, 1), help="at most this many frames")
    g = span.add_argument_group("output")
    g.add_argument("-o", "--output", type=Path,
                   help="an .mp4 (also .mov/.m4v/.mkv) file, or a folder for PNG frames (a path without suffix)")
    g.add_argument("--fps", type=_number(float, 0.01, 1000),
                   help="output frame rate (default: the source's fps / --every-nth, which keeps the timing)")
    g.add_argument("--no-audio", action="store_true", help="do not copy the source's audio")
    return span


def _render_folder_options():
    """render and demo only: deflicker is one short FastBlend pass, with nothing to resume."""
    span = _Parser(add_help=False)
    g = span.add_argument_group("long renders (a crash, Ctrl-C or a lost machine loses nothing: run the same command "
                                "again to resume)")
    g.add_argument("--work-dir", type=Path, help="the render folder: condition frames, a checkpoint after every step "
                   "and progress.json, so host memory stays flat in the length (default: <output>.parts)")
    g.add_argument("--fresh", action="store_true", help="start over, discarding what --work-dir holds")
    g.add_argument("--keep-work-dir", action="store_true", help="keep the render folder after the output is written")
    g.add_argument("--in-memory", action="store_true", help="no render folder: everything in host memory, no resume")
    return span


def _generation():
    gen = _Parser(add_help=False)
    g = gen.add_argument_group("size (the reference: 1536x1536, centre crop)")
    g.add_argument("--height", type=_number(int, 8, multiple=8), default=1536, help="(default %(default)s)")
    g.add_argument("--width", type=_number(int, 8, multiple=8), default=1536, help="(default %(default)s)")
    g.add_argument("--resize", choices=vio.RESIZE_POLICIES, default="crop",
                   help="crop: cover then cut the centre (reference); pad: fit with black bars; "
                        "short_side: keep the aspect ratio, short side = --short-side, sides rounded to x8")
    g.add_argument("--short-side", type=_number(int, 8), default=512, help="for --resize short_side (default %(default)s)")
    g = gen.add_argument_group("generation (defaults: the paper's main toon-shading pass)")
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"default: {DEFAULT_PROMPT!r}")
    g.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE_TOKEN,
                   help=f"default: {DEFAULT_NEGATIVE_TOKEN!r} (the textual inversion, loaded automatically)")
    g.add_argument("--edit-prompt", help="run the editing branch first (recolouring, relighting) with this prompt")
    g.add_argument("--edit-height", type=_number(int, 8, multiple=8), default=512, help="editing branch (default %(default)s)")
    g.add_argument("--edit-width", type=_number(int, 8, multiple=8), default=512, help="editing branch (default %(default)s)")
    g.add_argument("--edit-steps", type=_number(int, 1), default=20, help="editing branch (default %(default)s)")
    g.add_argument("--edit-strength", type=_number(float, 0, 1, lo_open=True), default=0.9,
                   help="editing branch img2img strength (default %(default)s)")
    g.add_argument("--steps", type=_number(int, 1), default=10, help="denoising steps (default %(default)s)")
    g.add_argument("--guidance-scale", type=_number(float, 0, 100), default=7.0, help="CFG scale (default %(default)s)")
    g.add_argument("--context-length", type=_number(int, 1), default=16, help="sliding-window frames (default %(default)s)")
    g.add_argument("--context-stride", type=_number(int, 1), default=8, help="window stride (default %(default)s)")
    g.add_argument("--lineart-scale", type=_number(float, 0, 100), default=0.5, help="lineart ControlNet (default %(default)s)")
    g.add_argument("--tile-scale", type=_number(float, 0, 100), default=0.5, help="tile ControlNet (default %(default)s)")
    g.add_argument("--clip-skip", type=_number(int, 0), default=1,
                   help="diffusers' clip_skip: 1 = A1111's 'clip skip 2', the reference (default %(default)s)")
    g.add_argument("--strength", type=_number(float, 0, 1, lo_open=True), default=1.0,
                   help="1.0 = pure noise, the reference; < 1 starts from the video, img2img (default %(default)s)")
    g.add_argument("--seed", type=_number(int, 0, 2**64 - 1), default=0, help="random seed (default %(default)s)")
    g.add_argument("--decode-chunk-size", type=_number(int, 1), default=8, help="frames per VAE decode (default %(default)s)")
    g.add_argument("--device", default="auto", help="cuda, cuda:1, cpu, mps... auto: cuda if available (default %(default)s)")
    g.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto",
                   help="auto: float16 on cuda, float32 elsewhere (default %(default)s)")
    return gen


def _models():
    models = _Parser(add_help=False)
    g = models.add_argument_group("models (Hub ids, local folders, or for --base a single .safetensors/.ckpt)")
    g.add_argument("--base", default=DEFAULT_BASE, help=f"SD1.5 checkpoint, ideally an anime one (default {DEFAULT_BASE})")
    g.add_argument("--motion-adapter", default=DEFAULT_MOTION_ADAPTER, metavar="FILE|FOLDER|HUB_ID",
                   help=f"default {DEFAULT_MOTION_ADAPTER}; also an AnimateDiff-Lightning .safetensors or AnimateLCM "
                        "(see --fast)")
    g.add_argument("--lineart-controlnet", default=DEFAULT_LINEART, help=f"default {DEFAULT_LINEART}")
    g.add_argument("--tile-controlnet", default=DEFAULT_TILE, help=f"default {DEFAULT_TILE}")
    g.add_argument("--softedge-controlnet", default=DEFAULT_SOFTEDGE, help=f"editing branch (default {DEFAULT_SOFTEDGE})")
    g.add_argument("--depth-controlnet", default=DEFAULT_DEPTH, help=f"editing branch (default {DEFAULT_DEPTH})")
    g.add_argument("--annotators", default=DEFAULT_ANNOTATORS,
                   help=f"controlnet-aux annotator weights for the lineart detector (default {DEFAULT_ANNOTATORS})")
    g.add_argument("--textual-inversion", action="append", default=[], metavar="SOURCE[@TOKEN]",
                   help="an A1111/diffusers embedding: file, folder, Hub id or Hub repo/file; the token defaults "
                        "to the file's stem. Repeatable. The default negative embedding is added when the "
                        f"negative prompt uses it: {DEFAULT_NEGATIVE_EMBEDDING}")
    g.add_argument("--lora", action="append", default=[], metavar="SOURCE[@SCALE]",
                   help="a LoRA (file, folder, Hub id or Hub repo/file) with its scale (default 1.0). Repeatable")
    return models


def _fast():
    from . import fast_cli  # --fast, --preview, --preview-vae

    return fast_cli.add_cli_options(_Parser(add_help=False))


def _look():
    """Painted keyframes and scene cuts (issue 19; diffutoon/keyframes.py, diffutoon/scenes.py)."""
    look = _Parser(add_help=False)
    g = look.add_argument_group("direct the look")
    g.add_argument("--keyframe", action="append", default=[], metavar="FRAME=IMAGE",
                   help="a frame you repainted: source frame number or time (120=f.png, 4.5s=f.png), image of the "
                        "video's or the output's aspect. FastBlend spreads it over the video as the tile ControlNet's "
                        "colours. Repeatable; not with --edit-prompt")
    g.add_argument("--scene-cuts", default="auto", metavar="auto|none|12,340",
                   help="render each shot on its own: auto (PySceneDetect's content detector), none, or the source "
                        "frames (or times, 2.5s) where new shots start (default %(default)s: a video without cuts "
                        "renders as with none)")
    return look


def _resolve_look(args, reader, indices, height, width):
    """--keyframe and --scene-cuts as pipeline arguments (args.look), checked and detected before any model loads;
    the keyframes are resized as the clip's frames are (--resize), the cuts printed."""
    from . import keyframes as kf
    from . import scenes

    look = {}
    if args.keyframe and args.edit_prompt:
        raise CLIError("--keyframe and --edit-prompt both make the tile ControlNet's colours: use one of them")
    frames = {}
    for text in args.keyframe:
        try:
            position, path = kf.parse_cli(text)
            index = kf.select(text, position, reader.fps, indices)
            image = kf._image(path, f"--keyframe {text}")
        except ValueError as e:
            raise CLIError(str(e)) from e
        h, w = image.shape[:2]
        if index in frames:
            raise CLIError(f"--keyframe {text}: frame {indices[index]} has a keyframe already")
        if (h, w) != (height, width) and not kf._same_aspect(h, w, reader.height, reader.width):
            raise CLIError(f"--keyframe {text}: {path} is {w}x{h}, but the video is {reader.width}x{reader.height} and "
                           f"the output {width}x{height}: paint on a frame of the video or of the output")
        frames[index] = vio.resize_frames(image[None], height, width, args.resize)[0]
    if frames:
        look["keyframes"] = frames
    try:
        given = scenes.parse_cli(args.scene_cuts)
    except ValueError as e:
        raise CLIError(str(e)) from e
    if given == "auto":
        read = lambda s, e: reader.read(indices[s:e])  # noqa: E731  at the source's size, a chunk at a time
        with _bar(args, len(indices), "finding scene cuts") as bar:
            cuts = scenes.detect_cuts(read, len(indices), progress=lambda done: bar.update(done - bar.n))
    elif given == "none":
        cuts = None
    else:  # source frames / times -> the first rendered frame at or after each; cuts outside the range are dropped
        frames_at = [_frame(p, reader.fps) for p in given]
        cuts = sorted({next(i for i, f in enumerate(indices) if f >= c) for c in frames_at
                       if indices[0] < c <= indices[-1]})
    if cuts is not None:
        look["scene_cuts"] = cuts
        if not args.quiet:
            where = ", ".join(f"{c} (source frame {indices[c]})" for c in cuts) or "none found"
            print(f"scene cuts at rendered frames: {where}; {len(cuts) + 1} shot(s)", file=sys.stderr)
    args.look = look


def _bar(args, total, desc):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="frame", disable=args.quiet)


def build_parser():
    # parents are built afresh per subcommand: argparse shares their Action objects, so one subcommand's
    # set_defaults would otherwise change another's defaults
    parser = _Parser(prog="diffutoon", description="Diffutoon: turn a video into anime (toon shading) with diffusion "
                     "models, keeping its frame rate, length and sound.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{render,deflicker,demo,ui}",
                                parser_class=_Parser)

    p = sub.add_parser("render", parents=[_span(), _render_folder_options(), _generation(), _look(), _direction(),
                                            _models(), _fast(), _common(), _memory_options()],
                       help="render a video in toon style",
                       description="Render a video in toon style (Diffutoon's main pass; with --edit-prompt the "
                       "editing branch runs first). Output: the source's fps, length and audio by default.")
    p.add_argument("input", type=Path, help="any video file ffmpeg can read")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("deflicker", parents=[_span(), _common()], help="smooth a video with FastBlend",
                       description="Deflicker a (stylised) video with FastBlend, optionally guided by the original "
                       "video it was rendered from (recommended).")
    p.add_argument("input", type=Path, help="the video to smooth (the style video)")
    p.add_argument("--guide", type=Path, help="the original video the style video was made from (same frames); "
                   "default: the input itself")
    p.add_argument("--mode", choices=("fast", "balanced", "accurate"), default="fast", help="default fast")
    p.add_argument("--window-size", type=_number(int, 1), default=15, help="frames each side blended (default 15)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.set_defaults(func=cmd_deflicker)

    p = sub.add_parser("demo", parents=[_span(), _render_folder_options(), _generation(), _look(), _common()],
                       help="offline end-to-end check with tiny random models",
                       description="Offline check of the whole path (file -> frames -> annotators -> sliding-window "
                       "denoising -> mp4 with sound) with tiny random-weight models. "
                       "It proves the install, not the art.")
    p.add_argument("--input", type=Path, help="a video to use instead of the generated photo clip")
    p.add_argument("--num-frames", type=_number(int, 1), default=16, help="frames of the generated clip (default 16)")
    p.add_argument("--clip-fps", type=_number(float, 0.01, 1000), default=8.0,
                   help="fps of the generated clip (default 8)")
    p.add_argument("--keep-input", action="store_true", help="keep the generated clip beside the output")
    # tiny models: small frames, few steps, and windows short enough that the clip spans several of them
    p.set_defaults(func=cmd_demo, height=64, width=64, steps=2, context_length=8, context_stride=4, dtype="float32",
                   edit_height=64, edit_width=64, edit_steps=2)

    p = sub.add_parser("ui", parents=[_models(), _common()], help="start the web app (pip install 'diffutoon[ui]')",
                       description="Serve the web app (Gradio): upload, settings, live progress, result with sound. "
                       "With no model option the real models are used if cached, else tiny random demo models.")
    g = p.add_argument_group("web app")
    g.add_argument("--host", help="address to listen on (default 127.0.0.1, or $GRADIO_SERVER_NAME)")
    g.add_argument("--port", type=_number(int, 1, 65535), help="default 7860, or $GRADIO_SERVER_PORT")
    g.add_argument("--data-dir", type=Path, help="uploads, renders, results (default ~/.cache/diffutoon/ui)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, or cuda:0,cuda:1: one render at a time each")
    g.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto")
    g.add_argument("--demo-models", action="store_true", help="the tiny random-weight models, whatever is cached")
    g.add_argument("--ip-adapter", help="IP-Adapter weights for the page's style image (as `render --ip-adapter`; "
                   "default h94/IP-Adapter when cached, else no style image)")
    g.add_argument("--max-upload-mb", type=_number(float, 0, lo_open=True), help="default 500")
    g.add_argument("--max-seconds", type=_number(float, 0, lo_open=True), help="longest upload (default 600)")
    g.add_argument("--max-frames", type=_number(int, 1), help="frames per render (default 600 GPU, 48 CPU, 120 demo)")
    g.add_argument("--keep-days", type=_number(float, 0, lo_open=True), default=7.0, help="finished jobs (default 7)")
    p.set_defaults(func=cmd_ui)
    return parser


# ---------------------------------------------------------------------------------------------- shared steps
def _open_input(args):
    """Open the input and select the frame range; reads the range's first and last frames so a truncated
    file fails here, before any model is loaded."""
    reader = vio.VideoReader(args.input)
    try:
        indices = reader.frame_indices(_frame(args.start, reader.fps), _frame(args.end, reader.fps),
                                       args.every_nth, args.max_frames)
    except vio.VideoError as e:
        raise CLIError(f"{e}; change --start/--end") from e
    reader.read([indices[0], indices[-1]])
    return reader, indices


def _output_path(args, default_name):
    out = args.output if args.output is not None else Path(default_name)
    if out.suffix and out.suffix.lower() not in vio.VIDEO_SUFFIXES:
        raise CLIError(f"cannot write {out}: use a video file ({', '.join(vio.VIDEO_SUFFIXES)}) or a folder path "
                       "without a suffix for PNG frames")
    for option, source in (("the input", getattr(args, "input", None)), ("--guide", getattr(args, "guide", None))):
        # the same file, also through a symlink or a hard link: --overwrite would replace the source with the result
        if source is not None and out.exists() and Path(source).exists() and os.path.samefile(out, source):
            raise CLIError(f"the output {out} is {option} ({source}): write the result to another path")
    return vio.check_output(out, args.overwrite)


def _write(args, out, frames, reader, indices):
    """Write the result at the source's timing, with the audio of the same span unless --no-audio."""
    fps = args.fps or reader.fps / args.every_nth
    audio = None if args.no_audio or not reader.has_audio else reader.path
    vio.write_output(out, frames, fps, audio_from=audio, audio_span=reader.span(indices, args.every_nth), overwrite=args.overwrite,
                     progress=not args.quiet, total=len(indices))
    what = f"{len(indices)} frames at {fps:g} fps ({len(indices) / fps:.2f} s)"
    if out.suffix.lower() in vio.VIDEO_SUFFIXES:  # probe the result: the span may lie past the source's audio
        what += ", with audio" if audio and vio.probe(out)["has_audio"] else ", no audio"
    print(f"wrote {out}: {what}")


def _check_sizes(args, reader):
    if args.context_stride >= args.context_length:
        raise CLIError(f"--context-stride ({args.context_stride}) must be smaller than --context-length "
                       f"({args.context_length}): the sliding windows must overlap")
    return vio.target_size(reader.height, reader.width, args.height, args.width, args.resize, args.short_side)


def _join_torchrun(args):
    """Under torchrun (WORLD_SIZE > 1) join its process group: NCCL on this process's GPU (LOCAL_RANK), gloo on CPU,
    timeout DIFFUTOON_DIST_TIMEOUT seconds (default 1800). The pipeline then splits the render over the processes,
    bit-identical to one; ranks other than 0 render their share quietly. Returns this process's rank."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return 0
    import atexit
    import datetime

    import torch
    import torch.distributed as dist

    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    if cuda:
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(args.device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("DIFFUTOON_DIST_TIMEOUT", 1800)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout,
                                device_id=torch.device(args.device) if cuda else None)
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    if dist.get_rank():
        args.quiet = True  # one progress display and one "wrote" line: rank 0's
    return dist.get_rank()


def _run_pipeline(args, pipe, clip, detector, edit_extra=None, **extra):
    """Map the options onto the pipeline's arguments and call it on `clip` (a `vio.VideoClip`, or uint8 frames);
    `extra` adds pipeline arguments (the render folder, the output path)."""
    kwargs = _pipeline_kwargs(args, pipe, clip, detector, edit_extra, **extra)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=args.quiet)
    return pipe(**kwargs)


def _pipeline_kwargs(args, pipe, clip, detector, edit_extra=None, **extra):
    """The pipeline's arguments for these options on `clip` (also the web app's mapping)."""
    import torch

    style = _import_style()
    reader = getattr(clip, "reader", None)  # a VideoClip: --prompt-at positions are its source's frames
    prompt = _prompt_schedule(args, getattr(clip, "indices", range(len(clip))), reader.fps if reader else None)
    kwargs = dict(video=clip, prompt=prompt, negative_prompt=args.negative_prompt,
                  height=clip.shape[1], width=clip.shape[2], num_inference_steps=args.steps,
                  guidance_scale=args.guidance_scale, context_length=args.context_length,
                  context_stride=args.context_stride,
                  controlnet_conditioning_scale=[args.lineart_scale, args.tile_scale],
                  clip_skip=args.clip_skip, strength=args.strength,
                  generator=torch.Generator("cpu").manual_seed(args.seed), output_type="pil",  # uint8 frames
                  decode_chunk_size=args.decode_chunk_size, lineart_detector=detector, **style.style_arguments(args),
                  **extra)
    if getattr(args, "long_prompt", "chunks") != "chunks":
        kwargs["long_prompt"] = args.long_prompt
    kwargs.update(getattr(args, "look", None) or {})  # --keyframe, --scene-cuts
    if args.edit_prompt:  # SPEC 2's editing branch, its own size / steps / strength
        kwargs["edit_prompt"] = args.edit_prompt
        kwargs["edit_kwargs"] = dict(height=args.edit_height, width=args.edit_width, num_inference_steps=args.edit_steps,
                                     strength=args.edit_strength, **(edit_extra or {}))
    for key, value in _memory_kwargs(args).items():
        kwargs.setdefault(key, value)
    if getattr(args, "fast", None) or getattr(args, "preview", None) or getattr(args, "preview_vae", None):
        from . import fast_cli

        kwargs.update(fast_cli.cli_arguments(args, pipe))  # fast_mode, preview, preview_vae
    return kwargs


def _torchrun_rank() -> int:
    """This process's rank in a torchrun process group, 0 without one."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _work_dir(args, out):
    """The render folder: --work-dir, or <output>.parts beside the output; None with --in-memory."""
    if args.in_memory:
        return None
    return args.work_dir if args.work_dir is not None else out.with_name(out.name + ".parts")


def _render(args, reader, indices, out, pipe, detector, edit_extra=None):
    """Render the selected frames straight from the file into `out`, through the render folder (resumable)."""
    height, width = _check_sizes(args, reader)
    clip = vio.VideoClip(reader, indices, height, width, args.resize, audio=not args.no_audio)
    fps = args.fps or clip.fps
    work_dir = _work_dir(args, out)
    t = time.time()
    try:
        result = _run_pipeline(args, pipe, clip, detector, edit_extra, render_dir=work_dir, fresh=args.fresh,
                               keep_render_dir=args.keep_work_dir, output_path=out, fps=fps, overwrite=args.overwrite)
    except (KeyboardInterrupt, Exception) as error:
        from .render_folder import RenderFolderError, is_render_folder

        if work_dir is None or not is_render_folder(work_dir) or isinstance(error, RenderFolderError):
            raise  # the folder's own errors say whether a rerun resumes (a full disk) or repeats them (a held lock)
        kept = f"the render folder {work_dir} keeps the progress: run the same command again to resume"
        if isinstance(error, KeyboardInterrupt):
            raise KeyboardInterrupt(kept) from error
        raise CLIError(f"{_one_line(error)}; {kept} (--fresh starts over)") from error
    if _torchrun_rank():  # torchrun: rank 0 writes the output and speaks
        return
    if not args.quiet:
        print(f"rendered {len(indices)} frames of {width}x{height} in {time.time() - t:.1f} s", file=sys.stderr)
    what = f"{len(indices)} frames at {fps:g} fps ({len(indices) / fps:.2f} s)"
    if out.suffix.lower() in vio.VIDEO_SUFFIXES:  # probe the result: the span may lie past the source's audio
        what += ", with audio" if not args.no_audio and vio.probe(out)["has_audio"] else ", no audio"
    print(f"wrote {result.path}: {what}")
    if getattr(result, "report", None):
        from .report import summary

        print(summary(result.report))


# ---------------------------------------------------------------------------------------------- commands
def cmd_render(args):
    _join_torchrun(args)  # torchrun --nproc-per-node=K: K processes split this render; rank 0 writes the output
    reader, indices = _open_input(args)
    out = _output_path(args, f"{args.input.stem}-diffutoon.mp4")
    vio.check_room(out, vio.output_bytes(out, len(indices), *_check_sizes(args, reader)))  # before the work
    _prompt_schedule(args, indices, reader.fps)  # a --prompt-at outside the frames fails before any model loads
    from . import fast_cli

    fast_cli.check_cli(args, out, _import_pipeline().DiffutoonDDIMScheduler())  # --fast, --preview, before the work
    if args.edit_prompt:
        params = inspect.signature(_import_pipeline().DiffutoonPipeline.__call__).parameters
        if "edit_prompt" not in params:
            raise CLIError("--edit-prompt needs the editing branch, which this version of the pipeline lacks")
    device, dtype = _torch_setup(args)
    _check_sources(_model_sources(args)[0])
    _check_model_limits(args)
    _resolve_look(args, reader, indices, *_check_sizes(args, reader))  # reads the frames with --scene-cuts auto
    if not args.quiet:
        print(f"loading models on {device} ({str(dtype).replace('torch.', '')})...", file=sys.stderr)
    pipe, detector = _load_pipeline(args, device, dtype)
    _render(args, reader, indices, out, pipe, detector)
    return 0


def cmd_deflicker(args):
    style, indices = _open_input(args)
    out = _output_path(args, f"{args.input.stem}-deflickered.mp4")
    args.device = _check_device(args.device)
    vio.check_room(out, vio.output_bytes(out, len(indices), style.height, style.width))
    guide, guide_indices = (style, indices)
    if args.guide is not None:
        if not args.guide.exists():
            raise CLIError(f"guide video not found: {args.guide} (--guide)")
        guide = vio.VideoReader(args.guide)
        guide_indices = [i for i in indices if i < guide.num_frames]
        if len(guide_indices) != len(indices):
            raise CLIError(f"the guide {args.guide} has {guide.num_frames} frames, fewer than the selected range "
                           f"of {args.input} needs ({indices[-1] + 1}); pass matching videos or a shorter --end")
    try:
        from fastblend import smooth_video
    except ImportError as e:
        raise CLIError(f"FastBlend is not available ({e}); reinstall diffutoon") from e
    frames = vio.read_frames(style, indices, progress=not args.quiet)
    guides = frames if guide is style else vio.read_frames(guide, guide_indices, style.height, style.width,
                                                            "crop", progress=not args.quiet)
    smoothed = smooth_video(frames, guides, mode=args.mode, window_size=args.window_size, device=args.device,
                            progress=not args.quiet)
    _write(args, out, smoothed, style, indices)
    return 0


def cmd_demo(args):
    print(DEMO_DISCLAIMER)
    out = _output_path(args, "diffutoon-demo.mp4")
    with tempfile.TemporaryDirectory() as tmp:
        if args.input is None:
            size = max(args.height, args.width)
            clip = (out.with_name(out.stem + "-input.mp4") if args.keep_input else Path(tmp) / "demo-input.mp4")
            args.input = vio.make_demo_clip(clip, args.num_frames, size, size, args.clip_fps, overwrite=True)
            print(f"input: {args.input} ({args.num_frames} frames of a photograph with camera motion, a 440 Hz tone)")
        reader, indices = _open_input(args)
        vio.check_room(out, vio.output_bytes(out, len(indices), *_check_sizes(args, reader)))
        _resolve_look(args, reader, indices, *_check_sizes(args, reader))
        _import_pipeline()  # puts a source checkout's pipeline_diffutoon.py on the path for .tiny
        from . import tiny

        device, dtype = _torch_setup(args)
        pipe = tiny.build_tiny_pipeline(seed=args.seed, edit=bool(args.edit_prompt)).to(device)  # built in float32
        pipe = pipe if str(dtype) == "torch.float32" else pipe.to(dtype=dtype)
        # the editing branch's annotators need Hub weights too: tiny random ones instead
        edit_extra = {"detectors": {"softedge": tiny.tiny_softedge_detector(), "depth": tiny.tiny_depth_detector}}
        edit_extra = edit_extra if args.edit_prompt else None
        _render(args, reader, indices, out, pipe, tiny.tiny_lineart_detector(), edit_extra)
    print(DEMO_FOOTER)
    return 0


def cmd_ui(args):
    # the web app (diffutoon.webapp) sits above this module (it renders with these options and checks), so it is not
    # imported here: the `diffutoon` command (diffutoon/__main__.py) hands its `serve` in
    if getattr(args, "serve_ui", None) is None:
        raise CLIError("the web app starts from the `diffutoon` command: diffutoon ui (or python -m diffutoon ui)")
    return args.serve_ui(args)


# ---------------------------------------------------------------------------------------------- entry point
def _one_line(e):
    text = _cli_words(" ".join(str(e).split())) or type(e).__name__
    return text if _plain(e) else f"{type(e).__name__}: {text}"  # no module path: the class name says enough


def _plain(e):
    """Errors whose message is written for the user as it is."""
    return isinstance(e, (CLIError, vio.VideoError, FileExistsError)) or type(e).__name__ == "RenderFolderError"


# the render folder's and the pipeline's words for what the user set with these options
_CLI_NAMES = {"fresh=True (--fresh)": "--fresh", "fresh=True": "--fresh", "--overwrite (overwrite=True)": "--overwrite",
              "overwrite=True": "--overwrite", "settings.generator": "--seed", "settings.prompt": "--prompt",
              "settings.negative_prompt": "--negative-prompt", "settings.num_inference_steps": "--steps",
              "settings.guidance_scale": "--guidance-scale", "settings.context_length": "--context-length",
              "settings.context_stride": "--context-stride", "settings.clip_skip": "--clip-skip",
              "settings.controlnet_conditioning_scale": "--lineart-scale/--tile-scale",
              "settings.strength": "--strength", "settings.lineart_detector": "--annotators",
              "settings.edit_prompt": "--edit-prompt", "settings.edit.height": "--edit-height",
              "settings.edit.width": "--edit-width", "settings.edit.num_inference_steps": "--edit-steps",
              "settings.edit.strength": "--edit-strength", "settings.height": "--height", "settings.width": "--width",
              "input.indices": "the frame range (--start/--end/--every-nth/--max-frames)",
              "input.size": "the frame size (--height/--width/--resize)", "input.policy": "--resize",
              "input.sha256": "the input file's content", "input.bytes": "the input file's size",
              "input.shape": "the frames (--start/--end/--height/--width)", "input.fps": "the input's frame rate",
              "settings.fast_mode": "--fast", "settings.scene_cuts": "--scene-cuts", "settings.edit.scene_cuts":
              "--scene-cuts", "settings.keyframes": "--keyframe", "settings.long_prompt": "--long-prompt",
              "settings.style.image": "--style-image", "settings.style.scales": "--style-scale"}
_CLI_WORDS = re.compile("|".join(re.escape(k) for k in sorted(_CLI_NAMES, key=len, reverse=True)) + r"(?![\w.])")


def _cli_words(text):
    return _CLI_WORDS.sub(lambda m: _CLI_NAMES[m[0]], text)


@contextlib.contextmanager
def _quiet_libraries(quiet):
    """-q: no loading bars or warnings from diffusers, transformers and huggingface_hub (the embedding-resize warning
    of a textual inversion included); restored afterwards, for callers of main() in the same process."""
    if not quiet:
        yield
        return
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    hub_bars = not hub_utils.are_progress_bars_disabled()
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()
        if hub_bars:
            hub_utils.enable_progress_bars()


def main(argv=None, serve_ui=None):
    """Run the `diffutoon` command; returns the exit status (0 ok, 2 error, 130 interrupted). serve_ui: what runs
    `diffutoon ui` (diffutoon.webapp.page.serve, handed in by diffutoon/__main__.py)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad option (already reported in one line)
        return e.code if isinstance(e.code, int) else 2
    args.serve_ui = serve_ui
    if not args.debug:  # dependencies' deprecation chatter (timm, controlnet-aux, hub) drowns the real output
        warnings.simplefilter("ignore")
        import logging

        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # per-retry network warnings
    try:
        with _quiet_libraries(args.quiet):
            return args.func(args) or 0
    except KeyboardInterrupt as e:
        kept = f"; {e.args[0]}" if e.args else ""  # where the progress is, when a render folder holds it
        print(f"diffutoon: interrupted; nothing was written to the output path{kept}", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        hint = "" if _plain(e) else " (rerun with --debug for details)"
        print(f"diffutoon {args.command}: error: {_one_line(e)}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
