"""Hugging Face Space entry point: `python app.py` serves the Diffutoon web app (`diffutoon ui`).

Options come from the command line or from the DIFFUTOON_UI_ARGS environment variable (a Space's settings), e.g.
DIFFUTOON_UI_ARGS="--base your/sd15-anime-checkpoint". With no model option the app uses the real models when they
are in the local Hugging Face cache, else the tiny random-weight demo models (labelled as such in the page).
A Space sets GRADIO_SERVER_NAME / GRADIO_SERVER_PORT; elsewhere the app listens on 127.0.0.1:7860.
"""

import os
import shlex
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the package beside this file, installed or not
    from diffutoon.__main__ import main

    sys.exit(main(["ui", *shlex.split(os.environ.get("DIFFUTOON_UI_ARGS", "")), *sys.argv[1:]]))
