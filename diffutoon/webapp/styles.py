"""The LoRAs and textual inversions a user uploads: checked when the render is asked for (one line naming the file),
and loaded onto the shared pipeline for that job's render only."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

from .jobs import _WEIGHT_SUFFIXES
from .settings import UIError, one_line, safe_name

WHAT = {"LoRA": "a LoRA", "Textual inversion": "a textual inversion (embedding)"}


def _tensor_names(path):
    """The tensor names in a weights file, read as diffusers would (safetensors, or torch.load with weights only);
    None when it is not a readable weights file."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        import torch

        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  whatever the library says, the file is not weights it can read
        return None
    names, todo = [], [("", data)]
    while todo:  # nested dicts (A1111 embeddings: string_to_param.*)
        prefix, value = todo.pop()
        if isinstance(value, dict):
            todo += [(f"{prefix}{k}.", v) for k, v in value.items()]
        elif isinstance(value, torch.Tensor):
            names.append(prefix.rstrip("."))
    return names


def check_style_files(files):
    """[(what: "LoRA" | "Textual inversion", path)]: each a weights file of its kind, else one UIError naming the file
    (no library internals), before anything is queued."""
    for what, path in files:
        path, name = Path(path), safe_name(Path(path).name)
        if path.suffix.lower() not in _WEIGHT_SUFFIXES:
            raise UIError(f"{what} {name}: not a weights file ({', '.join(_WEIGHT_SUFFIXES)})")
        names = _tensor_names(path)
        if not names:
            raise UIError(f"{what} {name}: this is not {WHAT[what]}: the file cannot be read as "
                          f"{path.suffix.lower()} weights (damaged, or another kind of file)")
        if what == "LoRA" and not any("lora" in n.lower() for n in names):
            raise UIError(f"{what} {name}: this is not a LoRA: it holds no LoRA weights ({len(names)} other tensors, "
                          "e.g. a whole checkpoint or an embedding)")


@contextlib.contextmanager
def _loading(path: Path, what: str, where: str):
    """A user's file that fails to load: one line with the name they uploaded it under (stored as <key>-<name>)."""
    try:
        yield
    except Exception as e:
        original = path.name.partition("-")[2]
        raise UIError(f"{what} {original}: could not load it {where} ({one_line(e, {path: original})})") from e


@contextlib.contextmanager
def style_files(pipe, job, base_loras, scale):
    """The job's LoRAs and textual inversions, loaded for its render only; the shared pipeline is restored after
    (tokenizer and embedding rows exactly, LoRA layers removed or the start-up adapters set back)."""
    loras = [job.dir / "loras" / n for n in job.loras]
    embeddings = [(job.dir / "embeddings" / n, token) for n, token in job.embeddings]
    base_names, base_weights = base_loras
    saved_tokenizer = copy.deepcopy(pipe.tokenizer) if embeddings else None
    rows = pipe.text_encoder.get_input_embeddings().num_embeddings if embeddings else None
    names = []
    try:
        for path, token in embeddings:
            with _loading(path, "Textual inversion", "into this app's text encoder"):
                pipe.load_textual_inversion(str(path), token=token)
        for i, path in enumerate(loras):
            name = f"ui_lora{i}"
            names.append(name)
            with _loading(path, "LoRA", "onto this app's models"):
                pipe.load_lora_weights(str(path), adapter_name=name)
        if names:
            pipe.set_adapters([*base_names, *names], [*base_weights, *[float(scale)] * len(names)])
        yield
    finally:
        if names:
            if base_names:
                for name in names:
                    with contextlib.suppress(Exception):
                        pipe.delete_adapters(name)
                pipe.set_adapters(list(base_names), list(base_weights))
            else:
                pipe.unload_lora_weights()
        if embeddings:
            pipe.tokenizer = saved_tokenizer
            pipe.text_encoder.resize_token_embeddings(rows)


