"""``python -m robustdl.zoo train NAME`` retrains a bundled model; ``measure NAME`` re-measures its card; ``list``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from robustdl import zoo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m robustdl.zoo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the recipes and which weights are bundled")
    train = sub.add_parser("train", help="train a model by its recipe and write weights and card")
    train.add_argument("name", choices=sorted(zoo.RECIPES))
    train.add_argument("--device", default="cpu")
    train.add_argument("--no-progress", action="store_true")
    train.add_argument("--checkpoint", type=Path, help="write a checkpoint every epoch; resume from it if present")
    train.add_argument("--folder", type=Path, default=zoo.ZOO_DIR, help="where to write weights and card")
    measure = sub.add_parser("measure", help="re-measure a model card's robust accuracies from its stored weights")
    measure.add_argument("name", choices=sorted(zoo.RECIPES))
    measure.add_argument("--device", default="cpu")
    measure.add_argument("--folder", type=Path, default=zoo.ZOO_DIR, help="where its weights and card are")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, recipe in sorted(zoo.RECIPES.items()):
            mark = "bundled" if name in zoo.available() else "not bundled"
            print(f"{name:20s} {mark:12s} {recipe.description}")
    elif args.command == "measure":
        print(json.dumps(zoo.measure(args.name, folder=args.folder, device=args.device), indent=2))
    else:
        model_card = zoo.train(args.name, device=args.device, progress=False if args.no_progress else None,
                               checkpoint=args.checkpoint, folder=args.folder)
        print(json.dumps(model_card, indent=2))


if __name__ == "__main__":
    main()
