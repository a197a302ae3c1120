"""`diffutoon render` with the tiny models, for tests/test_distributed.py to launch under torchrun:

    torchrun --standalone --nproc-per-node=2 tests/distributed_job.py CLIP -o OUT [render options]

The Hub models are replaced by the tiny random ones (the same for every process); everything else is the real CLI.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tiny_load(args, device, dtype):
    """Stands in for the CLI's `_load_pipeline`: the tiny pipeline and lineart detector."""
    from diffutoon.tiny import build_tiny_pipeline, tiny_lineart_detector

    return build_tiny_pipeline(seed=0).to(device), tiny_lineart_detector()


if __name__ == "__main__":
    from diffutoon import cli

    torch.set_num_threads(1)
    cli._check_sources = lambda sources: None  # the default Hub models are not cached here
    cli._load_pipeline = tiny_load
    sys.exit(cli.main(["render", *sys.argv[1:]]))
