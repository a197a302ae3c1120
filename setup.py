"""Diffutoon for diffusers: high-resolution toon shading of whole videos as a community pipeline."""

from setuptools import find_packages, setup

setup(
    name="diffutoon",
    version="0.1.0",
    description="Diffutoon (Duan et al. 2024) as a diffusers community pipeline: video to anime with "
    "sliding-window AnimateDiff + ControlNet, an editing branch and FastBlend deflickering.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    py_modules=["pipeline_diffutoon"],
    packages=find_packages(include=["diffutoon", "diffutoon.*", "attention_processors", "attention_processors.*", "fastblend", "fastblend.*"]),
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "diffusers>=0.42",
        "transformers>=5",
        "accelerate>=1.0",
        "peft>=0.15",
        "huggingface-hub>=1.0",
        "safetensors>=0.4",
        "controlnet-aux>=0.0.10",
        "decord>=0.6",
        "imageio-ffmpeg>=0.5",
        "opencv-python-headless>=4.8",
        "scikit-image>=0.22",  # the demo's real photograph
        "numpy>=1.26",
        "pillow>=10",
        "tqdm>=4.66",
        "scenedetect-headless>=0.7",  # scene_cuts="auto" (PySceneDetect's content detector, imported when used)
    ],
    extras_require={
        # the web app (`diffutoon ui`, app.py)
        "ui": ["gradio>=6.0"],
        # the suite, including the web app's tests and its real-browser test (Debian: apt install chromium chromium-driver)
        "test": ["pytest>=8", "pytest-xdist>=3.5", "gradio>=6.0", "selenium>=4.11"],
    },
    entry_points={"console_scripts": ["diffutoon=diffutoon.__main__:main"]},
)
