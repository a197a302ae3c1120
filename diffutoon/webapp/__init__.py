"""The web app (`diffutoon ui`, app.py), one concern per module; each imports only those listed above it:

    settings.py   what the page asks for, the limits, the page's defaults, one-line messages in the page's words
    loading.py    the models, loaded once per accelerator (through diffutoon.models), and the pipeline's arguments
    jobs.py       one render of one session: its folder and job.json (survives a restart), the upload's details
    progress.py   the pipeline's progress as the page shows it, the condition previews, the progress block's HTML
    manager.py    JobManager: checks, the queue (one worker per accelerator), Cancel / Resume, recovery, served files
    page.py       the Gradio page and `serve` (the only module that imports Gradio)
"""
