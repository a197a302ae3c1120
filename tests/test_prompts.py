"""Text conditioning (issue 19, sections 3 and 5): long prompts, given embeddings, a None scheduler, prompts over time."""

import numpy as np
import pytest
import torch
from conftest import make_video
from diffusers.pipelines.free_noise_utils import AnimateDiffFreeNoiseMixin

from diffutoon.prompts import frame_embeds
from diffutoon.render_folder import RenderFolderError
from diffutoon.scheduling import DiffutoonDDIMScheduler
from pipeline_diffutoon import DEFAULT_PROMPT

N, SIZE = 7, 16
LONG = " ".join("abcdefghij"[i % 10] for i in range(160))  # 160 one-character words: 160 tokens of the tiny tokenizer


@pytest.fixture(scope="module")
def renders(tiny_pipe):
    """`call`'s render with a plain prompt, and with a schedule (shared by the tests below)."""
    return {"plain": call(tiny_pipe), "schedule": call(tiny_pipe, **SCHEDULE)}


SCHEDULE = dict(prompt={0: "a girl dancing, day", 4: "a girl dancing, night"}, negative_prompt={0: "bad", 6: "ugly"})


def call(pipe, **kwargs):
    """A cheap render: given conditions (no annotator), 2 steps, windows (0, 4), (2, 6), (4, 7); latents out."""
    args = dict(video=make_video(N, SIZE), prompt="a girl dancing", negative_prompt="bad", num_inference_steps=2,
                conditioning_frames=[make_video(N, SIZE, seed=3), None], context_length=4, context_stride=2,
                generator=torch.Generator().manual_seed(0), output_type="latent")
    args.update(kwargs)
    return pipe(**args).frames


def refused_before_models(pipe, modules, message, **kwargs):
    """`call(pipe, **kwargs)` raises a ValueError matching `message` before any of `modules` runs."""
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in modules]
    try:
        with pytest.raises(ValueError, match=message):
            call(pipe, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    assert calls == []


# ---------------------------------------------------------------------------------------------------------------
# 5. Long prompts, against tokenizations written here the way each convention's code calls the tokenizer


def reference_rows(tokenizer, prompt):
    """The authors' code (DiffSynth-Studio `tokenize_long_prompt`): tokenize with BOS/EOS, pad to a multiple of 77
    with the tokenizer's own padding, reshape raw."""
    length = tokenizer.model_max_length
    n = len(tokenizer(prompt, truncation=False).input_ids)
    ids = tokenizer(prompt, padding="max_length", max_length=-(-n // length) * length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.reshape(-1, length)


def a1111_rows(tokenizer, prompt):
    """A1111: the tokens in runs of 75, each run given BOS/EOS and padded to 77: here each run of 75 one-token words
    tokenized on its own by the tokenizer, which adds BOS/EOS and pads."""
    words = prompt.split()
    assert len(tokenizer(prompt, add_special_tokens=False).input_ids) == len(words)  # one token a word
    runs = [" ".join(words[i : i + 75]) for i in range(0, len(words), 75)]
    return tokenizer(runs, padding="max_length", max_length=77, return_tensors="pt").input_ids


def test_long_prompt_modes_match_independent_tokenizations(tiny_pipe):
    encoder, tokenizer = tiny_pipe.text_encoder, tiny_pipe.tokenizer

    def encoded(rows):
        return encoder(rows)[0].reshape(1, -1, encoder.config.hidden_size)

    reference, chunks = reference_rows(tokenizer, LONG), a1111_rows(tokenizer, LONG)
    assert reference.shape == chunks.shape == (3, 77) and not torch.equal(reference, chunks)
    assert reference[1, 0] != tokenizer.bos_token_id and chunks[1, 0] == tokenizer.bos_token_id
    torch.testing.assert_close(tiny_pipe.encode_prompt(LONG, "cpu", None), encoded(chunks))  # the default
    torch.testing.assert_close(tiny_pipe.encode_prompt(LONG, "cpu", None, "chunks"), encoded(chunks))
    torch.testing.assert_close(tiny_pipe.encode_prompt(LONG, "cpu", None, "reference"), encoded(reference))
    torch.testing.assert_close(tiny_pipe.encode_prompt(LONG, "cpu", None, "truncate"), encoded(chunks[:1]))
    short = tokenizer("a girl", padding="max_length", max_length=77, return_tensors="pt").input_ids
    for mode in ("chunks", "reference", "truncate"):  # up to 75 tokens: one row, diffusers' own
        torch.testing.assert_close(tiny_pipe.encode_prompt("a girl", "cpu", None, mode), encoded(short))
    seen = []  # the call's `long_prompt` reaches the encoder
    hook = encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        call(tiny_pipe, prompt=LONG, long_prompt="reference", guidance_scale=1.0, num_inference_steps=1)
    finally:
        hook.remove()
    assert len(seen) == 1 and torch.equal(seen[0], reference)


def test_prompt_embeds_give_the_render_of_their_prompts_and_a_none_scheduler_samples_the_reference_ddim(tiny_pipe,
                                                                                                        renders):
    expected = renders["plain"]
    with torch.no_grad():
        embeds = {k: tiny_pipe.encode_prompt(p, "cpu", 1) for k, p in (("pos", "a girl dancing"), ("neg", "bad"))}
    assert torch.equal(call(tiny_pipe, prompt=None, negative_prompt=None, prompt_embeds=embeds["pos"],
                            negative_prompt_embeds=embeds["neg"]), expected)
    assert torch.equal(call(tiny_pipe, prompt=DEFAULT_PROMPT, prompt_embeds=embeds["pos"]), expected)  # the default
    scheduler = tiny_pipe.scheduler
    try:
        tiny_pipe.scheduler = None  # as diffusers' generic tests reload optional components
        assert torch.equal(call(tiny_pipe), expected)
        assert isinstance(tiny_pipe.scheduler, DiffutoonDDIMScheduler)
    finally:
        tiny_pipe.scheduler = scheduler


BAD_TEXT = [
    (dict(prompt="a", prompt_embeds=torch.zeros(1, 77, 32)), "Cannot forward both `prompt` and `prompt_embeds`"),
    (dict(negative_prompt="b", negative_prompt_embeds=torch.zeros(1, 77, 32)), "both `negative_prompt` and"),
    (dict(prompt=None), "`prompt` is required"),
    (dict(prompt=None, prompt_embeds=torch.zeros(2, 77, 32)), r"\(1, sequence length, 32\)"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 8)), r"\(1, sequence length, 32\)"),
    (dict(prompt=None, negative_prompt=None, prompt_embeds=torch.zeros(1, 77, 32),
          negative_prompt_embeds=torch.zeros(1, 154, 32)), "same shape"),
    (dict(long_prompt="split"), "long_prompt must be one of"),
    (dict(prompt={}), "empty dict"),
    (dict(prompt={0: "a", N: "b"}), rf"keys are frame indices 0..{N - 1}"),
    (dict(prompt={"0": "a"}), "keys are frame indices"),
    (dict(negative_prompt={0: 3}), "must be a string prompt"),
]


@pytest.mark.parametrize("kwargs,message", BAD_TEXT)
def test_bad_text_inputs_raise_before_any_model_runs(tiny_pipe, kwargs, message):
    refused_before_models(tiny_pipe, (tiny_pipe.unet, tiny_pipe.text_encoder), message, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# 3. Prompts over time


def diffusers_interpolation(key_embeds: dict, num_frames: int) -> torch.Tensor:
    """Every frame's embedding as diffusers' FreeNoise `_encode_prompt_free_noise` builds it (its `_lerp` between
    consecutive keys, the last key held to the end), in float64 here."""
    keys = sorted(key_embeds)
    keys_to_end = {**{k: key_embeds[k] for k in keys}, num_frames - 1: key_embeds[keys[-1]]}
    frames = sorted(keys_to_end)
    out = torch.zeros(num_frames, *key_embeds[keys[0]].shape[1:], dtype=torch.float64)
    for a, b in zip(frames, frames[1:]):
        out[a : b + 1] = AnimateDiffFreeNoiseMixin._lerp(None, a, b, keys_to_end[a].double(), keys_to_end[b].double())
    return out


def test_frame_embeds_interpolate_as_diffusers_for_any_window():
    g = torch.Generator().manual_seed(0)
    keys = {0: torch.randn(1, 77, 8, generator=g), 3: torch.randn(1, 77, 8, generator=g),
            9: torch.randn(1, 77, 8, generator=g)}
    expected = diffusers_interpolation(keys, 13).float()
    embeds, frames = torch.cat([keys[k] for k in sorted(keys)]), tuple(sorted(keys))
    for start, end in [(0, 13), (0, 4), (2, 6), (8, 13), (12, 13)]:
        torch.testing.assert_close(frame_embeds(embeds, frames, start, end), expected[start:end], rtol=0, atol=1e-6)
    whole = frame_embeds(embeds, frames, 0, 13)
    assert all(torch.equal(whole[s:e], frame_embeds(embeds, frames, s, e)) for s, e in [(1, 5), (7, 11)])  # same bits
    assert torch.equal(whole[3], keys[3][0]) and torch.equal(whole[12], keys[9][0])
    late = frame_embeds(embeds[1:], frames[1:], 0, 4)  # before the first key: the first key's embedding
    assert all(torch.equal(row, keys[3][0]) for row in late)


@torch.no_grad()
def test_every_model_call_gets_each_frames_own_embedding(tiny_pipe):
    schedule, negative = {0: "a girl dancing, day", 5: "a girl dancing, night"}, {2: "bad", 6: "ugly"}
    pos = diffusers_interpolation({k: tiny_pipe.encode_prompt(p, "cpu", 1) for k, p in schedule.items()}, N).float()
    neg = {k: tiny_pipe.encode_prompt(p, "cpu", 1) for k, p in negative.items()}
    neg = torch.cat([neg[2].expand(2, -1, -1), diffusers_interpolation({0: neg[2], 4: neg[6]}, N - 2).float()])
    seen = []

    def record(module, args, kwargs):
        seen.append((module, kwargs["encoder_hidden_states"]))

    models = [tiny_pipe.unet, *tiny_pipe.controlnets]
    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in models]
    try:
        for reuse in (True, False):
            seen.clear()
            call(tiny_pipe, prompt=schedule, negative_prompt=negative, reuse_across_windows=reuse)
            covered = {m: set() for m in models}
            for module, embeds in seen:  # negative frames then positive frames of one contiguous range
                f = embeds.shape[0] // 2
                starts = [s for s in range(N - f + 1)
                          if torch.allclose(embeds, torch.cat([neg[s : s + f], pos[s : s + f]]), rtol=0, atol=1e-6)]
                assert len(starts) == 1, "a call's embeddings are not the frames' own"
                covered[module].update(range(starts[0], starts[0] + f))
            assert all(frames == set(range(N)) for frames in covered.values())
    finally:
        for h in hooks:
            h.remove()


def test_a_constant_schedule_is_the_string_and_a_changing_one_changes_the_render(tiny_pipe, renders):
    expected = renders["plain"]
    assert torch.equal(call(tiny_pipe, prompt={0: "a girl dancing"}, negative_prompt={3: "bad"}), expected)
    assert not torch.equal(renders["schedule"], expected)
    long = call(tiny_pipe, prompt={0: "a girl dancing", 6: LONG})  # keys of different lengths: padded like the negative
    assert long.shape == expected.shape and torch.isfinite(long).all() and not torch.equal(long, expected)


def test_a_schedule_resumes_bit_identically_and_is_part_of_the_identity(tiny_pipe, renders, tmp_path):
    def stop(progress):
        if progress.get("step") == 1 and progress.get("window") == 1:
            tiny_pipe._interrupt = True

    assert call(tiny_pipe, **SCHEDULE, render_dir=tmp_path / "r", progress_callback=stop) is None
    with pytest.raises(RenderFolderError, match="holds a different render.*prompt"):
        call(tiny_pipe, **{**SCHEDULE, "prompt": {0: "a girl dancing, day", 4: "dusk"}}, render_dir=tmp_path / "r")
    assert torch.equal(call(tiny_pipe, **SCHEDULE, render_dir=tmp_path / "r"), renders["schedule"])


def test_diffusers_cfg_cutoff_callback_works_with_a_schedule(tiny_pipe):
    from diffusers.callbacks import SDCFGCutoffCallback

    def cutoff(pipe, i, t, tensors):  # what SDCFGCutoffCallback means: no negative branch from step 1 on
        if i == 1:
            pipe._guidance_scale = 0.0
        return {}

    # its prompt_embeds[-1:] (diffusers' conditional half) cut the schedule to one key: an IndexError in the next step
    cfg_cutoff = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1)
    out = call(tiny_pipe, **SCHEDULE, num_inference_steps=3, callback_on_step_end=cfg_cutoff)
    assert torch.equal(out, call(tiny_pipe, **SCHEDULE, num_inference_steps=3, callback_on_step_end=cutoff))
    with pytest.raises(ValueError, match="prompt_embeds of 3 rows: with prompts over time it must keep one per key"):
        call(tiny_pipe, **SCHEDULE, callback_on_step_end_tensor_inputs=["prompt_embeds"],
             callback_on_step_end=lambda p, i, t, k: {"prompt_embeds": k["prompt_embeds"][:1].repeat(3, 1, 1)})


def _two_processes(rank, pipe, kwargs):
    return call(pipe, **kwargs)


def test_two_processes_render_a_schedule_as_one(tiny_pipe, renders, tmp_path):
    from test_distributed import spawn

    results, errors, codes = spawn(2, tmp_path, _two_processes, tiny_pipe, SCHEDULE)
    assert not errors and codes == [0, 0]
    assert torch.equal(results[0], renders["schedule"]) and torch.equal(results[1], renders["schedule"])


def test_cli_prompt_at_maps_input_positions_onto_rendered_frames(capfd, tmp_path):
    from diffutoon import cli

    def schedule(*argv, indices=range(10, 40, 3), fps=6.0):
        args = cli.build_parser().parse_args(["render", "in.mp4", "--prompt", "day", *argv])
        return cli._prompt_schedule(args, indices, fps)

    assert schedule() == "day"  # no --prompt-at: the plain prompt, as before
    # frames 10, 13, ..., 37 rendered (--start 10 --every-nth 3); 2.5s = frame 15 -> rendered frame 2 (source 16)
    assert schedule("--prompt-at", "22=dusk", "--prompt-at", "2.5s=night, stars") == {0: "day", 4: "dusk", 2: "night, stars"}
    assert schedule("--prompt-at", "10=dawn") == {0: "dawn"}  # at the first rendered frame: replaces --prompt
    with pytest.raises(cli.CLIError, match=r"--prompt-at 40: outside the rendered frames 10..37"):
        schedule("--prompt-at", "40=x")
    with pytest.raises(cli.CLIError, match="no frame rate"):
        schedule("--prompt-at", "1s=x", fps=None)
    assert cli.main(["render", "in.mp4", "--prompt-at", "night"]) == 2
    assert "expected POSITION=PROMPT" in capfd.readouterr().err
