"""Classify images with a trtnet ResNet engine and print the top 5 classes with their names.

    python demos/classify.py weights/resnet50.fp16.224.engine cat.jpg dog.jpg
    python demos/classify.py resnet50 photos/*.jpg --names imagenet_classes.txt --topk 3

Class names come from --names (a text file with one name per line, or imagenet_class_index.json),
else from the engine's metadata, else the class index is shown.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from trtnet.cli import command_parser, run  # noqa: E402
from trtnet.errors import TrtnetError  # noqa: E402


def read_names(path: str) -> list[str]:
    """One name per line, or {"0": ["n01440764", "tench"], …} (imagenet_class_index.json)."""
    text = Path(path).read_text()
    if path.endswith(".json"):
        index = json.loads(text)
        return [index[str(i)][-1] for i in range(len(index))]
    return [line.strip() for line in text.splitlines() if line.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    p = command_parser("classify", "Top-k ImageNet classes of images with a ResNet engine.")
    p.prog = "python demos/classify.py"
    p.add_argument("engine", help="engine path or name (resnet50 → weights/resnet50.fp16.224.engine)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--topk", type=int, default=5, help="classes to show per image")
    p.add_argument("--names", help="class names: text file (one per line) or imagenet_class_index.json")
    p.add_argument("--weights-dir", default=os.environ.get("TRTNET_WEIGHTS", "weights"))
    args = p.parse_args(argv)

    from trtnet.api import Classifier

    with Classifier(args.engine, weights_dir=args.weights_dir) as classifier:
        if args.names:
            try:
                classifier.names = read_names(args.names)
            except (OSError, ValueError, KeyError) as exc:
                raise TrtnetError(f"--names {args.names}: {exc}") from exc
        for path in args.images:
            try:
                result = classifier.classify(path, topk=args.topk)[0]
            except TrtnetError as exc:
                print(f"warning: skipping {exc}", file=sys.stderr)
                continue
            print(path)
            for name, score in zip(result.names, result.scores):
                print(f"  {score:6.1%}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
