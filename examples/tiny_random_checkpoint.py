"""Write a tiny randomly initialised llava-hf checkpoint (for `make demo` and experiments without
downloads). Its answers are noise: it shows the pipeline, not a trained model.

    python examples/tiny_random_checkpoint.py out/tiny-llava [--kind llava_next]
"""

import argparse

from llava.testing import build_tiny_checkpoint

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("folder")
parser.add_argument("--kind", choices=["llava", "llava_next"], default="llava")
args = parser.parse_args()
print(build_tiny_checkpoint(args.folder, kind=args.kind, pad=args.kind == "llava"))
