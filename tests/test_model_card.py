"""The Hub model card and `model_card/assemble.py` (issue 6, part 4): the card's metadata, and a tiny assembled
folder that diffusers loads offline with `trust_remote_code=True` and that renders exactly like the original."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_video, save_sd15_folder
from huggingface_hub import ModelCard

from model_card.assemble import BLOCK, CARD, assemble, hub_pipeline_code, main_pass_modules
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

    code, shipped = hub_pipeline_code(Path(ROOT) / "pipeline_diffutoon.py")  # the modules the import block names
    assert "diffutoon_scheduling" in shipped
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(p.name for p in (tmp_path / "saved").iterdir()), "pipeline.py", "README.md", *(f"{m}.py" for m in shipped)])
    assert (out / "pipeline.py").read_text() == code
    scheduling = (Path(ROOT) / "diffutoon" / "scheduling.py").read_bytes()
    assert (out / "diffutoon_scheduling.py").read_bytes() == (out / "scheduler" / "diffutoon_scheduling.py").read_bytes() == scheduling
    index = json.loads((out / "model_index.json").read_text())
    saved = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert saved["scheduler"] == ["diffutoon.scheduling", "DiffutoonDDIMScheduler"]
    assert index == {**saved, "_class_name": ["pipeline", "DiffutoonPipeline"],  # only these two entries change
                     "scheduler": ["diffutoon_scheduling", "DiffutoonDDIMScheduler"]}
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
    shipped = [f"{m}.py" for m in hub_pipeline_code(Path(ROOT) / "pipeline_diffutoon.py")[1]]
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", "model_index.json", "pipeline.py", "scheduler",
                                                            *shipped])
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


# ---------------------------------------------------------------------------------------------------------------
# Users who have only diffusers (issue 9, section 2)

ONLY_DIFFUSERS = textwrap.dedent("""
    import importlib.abc, json, sys
    REFUSED = {"diffutoon", "attention_processors", "fastblend", "pipeline_diffutoon"}

    class Refuse(importlib.abc.MetaPathFinder):  # this project is not installed, whatever sys.path says
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in REFUSED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, Refuse())
    import numpy as np, torch
    from diffusers import ControlNetModel, DiffusionPipeline, MotionAdapter
    from diffusers.utils import logging
    logging.set_verbosity_warning()
    torch.set_num_threads(1)
    hub, sd15, pipeline_file, out = sys.argv[1:5]
    args = json.loads(sys.argv[5])
    video, lineart = np.load(args.pop("video")), np.load(args.pop("lineart"))

    def render(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(video=video, conditioning_frames=[lineart, None], generator=torch.Generator().manual_seed(0),
                    **args).frames.numpy()

    pipe = DiffusionPipeline.from_pretrained(hub, trust_remote_code=True)
    assert type(pipe.scheduler).__name__ == "DiffutoonDDIMScheduler", type(pipe.scheduler)
    assembled = render(pipe)
    # README's recipe with the checkout's file: an SD1.5 folder + motion adapter + ControlNets
    pipe = DiffusionPipeline.from_pretrained(
        sd15, motion_adapter=MotionAdapter.from_pretrained(f"{sd15}/../adapter"),
        controlnet=[ControlNetModel.from_pretrained(f"{sd15}/../cn{i}") for i in range(2)],
        custom_pipeline=pipeline_file, trust_remote_code=True)
    checkout = render(pipe)
    try:
        pipe.make_color_video(video, "an edit")
    except ImportError as error:
        print("EDIT:", error)
    np.savez(out, assembled=assembled, checkout=checkout)
    print("IMPORTED:", sorted({m.split(".")[0] for m in sys.modules} & (REFUSED | {"controlnet_aux", "decord"})))
""")


def test_hub_folder_and_checkout_file_work_with_only_diffusers(tmp_path):
    """In a process where this project cannot be imported, the assembled folder and `custom_pipeline=<the checkout's
    pipeline_diffutoon.py>` both load and render the main pass, bit for bit as the installed package does."""
    from diffutoon.tiny import build_tiny_pipeline, tiny_components

    original = build_tiny_pipeline(seed=0)
    hub = assemble(tmp_path / "hub", original)
    sd15 = save_sd15_folder(tmp_path, tiny_components(seed=0))
    np.save(tmp_path / "video.npy", make_video(3, 32))
    np.save(tmp_path / "lineart.npy", make_video(3, 32, seed=3))
    args = dict(prompt="a girl dancing", negative_prompt="bad", num_inference_steps=2, context_length=2,
                context_stride=1, output_type="latent")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))  # a fresh dynamic-module cache
    done = subprocess.run([sys.executable, "-c", ONLY_DIFFUSERS, str(hub), str(sd15),
                           os.path.join(ROOT, "pipeline_diffutoon.py"), str(tmp_path / "out.npz"),
                           json.dumps({**args, "video": str(tmp_path / "video.npy"),
                                       "lineart": str(tmp_path / "lineart.npy")})],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pip install" not in done.stderr, done.stderr  # diffusers' check_imports found nothing to complain about
    assert "IMPORTED: []" in done.stdout  # nor did the main pass import the project, the annotators or decord
    edit = next(line for line in done.stdout.splitlines() if line.startswith("EDIT:"))
    assert "The editing branch needs `attention_processors`, which is not installed: run `pip install -e .`" in edit
    frames = np.load(tmp_path / "out.npz")
    video, lineart = np.load(tmp_path / "video.npy"), np.load(tmp_path / "lineart.npy")
    original.set_progress_bar_config(disable=True)
    expected = original(video=video, conditioning_frames=[lineart, None], generator=torch.Generator().manual_seed(0),
                        **args).frames.numpy()
    np.testing.assert_array_equal(frames["assembled"], expected)
    np.testing.assert_array_equal(frames["checkout"], expected)  # same seed-0 weights, the reference scheduler


def test_assemble_ships_exactly_the_modules_the_import_block_names(tmp_path):
    """Generic over the block: a module added to it ships too; a missing one, branches naming different objects, or a
    module importing what a diffusers-only user lacks fail before anything is written."""
    code = (Path(ROOT) / "pipeline_diffutoon.py").read_text()
    assert main_pass_modules(code)[0]["diffutoon.scheduling"] == ["DiffutoonDDIMScheduler", "ddim_step",
                                                                  "diffutoon_timesteps"]
    # a checkout whose block also names one more module
    shutil.copytree(Path(ROOT) / "diffutoon", tmp_path / "diffutoon", ignore=shutil.ignore_patterns("__pycache__"))
    extra = tmp_path / "diffutoon" / "extra_example.py"
    pipeline_file = tmp_path / "pipeline_diffutoon.py"
    installed = "    DiffutoonDDIMScheduler, ddim_step, diffutoon_timesteps = _import_names("
    relative = "    from .diffutoon.scheduling"
    two = code.replace(installed, '    (Extra,) = _import_names("diffutoon.extra_example", "Extra")\n' + installed).replace(
        relative, "    from .diffutoon.extra_example import Extra  # noqa: F401\n" + relative)
    pipeline_file.write_text(two)
    extra.write_text("import numpy as np\nimport torch\n\n\nclass Extra:\n    def f(self):\n        import cv2  # lazily\n")
    hub_code, files = hub_pipeline_code(pipeline_file)
    assert files["diffutoon_extra_example"] == extra
    assert files["diffutoon_scheduling"] == tmp_path / "diffutoon" / "scheduling.py"
    block = hub_code.split(BLOCK[0])[1].split(BLOCK[1])[0]
    assert "from .diffutoon_extra_example import Extra  # noqa: F401" in block and "_import_names" not in block

    for text, message in {"import cv2\n": "imports cv2",  # at import time: not a diffusers dependency
                          "from diffutoon import video\n": "imports diffutoon",  # another project module
                          "from .scheduling import x\n": "imports relatively"}.items():
        extra.write_text(text)
        with pytest.raises(ValueError, match=message):
            assemble(tmp_path / "hub", tmp_path / "nowhere", pipeline_file=pipeline_file)
    extra.unlink()
    with pytest.raises(FileNotFoundError, match="names diffutoon.extra_example"):
        assemble(tmp_path / "hub", tmp_path / "nowhere", pipeline_file=pipeline_file)
    pipeline_file.write_text(two.replace("from .diffutoon.extra_example import Extra", "from .diffutoon.extra_example import Other"))
    with pytest.raises(ValueError, match="same modules and objects in both branches"):
        assemble(tmp_path / "hub", tmp_path / "nowhere", pipeline_file=pipeline_file)
    assert not (tmp_path / "hub").exists()
