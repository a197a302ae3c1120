"""The Hub model card and `model_card/assemble.py` (issue 6, part 4): the card's metadata, and a tiny assembled
folder that diffusers loads offline with `trust_remote_code=True` and that renders exactly like the original."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_video
from huggingface_hub import ModelCard

from model_card.assemble import CARD, assemble
from pipeline_diffutoon import HUB_MODELS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




def render(pipe):
    """One CFG step on 3 frames with user-given conditions (no annotator) and fixed noise, latents out."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(video=make_video(3, 32), prompt="a girl dancing", negative_prompt="bad", num_inference_steps=1,
                conditioning_frames=[make_video(3, 32, seed=3), None], context_length=4, context_stride=2,
                generator=torch.Generator().manual_seed(0), output_type="latent").frames


def fake_saved_pipeline(folder, class_name="DiffutoonPipeline"):
    """The files `assemble` reads, without weights: enough to test the folder handling cheaply."""
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    index = {"_class_name": class_name, "_diffusers_version": "0.42.1",
             "scheduler": ["diffutoon.scheduling", "DiffutoonDDIMScheduler"], "motion_adapter": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_card_metadata_is_what_the_hub_reads():
    data = ModelCard.load(CARD).data.to_dict()  # huggingface_hub's own parser of the YAML front matter
    assert data["library_name"] == "diffusers"
    assert data["pipeline_tag"] == "video-to-video"
    assert data["license"] == "apache-2.0"
    assert {"diffusers", "animatediff", "controlnet", "toon-shading", "anime", "video-to-video",
            "diffutoon"} <= set(data["tags"])
    # the card names the same checkpoints as the code's defaults
    assert data["base_model"] == [HUB_MODELS["motion_adapter"], HUB_MODELS["lineart"], HUB_MODELS["tile"]]
    text = CARD.read_text()
    for needed in ("trust_remote_code=True", "custom_pipeline=", "pip install", "verybadimagenegative_v1.3",
                   "## Limitations", "2401.16224"):
        assert needed in text, needed


def test_assembled_folder_loads_offline_and_renders_identically(tmp_path):
    from diffusers import DiffusionPipeline

    from diffutoon.tiny import save_tiny_pipeline

    original = save_tiny_pipeline(tmp_path / "saved")
    out = assemble(tmp_path / "hub", tmp_path / "saved", base_model=["someone/anime-sd15"])

    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(p.name for p in (tmp_path / "saved").iterdir()), "pipeline.py", "README.md"])
    with open(os.path.join(ROOT, "pipeline_diffutoon.py"), "rb") as f:
        assert (out / "pipeline.py").read_bytes() == f.read()
    index = json.loads((out / "model_index.json").read_text())
    saved = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index == {**saved, "_class_name": ["pipeline", "DiffutoonPipeline"]}  # only the class entry changes
    card = ModelCard.load(out / "README.md").data.to_dict()
    assert card["base_model"][0] == "someone/anime-sd15" and len(card["base_model"]) == 4

    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest: no Hub, a local folder only
    loaded = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    # the class comes from the folder's pipeline.py (diffusers' dynamic module), not the installed module
    assert type(loaded).__name__ == "DiffutoonPipeline" and type(loaded).__module__.endswith(".pipeline")
    assert type(loaded).__module__ != type(original).__module__
    assert type(loaded.scheduler).__name__ == "DiffutoonDDIMScheduler"
    assert torch.equal(render(loaded), render(original))  # same weights, same code: bit for bit

    with pytest.raises(ValueError, match="trust_remote_code"):  # custom code is never run silently
        DiffusionPipeline.from_pretrained(out)


def test_assemble_from_a_pipeline_object_and_custom_pipeline_loading(tmp_path, tiny_pipe):
    from diffusers import DiffusionPipeline

    out = assemble(tmp_path / "hub", tiny_pipe)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == ["pipeline", "DiffutoonPipeline"]
    # `custom_pipeline=<folder>` (the card's second recipe) finds the same class in the folder's pipeline.py
    loaded = DiffusionPipeline.from_pretrained(out, custom_pipeline=str(out), trust_remote_code=True)
    assert type(loaded).__name__ == "DiffutoonPipeline" and type(loaded).__module__.endswith(".pipeline")
    for name in ("unet", "text_encoder", "vae"):
        ours, theirs = getattr(loaded, name).state_dict(), getattr(tiny_pipe, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_assemble_refuses_to_overwrite_unless_asked(tmp_path):
    source = fake_saved_pipeline(tmp_path / "saved")
    out = tmp_path / "hub"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        assemble(out, source)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # untouched

    assemble(out, source, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model_index.json", "pipeline.py", "scheduler"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub", "saved"]  # no temporary folders left behind


@pytest.mark.parametrize("broken", ["no index", "other pipeline", "missing component"])
def test_assemble_rejects_a_folder_that_is_not_a_saved_diffutoon(tmp_path, broken):
    source = tmp_path / "saved"
    if broken == "no index":
        source.mkdir()
    else:
        fake_saved_pipeline(source, "StableDiffusionPipeline" if broken == "other pipeline" else "DiffutoonPipeline")
    if broken == "missing component":
        (source / "scheduler" / "scheduler_config.json").unlink()
        (source / "scheduler").rmdir()
    with pytest.raises(ValueError):
        assemble(tmp_path / "hub", source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # nothing half-written


def test_cli(tmp_path):
    source = fake_saved_pipeline(tmp_path / "saved")
    script = os.path.join(ROOT, "model_card", "assemble.py")
    run = lambda *args: subprocess.run([sys.executable, script, *args], capture_output=True, text=True)  # noqa: E731
    done = run(str(source), str(tmp_path / "hub"), "--base-model", "someone/anime-sd15")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "hub")
    assert "- someone/anime-sd15\n" in (tmp_path / "hub" / "README.md").read_text()
    again = run(str(source), str(tmp_path / "hub"))
    assert again.returncode == 1 and "--overwrite" in again.stderr
    assert run(str(source), str(tmp_path / "hub"), "--overwrite").returncode == 0
