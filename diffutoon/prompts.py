"""Text conditioning (issue 19): long prompts, prompts over time, and embeddings given by the caller.

- Long prompts: how a prompt of more than 75 tokens becomes rows of 77 tokens for CLIP (`token_rows`).
- Prompts over time: `{frame_index: prompt}` as diffusers' AnimateDiff pipelines take it; each key prompt is
  encoded once and every frame's embedding is interpolated linearly between the surrounding keys when a window
  asks for it (`frame_embeds`), so host memory holds K key embeddings, not one per frame.
- `prompt_embeds` / `negative_prompt_embeds` with diffusers' SD shape rules.

Only torch is imported here: the module ships beside the pipeline file.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

LONG_PROMPT_MODES = ("chunks", "reference", "truncate")


def token_rows(tokenizer, ids: list[int], long_prompt: str = "chunks") -> list[list[int]]:
    """Rows of `model_max_length` (77) token ids for one prompt's ids (without special tokens).

    "chunks" (A1111's way, the default): every 75 tokens get their own BOS ... EOS and padding, so each row is a
        well-formed CLIP input.
    "reference" (the authors' code, DiffSynth-Studio's `tokenize_long_prompt`): BOS + all tokens + EOS, padded to a
        multiple of 77 and split raw: rows after the first start mid-prompt without BOS.
    "truncate" (diffusers' SD pipelines): the first 75 tokens, one row.
    Up to 75 tokens, all three give the same single row.
    """
    length = tokenizer.model_max_length
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if long_prompt == "reference":
        sequence = [bos, *ids, eos]
        sequence += [pad] * (-len(sequence) % length)
        return [sequence[i : i + length] for i in range(0, len(sequence), length)]
    per_row = length - 2
    ids = ids[:per_row] if long_prompt == "truncate" else ids
    chunks = [ids[i : i + per_row] for i in range(0, max(len(ids), 1), per_row)]
    return [[bos, *chunk, eos] + [pad] * (per_row - len(chunk)) for chunk in chunks]


# ---------------------------------------------------------------------------------------------------------------
# Prompts over time


def frame_embeds(embeds: torch.Tensor, frames: tuple | None, start: int, end: int) -> torch.Tensor:
    """The text embeddings (end - start, L, D) of frames [start, end).

    `embeds` is (1, L, D) for one prompt (`frames` None), or (K, L, D) for the prompts at key frames `frames`
    (sorted): a frame between keys a < b gets (1 - w) E_a + w E_b with w = (i - a) / (b - a), diffusers' FreeNoise
    `_lerp`, computed in float32; before the first key the first, after the last key the last. Each frame is
    computed on its own, so its bits do not depend on which window asks.
    """
    if frames is None:
        return embeds.repeat_interleave(end - start, dim=0)
    rows = []
    for i in range(start, end):
        after = next((k for k, key in enumerate(frames) if key >= i), len(frames) - 1)
        if frames[after] == i or after == 0 or frames[after] < i:  # a key frame, before the first, after the last
            rows.append(embeds[after])
            continue
        a, b = frames[after - 1], frames[after]
        w = (i - a) / (b - a)
        rows.append(((1 - w) * embeds[after - 1].float() + w * embeds[after].float()).to(embeds.dtype))
    return torch.stack(rows)


def check_schedule(value, name: str, num_frames: int) -> None:
    """A prompt dict {frame_index: prompt}: integer frames of the video, string prompts."""
    if not value:
        raise ValueError(f"`{name}` is an empty dict: give at least one {{frame_index: prompt}}, e.g. {{0: 'a girl'}}.")
    for frame, text in value.items():
        if isinstance(frame, bool) or not isinstance(frame, numbers.Integral) or not 0 <= frame < num_frames:
            raise ValueError(f"`{name}` has the key {frame!r}: keys are frame indices 0..{num_frames - 1} of the "
                             f"video ({num_frames} frames).")
        if not isinstance(text, str):
            raise ValueError(f"`{name}`[{frame}] must be a string prompt, got {type(text).__name__}.")


def check_text_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, long_prompt: str,
                      num_frames: int, default_prompt: str, cross_attention_dim: int, do_cfg: bool,
                      batch_cfg: bool) -> None:
    """Every check of the text inputs, before any model runs (diffusers' SD rules for the embeddings)."""
    if long_prompt not in LONG_PROMPT_MODES:
        raise ValueError(f"long_prompt must be one of {LONG_PROMPT_MODES}, got {long_prompt!r}.")
    if prompt_embeds is not None and prompt is not None and prompt != default_prompt:
        raise ValueError("Cannot forward both `prompt` and `prompt_embeds`: pass one of them.")
    if negative_prompt_embeds is not None and negative_prompt not in (None, ""):
        raise ValueError("Cannot forward both `negative_prompt` and `negative_prompt_embeds`: pass one of them.")
    if prompt is None and prompt_embeds is None:
        raise ValueError("`prompt` is required: e.g. 'best quality, perfect anime illustration' (or `prompt_embeds`).")
    for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if isinstance(value, dict):
            check_schedule(value, name, num_frames)
        elif value is not None and not isinstance(value, str) and not (
                isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], (str, dict))):
            raise ValueError(f"`{name}` must be one string, a dict {{frame_index: prompt}}, or a list of one of them "
                             f"(one video per call), got {type(value).__name__} of length "
                             f"{len(value) if hasattr(value, '__len__') else '?'}.")
    for name, value in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
        if value is not None and (not isinstance(value, torch.Tensor) or value.ndim != 3 or value.shape[0] != 1
                                  or value.shape[2] != cross_attention_dim):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"`{name}` must be a tensor (1, sequence length, {cross_attention_dim}) for the one video "
                             f"of the call, got {shape}.")
    if prompt_embeds is not None and negative_prompt_embeds is not None and do_cfg and batch_cfg and \
            prompt_embeds.shape != negative_prompt_embeds.shape:
        raise ValueError("`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed directly, "
                         f"but got: `prompt_embeds` {tuple(prompt_embeds.shape)} != `negative_prompt_embeds` "
                         f"{tuple(negative_prompt_embeds.shape)} (or pass batch_cfg=False).")


def text_inputs(prompt, negative_prompt, prompt_embeds=None, negative_prompt_embeds=None):
    """(prompt, negative prompt) as the encoder takes them: a string, a dict {frame: prompt}, or given embeddings."""
    def one(value):
        return value[0] if isinstance(value, (list, tuple)) else value

    prompt = prompt_embeds if prompt_embeds is not None else one(prompt)
    negative = negative_prompt_embeds if negative_prompt_embeds is not None else one(negative_prompt)
    return prompt, "" if negative is None else negative


@dataclass
class TextEmbeds:
    """Host embeddings of one pass: (K, L, D) each, with the key frames of a prompt dict (None: one prompt)."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    prompt_frames: tuple | None = None
    negative_prompt_frames: tuple | None = None


def encode_text(encode, value, long_prompt: str):
    """(embeds (K, L, D), key frames or None) of a string, a dict {frame: prompt} or given embeddings (1, L, D).
    `encode(prompt, long_prompt)` -> (1, L, D) host embeddings."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu(), None
    if isinstance(value, dict):
        frames = tuple(sorted(int(k) for k in value))
        parts = [encode(value[k], long_prompt) for k in sorted(value)]
        return pad_rows(parts, lambda: encode("", long_prompt)), frames
    return encode(value, long_prompt), None


def pad_rows(parts: list[torch.Tensor], empty) -> torch.Tensor:
    """Concatenate (1, L_i, D) embeddings along the first dimension, giving shorter ones empty-prompt rows of 77
    (`empty()`) up to the longest: what `encode_prompt` gives a longer prompt."""
    longest = max(p.shape[1] for p in parts)
    if all(p.shape[1] == longest for p in parts):
        return torch.cat(parts)
    row = empty()
    if any((longest - p.shape[1]) % row.shape[1] for p in parts):
        raise ValueError(f"Embeddings of lengths {sorted({p.shape[1] for p in parts})} cannot be padded to one length "
                         f"with rows of {row.shape[1]} tokens: pass embeddings of one length, or batch_cfg=False.")
    return torch.cat([torch.cat([p, row.repeat(1, (longest - p.shape[1]) // row.shape[1], 1)], dim=1) for p in parts])


def encode_pair(encode, prompt, negative_prompt, long_prompt: str, do_cfg: bool, batch_cfg: bool) -> TextEmbeds:
    """The pass's `TextEmbeds`: the negative one only with guidance; both of one length when batched."""
    positive, frames = encode_text(encode, prompt, long_prompt)
    if not do_cfg:
        return TextEmbeds(positive, None, frames)
    negative, negative_frames = encode_text(encode, negative_prompt, long_prompt)
    if batch_cfg and positive.shape[1] != negative.shape[1]:
        padded = pad_rows([*positive.split(1), *negative.split(1)], lambda: encode("", long_prompt))
        positive, negative = padded[: len(positive)], padded[len(positive) :]
    return TextEmbeds(positive, negative, frames, negative_frames)
