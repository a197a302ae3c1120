"""Assemble a Hub-ready Diffutoon folder: a saved pipeline's components, the pipeline code as `pipeline.py`, the
model card as `README.md`, and a `model_index.json` whose `_class_name` is `["pipeline", "DiffutoonPipeline"]`.

diffusers (0.42, `_resolve_custom_pipeline_and_cls`) reads a list `_class_name` as [module file, class] and loads
that class from `<folder>/pipeline.py`, so `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`
builds a `DiffutoonPipeline`, from a local folder (offline too) or from the Hub.

The folder needs only diffusers and its usual dependencies, not this project: the project modules the main pass
needs (those named in the marked import block of `pipeline_diffutoon.py`) ship as flat files beside `pipeline.py`
(`diffutoon/scheduling.py` -> `diffutoon_scheduling.py`), the block is rewritten as relative imports of them (diffusers
copies a pipeline file's `from .x import` siblings), and a component whose class lives in one of them (the
scheduler) gets its own copy in its folder, named in model_index.json (diffusers' custom components).

Usage:
    pipe.save_pretrained("saved")  # a DiffutoonPipeline with its real weights
    python model_card/assemble.py saved hub-folder --base-model <the SD1.5 checkpoint's Hub id>
    hf upload <user>/<repo> hub-folder

or from Python: `from model_card.assemble import assemble; assemble("hub-folder", pipe_or_saved_folder)`.
"""

from __future__ import annotations

import argparse
import ast
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
BLOCK = ("# >>> main-pass modules >>>", "# <<< main-pass modules <<<")  # the import block's marker lines
PROJECT = {"diffutoon", "attention_processors", "fastblend", "pipeline_diffutoon"}  # not on any package index
ALLOWED = {"numpy", "torch", "diffusers", "transformers", "safetensors", *sys.stdlib_module_names}  # CONTRACT.md


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


def flat_name(module: str) -> str:
    """The file name stem a project module ships under beside pipeline.py: diffutoon.scheduling -> diffutoon_scheduling
    (prefixed: diffusers copies every local custom pipeline's siblings into one shared folder)."""
    return module.replace(".", "_")


def main_pass_modules(code: str, where: str = "pipeline_diffutoon.py") -> tuple[dict[str, list[str]], int, int]:
    """The modules the marked import block names, {module: [names]}, and the block's first and last line index.

    The block names each module twice (installed: `_import_names("m", "a", ...)`; a checkout loaded with
    custom_pipeline=: `from .m import a, ...`); both must name the same objects.
    """
    lines = code.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == BLOCK[0]]
    ends = [i for i, line in enumerate(lines) if line.strip() == BLOCK[1]]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(f"{where} must hold one import block between the lines {BLOCK[0]!r} and {BLOCK[1]!r}.")
    relative, installed = {}, {}
    for node in ast.walk(ast.parse("\n".join(lines[starts[0] : ends[0] + 1]))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if any(alias.asname for alias in node.names):
                raise ValueError(f"{where}: write `from .{node.module} import ...` in the import block without `as`.")
            relative[node.module] = [alias.name for alias in node.names]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            raise ValueError(f"{where}: the import block may only hold `from .module import ...` lines and "
                             "`_import_names(...)` calls.")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_import_names":
            args = [arg.value for arg in node.args]
            installed[args[0]] = args[1:]
    if relative != installed or not relative:
        raise ValueError(f"{where}: the import block must name the same modules and objects in both branches, got "
                         f"{relative} (relative imports) and {installed} (_import_names).")
    return relative, starts[0], ends[0]


def _module_file(module: str, pipeline_file: Path) -> Path:
    """The source of a project module, beside the pipeline file (a checkout, or site-packages for an installed one)."""
    path = pipeline_file.parent.joinpath(*module.split(".")).with_suffix(".py")
    if not path.is_file():
        raise FileNotFoundError(f"The import block of {pipeline_file} names {module}, but {path} does not exist: "
                                "create the module or remove it from the block.")
    return path


def _check_flat(path: Path, module: str) -> None:
    """A module that ships as one flat file may import only CONTRACT.md's libraries at import time (anything else
    lazily, inside functions), and never another project module."""
    def imports(node, top_level):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in child.names] if isinstance(child, ast.Import) else [child.module or ""]
                yield child, [n.split(".")[0] for n in names], top_level
            yield from imports(child, top_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    for node, names, top_level in imports(ast.parse(path.read_text(encoding="utf-8")), True):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise ValueError(f"{module} ({path}) imports relatively, line {node.lineno}: it ships as one flat file.")
        for name in names:
            if name in PROJECT or (top_level and name not in ALLOWED):
                raise ValueError(f"{module} ({path}) imports {name} at line {node.lineno}: a module the main pass needs "
                                 f"may import only {sorted(ALLOWED - set(sys.stdlib_module_names))} and the standard "
                                 "library at import time, and no other project module (CONTRACT.md).")


def hub_pipeline_code(pipeline_file: Path) -> tuple[str, dict[str, Path]]:
    """pipeline.py's text with the import block rewritten as relative imports of the flat copies, and
    {flat name: source file} of the modules to ship beside it."""
    code = pipeline_file.read_text(encoding="utf-8")
    modules, start, end = main_pass_modules(code, str(pipeline_file))
    files = {}
    for module in modules:
        files[flat_name(module)] = _module_file(module, pipeline_file)
        _check_flat(files[flat_name(module)], module)
    block = [BLOCK[0], "# Written by model_card/assemble.py: the project modules the main pass needs ship beside this file."]
    block += [f"from .{flat_name(m)} import {', '.join(names)}  # noqa: F401" for m, names in modules.items()]
    lines = code.splitlines()
    return "\n".join([*lines[:start], *block, BLOCK[1], *lines[end + 1 :]]) + "\n", files


def _ship_component_code(folder: Path, index: dict, files: dict[str, Path]) -> None:
    """A component whose class lives in a shipped module (the scheduler) gets that file in its own folder, named in
    model_index.json: diffusers loads it as a custom component (with trust_remote_code=True)."""
    for component, entry in index.items():
        if component.startswith("_") or not isinstance(entry, list) or not isinstance(entry[0], str):
            continue
        flat = flat_name(entry[0])
        if flat in files:
            shutil.copyfile(files[flat], folder / component / f"{flat}.py")
            index[component] = [flat, entry[1]]
        elif entry[0].split(".")[0] in PROJECT:
            raise ValueError(f"Component {component!r} is a {entry[0]}.{entry[1]}, whose module the Hub folder does "
                             "not ship: add the module to the import block of pipeline_diffutoon.py.")


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
        pipeline_file: the pipeline code to ship (default: this project's `pipeline_diffutoon.py`); the modules its
            import block names are read beside it.
    """
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists: choose another folder or pass overwrite=True (--overwrite).")
    source_code = Path(pipeline_file) if pipeline_file is not None else pipeline_source()
    code, files = hub_pipeline_code(source_code)  # before any folder is made: a broken import block fails here
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
        (tmp / "pipeline.py").write_text(code, encoding="utf-8")
        for flat, path in files.items():
            shutil.copyfile(path, tmp / f"{flat}.py")
        _ship_component_code(tmp, index, files)
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
