"""What the page asks for and what it allows: the settings (in the page's units) and how they become the options of
`diffutoon render` (parsed by the CLI's own parser, so the checks and messages are the CLI's), the limits of this app,
the page's defaults, and the one-line messages in the page's words."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .. import cli
from .. import models
from .. import video as vio

# the options of `diffutoon render` as the page names them: messages shown in the page use the page's words
PAGE_LABELS = {
    "--start": "Start", "--end": "End", "--every-nth": "Every n-th frame", "--max-frames": "Max frames",
    "--prompt": "Prompt", "--negative-prompt": "Negative prompt", "--edit-prompt": "Editing prompt",
    "--edit-steps": "Editing steps", "--edit-height": "Editing size", "--edit-width": "Editing size",
    "--height": "Height", "--width": "Width", "--resize": "Shape", "--short-side": "Width/Height",
    "--steps": "Steps", "--guidance-scale": "Guidance", "--context-length": "Window length",
    "--context-stride": "Window stride", "--lineart-scale": "Lineart strength", "--tile-scale": "Colour strength",
    "--seed": "Seed", "--lora": "LoRA", "--textual-inversion": "Textual inversion",
}


class UIError(Exception):
    """A problem with the user's input or settings; the message is one line, shown in the page as is."""


# ---------------------------------------------------------------------------------------------- messages
def page_message(text, paths=None):
    """A CLI message in the page's words: option names become the page's labels, server paths the file's name.

    >>> page_message("argument --context-stride: must be >= 1, got 0")
    'Window stride: must be >= 1, got 0'
    >>> page_message("empty frame range: start=9, end=8; change --start/--end")
    'empty frame range: start=9, end=8; change Start/End'
    """
    text = " ".join(str(text).split())
    text = re.sub(r"argument (--[\w-]+)(?:/-\w)?:", lambda m: PAGE_LABELS.get(m[1], m[1]) + ":", text)
    text = re.sub(r"(?:-o/)?--[a-z][\w-]*", lambda m: PAGE_LABELS.get(m[0], m[0]), text)
    for path, name in (paths or {}).items():
        text = text.replace(str(path), name)
    return text


def one_line(e, paths=None):
    """The line `diffutoon render` prints after "error: " for this exception, in the page's words."""
    return page_message(cli._one_line(e), paths)


def _duration(seconds):
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min" + (f" {seconds % 60:02d} s" if seconds % 60 else "")
    return f"{seconds // 3600} h" + (f" {seconds % 3600 // 60:02d} min" if seconds % 3600 // 60 else "")


def _megabytes(n):
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n / 2**10:.0f} kB"


def safe_name(name, default="video.mp4"):
    """A file name without folders or odd characters (uploads keep their name inside their job folder)."""
    name = Path(str(name)).name
    name = re.sub(r"[^\w .()+-]+", "_", name).strip(" ._") or default
    return name[-120:]


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    """Everything the page asks for, in the page's units (seconds for the part of the video)."""

    start: float = 0.0
    end: float | None = None  # None or 0: to the end
    every_nth: int = 1
    prompt: str = models.DEFAULT_PROMPT
    negative_prompt: str = ""
    edit_prompt: str = ""
    edit_steps: int = 20
    edit_size: int = 512
    width: int = 512
    height: int = 512
    shape: str = "crop"  # crop | pad | short_side (short side = min(width, height))
    steps: int = 10
    guidance_scale: float = 7.0
    context_length: int = 16
    context_stride: int = 8
    lineart_scale: float = 0.5
    tile_scale: float = 0.5
    seed: int = 0
    lora_scale: float = 1.0

    def argv(self, input_path):
        """The `diffutoon render` command line these settings stand for (options as --name=value, so that a
        prompt starting with "-" stays a prompt)."""
        def num(x):
            if isinstance(x, float) and x.is_integer():
                x = int(x)
            return repr(x) if isinstance(x, float) else str(x)

        argv = ["render", str(input_path), f"--start={num(self.start or 0)}s", f"--every-nth={num(self.every_nth)}"]
        if self.end:
            argv.append(f"--end={num(self.end)}s")
        argv += [f"--prompt={self.prompt}", f"--negative-prompt={self.negative_prompt}"]
        if (self.edit_prompt or "").strip():
            argv += [f"--edit-prompt={self.edit_prompt.strip()}", f"--edit-steps={num(self.edit_steps)}",
                     f"--edit-height={num(self.edit_size)}", f"--edit-width={num(self.edit_size)}"]
        argv += [f"--height={num(self.height)}", f"--width={num(self.width)}", f"--resize={self.shape}",
                 f"--short-side={num(min(self.width, self.height))}", f"--steps={num(self.steps)}",
                 f"--guidance-scale={num(self.guidance_scale)}", f"--context-length={num(self.context_length)}",
                 f"--context-stride={num(self.context_stride)}", f"--lineart-scale={num(self.lineart_scale)}",
                 f"--tile-scale={num(self.tile_scale)}", f"--seed={num(self.seed)}"]
        return argv


def parse_render_args(argv):
    """argv -> the Namespace `diffutoon render` would use, through the CLI's own parser and option types; a bad
    value raises UIError with the CLI's message in the page's words."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))

    def error(message):
        raise UIError(page_message(message))

    for p in (parser, *sub.choices.values()):
        p.error = error
    return parser.parse_args(argv)


def open_input(args, name):
    """cli._open_input (frame range, first and last frames decoded), its errors in the page's words."""
    try:
        return cli._open_input(args)
    except (cli.CLIError, vio.VideoError, OSError) as e:
        raise UIError(one_line(e, {args.input: name})) from e


# ---------------------------------------------------------------------------------------------- limits, defaults
@dataclass
class Limits:
    max_upload_mb: float = 500
    max_seconds: float = 600
    max_frames: int = 600

    def check_size(self, path, name):
        size = os.path.getsize(path)
        if size > self.max_upload_mb * 2**20:
            raise UIError(f"{name} is {_megabytes(size)}; this app takes videos up to {self.max_upload_mb:g} MB: "
                          "shorten or compress it first")

    def check_length(self, reader, name):
        if reader.duration > self.max_seconds:
            raise UIError(f"{name} is {_duration(reader.duration)} long; this app takes videos up to "
                          f"{_duration(self.max_seconds)}: cut it shorter first")

    def check_frames(self, n):
        if n > self.max_frames:
            raise UIError(f"the selected part has {n} frames; this app renders at most {self.max_frames} frames at a "
                          "time: choose a shorter part with Start and End, or keep every n-th frame")


def page_defaults(kind, accelerator):
    """Settings the page starts with: tiny sizes for the demo models, small ones on a CPU, the paper's on a GPU."""
    if kind == "demo":
        return Settings(width=64, height=64, steps=2, context_length=8, context_stride=4, edit_size=64, edit_steps=2,
                        negative_prompt="")
    if accelerator:  # SPEC: 1536x1536, 10 steps, windows 16/8; editing branch 512x512, 20 steps
        return Settings(width=1536, height=1536, steps=10, edit_size=512, edit_steps=20,
                        negative_prompt=models.DEFAULT_NEGATIVE_TOKEN)
    return Settings(width=384, height=384, steps=6, edit_size=384, edit_steps=10,
                    negative_prompt=models.DEFAULT_NEGATIVE_TOKEN)


def default_limits(kind, accelerator, args=None):
    frames = 120 if kind == "demo" else 600 if accelerator else 48
    limits = Limits(max_frames=frames)
    for name in ("max_upload_mb", "max_seconds", "max_frames"):
        if args is not None and getattr(args, name, None) is not None:
            setattr(limits, name, getattr(args, name))
    return limits
