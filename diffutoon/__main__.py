"""The `diffutoon` command (its console script, and `python -m diffutoon ...`): `diffutoon.cli` with the `ui`
subcommand served by the web app. The web app sits above the CLI (it renders with the CLI's options and checks), so
this module, not the CLI, brings the two together and the package's imports have no circle."""

import sys

from . import cli


def serve_ui(args):
    from .webapp.page import serve  # Gradio is an optional extra: imported only for this command

    return serve(args)


def main(argv=None):
    return cli.main(argv, serve_ui=serve_ui)


if __name__ == "__main__":
    sys.exit(main())
