"""Assemble a Hub-ready Diffutoon folder: a saved pipeline's components, the pipeline code as `pipeline.py`, the
model card as `README.md`, and a `model_index.json` whose `_class_name` is `["pipeline", "DiffutoonPipeline"]`.

diffusers (0.42, `_resolve_custom_pipeline_and_cls`) reads a list `_class_name` as [module file, class] and loads
that class from `<folder>/pipeline.py`, so `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`
builds a `DiffutoonPipeline`, from a local folder (offline too) or from the Hub.

Usage:
    pipe.save_pretrained("saved")  # a DiffutoonPipeline with its real weights
    python model_card/assemble.py saved hub-folder --base-model <the SD1.5 checkpoint's Hub id>
    hf upload <user>/<repo> hub-folder

or from Python: `from model_card.assemble import assemble; assemble("hub-folder", pipe_or_saved_folder)`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

CARD = Path(__file__).with_name("README.md")
PIPELINE_CLASS = "DiffutoonPipeline"
CLASS_NAME = ["pipeline", PIPELINE_CLASS]  # <folder>/pipeline.py, class DiffutoonPipeline
IGNORE = shutil.ignore_patterns(".git", ".cache", "__pycache__", "*.lock")  # VCS and huggingface_hub local state


def pipeline_source() -> Path:
    """`pipeline_diffutoon.py` of this checkout, else the installed module (found without importing torch)."""
    sibling = Path(__file__).resolve().parent.parent / "pipeline_diffutoon.py"
    if sibling.is_file():
        return sibling
    spec = importlib.util.find_spec("pipeline_diffutoon")
    if spec is None or not spec.origin:
        raise FileNotFoundError("pipeline_diffutoon.py not found: pass pipeline_file=... or install the project.")
    return Path(spec.origin)


def card_text(base_model: list[str] | tuple[str, ...] = ()) -> str:
    """The model card; `base_model` ids (e.g. the SD1.5 checkpoint you bundle) are added to its metadata."""
    text = CARD.read_text(encoding="utf-8")
    if base_model:
        extra = "".join(f"- {model_id}\n" for model_id in base_model)
        text = text.replace("base_model:\n", "base_model:\n" + extra, 1)
    return text


def _check_source(folder: Path) -> dict:
    """The saved pipeline's model_index.json, after checking it is a Diffutoon pipeline with all its folders."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{folder} has no model_index.json: pass a folder written by `pipe.save_pretrained(...)`.")
    index = json.loads(index_file.read_text(encoding="utf-8"))
    name = index.get("_class_name")
    if (name[-1] if isinstance(name, list) else name) != PIPELINE_CLASS:
        raise ValueError(f"{folder} holds a {name!r}, not a {PIPELINE_CLASS}: save a DiffutoonPipeline first.")
    for key, value in index.items():
        if not key.startswith("_") and isinstance(value, list) and value[0] is not None and not (folder / key).is_dir():
            raise ValueError(f"{folder} lacks the folder of component {key!r} ({value[1]}): the save is incomplete.")
    return index


def _sibling(out: Path, kind: str) -> Path:
    """A new hidden folder beside `out` (mode from the umask, unlike tempfile's 0700)."""
    path = out.parent / f".{out.name}.{kind}-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    return path


def assemble(out_dir, components_dir_or_pipeline, overwrite: bool = False, base_model=(), pipeline_file=None) -> Path:
    """Write a Hub-ready folder at `out_dir` and return its path.

    Args:
        out_dir: the folder to create. It is written under a temporary name beside it and renamed at the end, so
            `out_dir` never holds a half-written repository.
        components_dir_or_pipeline: a folder saved by `DiffutoonPipeline.save_pretrained`, or the pipeline itself.
        overwrite: replace an existing `out_dir` (otherwise `FileExistsError`).
        base_model: Hub ids added to the card's `base_model` metadata (e.g. the SD1.5 checkpoint you ship).
        pipeline_file: the pipeline code to ship (default: this project's `pipeline_diffutoon.py`).
    """
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists: choose another folder or pass overwrite=True (--overwrite).")
    source_code = Path(pipeline_file) if pipeline_file is not None else pipeline_source()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "tmp")  # same filesystem as out_dir: the final rename is atomic
    try:
        if isinstance(components_dir_or_pipeline, (str, os.PathLike)):
            source = Path(components_dir_or_pipeline)
            index = _check_source(source)
            shutil.copytree(source, tmp, ignore=IGNORE, dirs_exist_ok=True)
        else:
            components_dir_or_pipeline.save_pretrained(tmp)
            index = _check_source(tmp)
        shutil.copyfile(source_code, tmp / "pipeline.py")
        (tmp / "README.md").write_text(card_text(base_model), encoding="utf-8")
        index["_class_name"] = CLASS_NAME
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if out.exists():  # overwrite: move the old folder aside, put the new one in place, then drop the old one
            old = _sibling(out, "old")
            out.rename(old / out.name)
            try:
                tmp.rename(out)
            except BaseException:
                (old / out.name).rename(out)
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Assemble a Hub-ready Diffutoon repository folder.")
    parser.add_argument("source", help="a folder written by DiffutoonPipeline.save_pretrained")
    parser.add_argument("out_dir", help="the folder to create (upload it with `hf upload <repo> <out_dir>`)")
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    parser.add_argument("--base-model", action="append", default=[], metavar="HUB_ID",
                        help="add a base model id to the card's metadata (repeatable)")
    parser.add_argument("--pipeline-file", default=None, help="pipeline code to ship (default: pipeline_diffutoon.py)")
    args = parser.parse_args(argv)
    try:
        out = assemble(args.out_dir, args.source, args.overwrite, args.base_model, args.pipeline_file)
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
