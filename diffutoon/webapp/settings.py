"""What the page asks for and what it allows: the settings (in the page's units) and how they become the options of
`diffutoon render` (parsed by the CLI's own parser, so the checks and messages are the CLI's), the limits of this app,
the page's defaults, and the one-line messages in the page's words."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import asdict, dataclass, field
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
    "--seed": "Seed", "--lora": "LoRA", "--textual-inversion": "Textual inversion", "--fast": "Fast draft",
    "--max-vram": "Max GPU memory", "--prompt-at": "Prompts at times", "--scene-cuts": "Scene cuts",
    "--keyframe": "Keyframe", "--style-image": "Style image", "--style-scale": "Style strength",
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


# the control a message is about, from the page's words in it (the first named, longer names first): its elem_id
_FIELD_WORDS = {"Every n-th frame": "dt-every-nth", "Start/End": "dt-start", "Start": "dt-start", "End": "dt-end",
                "Width/Height": "dt-width", "Width": "dt-width", "Height": "dt-height", "Window stride": "dt-context-stride",
                "Window length": "dt-context-length", "Steps": "dt-steps", "Editing prompt": "dt-edit-prompt",
                "Prompts at times": "dt-prompt-at", "Scene cuts": "dt-scene-cuts", "Max GPU memory": "dt-max-vram",
                "Fast draft": "dt-fast", "Keyframe": "dt-keyframe-1", "Style image": "dt-style-image",
                "LoRA": "dt-loras", "Textual inversion": "dt-embeddings", "Guidance": "dt-guidance-scale",
                "Seed": "dt-seed", "Negative prompt": "dt-negative-prompt", "Prompt": "dt-prompt"}
_FIELD_RE = re.compile("|".join(rf"\b{re.escape(w)}\b" for w in sorted(_FIELD_WORDS, key=len, reverse=True)))


def field_of(message):
    """The elem_id of the control a one-line message is about (None: the message is about no one control).

    >>> field_of("empty frame range: start=9, end=8; change Start/End")
    'dt-start'
    """
    m = _FIELD_RE.search(message or "")
    return _FIELD_WORDS[m[0]] if m else None


def one_line(e, paths=None):
    """The line `diffutoon render` prints after "error: " for this exception, in the page's words."""
    return page_message(cli._one_line(e), paths)


def _duration(seconds):
    """A length as people write it: "2.5 s", "4 min 05 s", "1 h 20 min" (limits are shown as configured)."""
    if seconds < 60:
        return f"{max(0.0, round(seconds, 1)):g} s"
    seconds = int(round(seconds))
    if seconds < 3600:
        return f"{seconds // 60} min" + (f" {seconds % 60:02d} s" if seconds % 60 else "")
    return f"{seconds // 3600} h" + (f" {seconds % 3600 // 60:02d} min" if seconds % 3600 // 60 else "")


def _megabytes(n):
    """A file size in MB, the unit of the upload limit, with the digits that tell two sizes apart."""
    return f"{n / 2**20:.3g} MB" if n < 100 * 2**20 else f"{n / 2**20:.0f} MB"


def safe_name(name, default="video.mp4"):
    """A file name without folders or odd characters (uploads keep their name inside their job folder)."""
    name = Path(str(name)).name
    name = re.sub(r"[^\w .()+-]+", "_", name).strip(" ._") or default
    return name[-120:]


# ---------------------------------------------------------------------------------------------- the form
@dataclass(frozen=True)
class Field:
    """One control of the page's form: the Settings attribute it sets, its label and its range. The page makes its
    controls from FIELDS, reads them back in this order (`settings_from_form`), shows a job's settings in them
    (`form_values`), and the messages name the label. A new control: a Field here, a Settings attribute, and its
    option in Settings.argv (or a pipeline argument in loading.pipeline_kwargs)."""

    name: str
    label: str
    kind: str  # number | int | slider | text | radio
    group: str  # part | prompt | edit | size | style | look: the page's section
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    info: str = ""
    choices: tuple = ()  # radio: (label, value) pairs
    placeholder: str = ""
    lines: int = 1

    @property
    def elem_id(self):
        return "dt-" + self.name.replace("_", "-")


FIELDS = (
    Field("start", "Start (seconds)", "number", "part", 0),
    Field("end", "End (seconds; 0 = the end)", "number", "part", 0),
    Field("every_nth", "Every n-th frame", "int", "part", 1,
          info="2 keeps every other frame: half the work, half the frame rate, the same length"),
    Field("prompt", "Prompt", "text", "prompt", info="What the anime version should look like", lines=2),
    Field("negative_prompt", "Negative prompt", "text", "prompt",
          info="What to avoid. verybadimagenegative_v1.3 is the paper's (a textual inversion, loaded with the real "
               "models)"),
    Field("edit_prompt", "Editing prompt", "text", "edit", placeholder="orange dress, night, blue sky",
          info="Runs the editing branch first: a colour video made with this prompt guides the colours. Slower. "
               "Leave empty to keep the video's colours."),
    Field("edit_steps", "Editing steps", "slider", "edit", 1, 50, 1),
    Field("width", "Width", "slider", "size", 64, 2048, 8),
    Field("height", "Height", "slider", "size", 64, 2048, 8),
    Field("shape", "Shape", "radio", "size", choices=(
        ("Crop to fill (the paper)", "crop"), ("Fit with black bars", "pad"),
        ("Keep the video's shape (short side = the smaller of width and height)", "short_side"))),
    Field("steps", "Steps", "slider", "size", 1, 50, 1, info="More: finer, slower (the paper: 10)"),
    Field("guidance_scale", "Guidance", "slider", "size", 0, 20, 0.5, info="How strongly to follow the prompt"),
    Field("context_length", "Window length", "slider", "size", 2, 32, 1, info="Frames drawn together (the paper: 16)"),
    Field("context_stride", "Window stride", "slider", "size", 1, 31, 1,
          info="Shift between windows; smaller than the length"),
    Field("lineart_scale", "Lineart strength", "slider", "size", 0, 2, 0.05, info="How closely the outlines are kept"),
    Field("tile_scale", "Colour strength", "slider", "size", 0, 2, 0.05, info="How closely the colours are kept"),
    Field("seed", "Seed", "int", "size", info="Same seed and settings: same result"),
    Field("lora_scale", "LoRA strength", "slider", "style", 0, 2, 0.05),
    # issues 17-19: the choices of Fast draft depend on the app's motion adapter (page.py)
    Field("fast", "Fast draft", "radio", "size",
          info="A few-step draft with the app's distilled motion adapter; it sets Steps and Guidance itself"),
    Field("max_vram", "Max GPU memory", "text", "size", placeholder="e.g. 12GB",
          info="Memory the render may use, weights included; empty: the free memory. The plan is shown while it runs"),
    Field("scene_cuts", "Scene cuts", "text", "part", placeholder="auto",
          info="auto: found in the video; none; or the times where new shots start (2.5s, 7s). Each shot is "
               "rendered on its own"),
    Field("prompt_at", "Prompts at times", "text", "look", lines=3, placeholder="2.5s=a girl dancing, night",
          info="Optional, one per line: TIME=PROMPT (seconds of your video, 2.5s; or a frame number). The prompt "
               "changes smoothly from the one before; Prompt is the one at the start"),
    Field("style_scale", "Style strength", "slider", "look", 0, 2, 0.05),
)


def settings_from_form(values, base):
    """The form's values (in FIELDS order) -> Settings, on top of `base` (the page's defaults: what the form does
    not show). A value out of its field's range: UIError naming the field's label, the app's own one-line message."""
    values = dict(zip((f.name for f in FIELDS), values))
    for f in FIELDS:
        value = values[f.name]
        if f.kind in ("number", "int", "slider"):
            if value is None or value == "":
                value = 0 if f.name in ("start", "end") else getattr(base, f.name)
            if f.kind == "int" and float(value) != int(float(value)):
                raise UIError(f"{f.label}: must be a whole number, got {value:g}")
            value = int(float(value)) if f.kind == "int" or float(value).is_integer() and f.step in (1, 8) else value
            if f.minimum is not None and value < f.minimum:
                raise UIError(f"{f.label}: must be at least {f.minimum:g}, got {value:g}")
            if f.maximum is not None and value > f.maximum:
                raise UIError(f"{f.label}: must be at most {f.maximum:g}, got {value:g}")
        elif value is None:
            value = ""
        values[f.name] = value
    values["end"] = values["end"] or None
    return Settings(**{**asdict(base), **values})


def form_values(settings):
    """What the form shows for these settings (FIELDS order): a job's settings restored after a reload."""
    return [(getattr(settings, f.name) or 0) if f.name == "end" else getattr(settings, f.name) for f in FIELDS]


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
    decode_chunk_size: int = 8  # frames per VAE decode: 1 on a CPU, so that progress and Cancel act per frame
    fast: str = ""  # --fast: "" (not asked), "auto" (the adapter's preset), "off", or a preset
    max_vram: str = ""  # --max-vram
    scene_cuts: str = "auto"  # --scene-cuts
    prompt_at: str = ""  # --prompt-at, one POSITION=PROMPT a line
    style_scale: float = 0.6  # --style-scale
    keyframes: list = field(default_factory=list)  # [[seconds, file name in the job's keyframes/]]: --keyframe
    style_image: str = ""  # file name in the job's style/: --style-image

    def argv(self, input_path, folder=None):
        """The `diffutoon render` command line these settings stand for (options as --name=value, so that a
        prompt starting with "-" stays a prompt); `folder` holds the keyframes/ and style/ files (default: the
        input's folder, the job's)."""
        folder = Path(folder if folder is not None else Path(input_path).parent)
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
                 f"--short-side={num(min(self.width, self.height))}"]
        if not self.fast or self.fast == "off":  # a Fast draft preset sets the steps and guidance itself
            argv += [f"--steps={num(self.steps)}", f"--guidance-scale={num(self.guidance_scale)}"]
        argv += [f"--context-length={num(self.context_length)}",
                 f"--context-stride={num(self.context_stride)}", f"--lineart-scale={num(self.lineart_scale)}",
                 f"--tile-scale={num(self.tile_scale)}", f"--seed={num(self.seed)}",
                 f"--decode-chunk-size={num(self.decode_chunk_size)}", f"--scene-cuts={self.scene_cuts or 'auto'}"]
        argv += [f"--fast={self.fast}"] if self.fast else []
        argv += [f"--max-vram={self.max_vram.strip()}"] if (self.max_vram or "").strip() else []
        argv += [f"--prompt-at={line.strip()}" for line in (self.prompt_at or "").splitlines() if line.strip()]
        argv += [f"--keyframe={num(t)}s={folder / 'keyframes' / name}" for t, name in self.keyframes or []]
        if self.style_image:
            argv += [f"--style-image={folder / 'style' / self.style_image}", f"--style-scale={num(self.style_scale)}"]
        return argv

    def summary(self):
        """The main settings in a few words ("Your renders")."""
        part = f"{self.start:g}\u2013{self.end:g} s" if self.end else (f"from {self.start:g} s" if self.start else "whole")
        nth = f", every {self.every_nth}th frame" if self.every_nth > 1 else ""
        edit = f", edit \u201c{self.edit_prompt}\u201d" if (self.edit_prompt or "").strip() else ""
        fast = f", fast draft ({self.fast})" if self.fast and self.fast != "off" else ""
        look = "".join([f", {len(self.keyframes)} keyframe(s)" if self.keyframes else "",
                        ", style image" if self.style_image else "",
                        ", prompts at times" if (self.prompt_at or "").strip() else ""])
        return (f"{self.width}x{self.height} {self.shape}, {self.steps} steps, seed {self.seed}, {part}{nth}{edit}"
                f"{fast}{look}")


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
    warn_seconds: float = 1800  # a render estimated longer than this asks to be confirmed (Render again)

    def check_size(self, path, name):
        size = os.path.getsize(path)
        if size > self.max_upload_mb * 2**20:
            raise UIError(f"{name} is {_megabytes(size)}; this app takes videos up to {self.max_upload_mb:g} MB: "
                          "shorten or compress it first")

    def check_length(self, reader, name):
        if reader.duration > self.max_seconds:
            raise UIError(f"{name} is {_duration(reader.duration)} long; this app takes videos up to "
                          f"{_duration(self.max_seconds)}: cut it shorter first")

    def check_every_nth(self, selected, every_nth, fps):
        """Every n-th frame keeps the length (each kept frame lasts n source frames) unless n is large against the part:
        the result would be much longer than the part, so refuse."""
        if every_nth <= 1 or not selected:
            return
        kept = -(-selected // every_nth)
        if kept * every_nth > 1.25 * selected:
            fit = max(1, selected // 2)
            raise UIError(f"Every n-th frame: {every_nth} keeps {kept} of the {selected} selected frames, and the result "
                          f"would last {_duration(kept * every_nth / fps)} instead of {_duration(selected / fps)}: "
                          f"use {fit} or less, or select a longer part")

    def check_frames(self, n):
        if n > self.max_frames:
            raise UIError(f"the selected part has {n} frames; this app renders at most {self.max_frames} frames at a "
                          "time: choose a shorter part with Start and End, or keep every n-th frame")


def page_defaults(kind, accelerator):
    """Settings the page starts with: tiny sizes for the demo models, small ones on a CPU, the paper's on a GPU."""
    if kind == "demo":
        return Settings(width=64, height=64, steps=2, context_length=8, context_stride=4, edit_size=64, edit_steps=2,
                        negative_prompt="", decode_chunk_size=8 if accelerator else 1)
    if accelerator:  # SPEC: 1536x1536, 10 steps, windows 16/8; editing branch 512x512, 20 steps
        return Settings(width=1536, height=1536, steps=10, edit_size=512, edit_steps=20,
                        negative_prompt=models.DEFAULT_NEGATIVE_TOKEN)
    return Settings(width=384, height=384, steps=6, edit_size=384, edit_steps=10,
                    negative_prompt=models.DEFAULT_NEGATIVE_TOKEN, decode_chunk_size=1)


def default_limits(kind, accelerator, args=None):
    frames = 120 if kind == "demo" else 600 if accelerator else 48
    limits = Limits(max_frames=frames)
    for name in ("max_upload_mb", "max_seconds", "max_frames"):
        if args is not None and getattr(args, name, None) is not None:
            setattr(limits, name, getattr(args, name))
    return limits
