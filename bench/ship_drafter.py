"""Ship a trained drafter inside the package: ``clp_fast/assets/drafters/<name>/`` gets its weights stored
int8-rowwise (:data:`clp_fast.drafts.eagle_model.QUANTIZATIONS`; a 0.5B drafter is 33 MB in bf16, over the 20 MB a
tracked file may take), its config (calibration, CLP) and its training card; with ``--cache`` the card also gets the
held-out numbers of the stored copy beside the trained one's, read on the same positions
(:func:`clp_fast.train.eagle_eval.evaluate_eagle`), so the cost of the storage is measured, not assumed.

    python bench/ship_drafter.py ~/.cache/clp_fast/runs/drafter-0.5b-v3 --model qwen2.5-coder-0.5b-instruct \
        --cache ~/.cache/clp_fast/runs/big-data
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clp_fast.assets import DRAFTERS_DIR  # noqa: E402
from clp_fast.drafts.eagle_model import QUANTIZATIONS, EagleDrafter  # noqa: E402
from clp_fast.train.config import atomic_write_text  # noqa: E402

CARD_FILES = ("training_card.md", "training_card.json")


def held_out_line(label: str, ev: dict) -> str:
    acc = " / ".join(f"{a:.3f}" for a in ev["acc"])
    return f"| {label} | {acc} | {ev['tau']:.3f} |"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("drafter", help="the trained drafter's folder (clp-fast train --drafter eagle --out DIR)")
    p.add_argument("--model", required=True, help="its backbone (name or folder): the name of the shipped folder")
    p.add_argument("--quantize", choices=QUANTIZATIONS, default=QUANTIZATIONS[0])
    p.add_argument("--cache", help="the training data cache: read both copies on its held-out windows")
    p.add_argument("--out-root", default=str(DRAFTERS_DIR))
    args = p.parse_args(argv)
    from clp_fast.models.hub import load_model
    from clp_fast.train.eagle_eval import evaluate_eagle

    src, out = Path(args.drafter), Path(args.out_root) / Path(args.model).name
    model, _ = load_model(args.model, dtype="bf16")
    drafter = EagleDrafter.from_pretrained(src, model=model)
    drafter.save_pretrained(out, dtype=torch.bfloat16, quantize=args.quantize)
    for name in CARD_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    if args.cache:
        depth = len(drafter.extra.get("training", {}).get("heldout", {}).get("acc", [])) or 3
        shipped = EagleDrafter.from_pretrained(out, model=model)
        rows = [held_out_line("as trained (fp32 weights of the saved bf16 file)",
                              evaluate_eagle(drafter, model, Path(args.cache), depth)),
                held_out_line(f"as shipped ({args.quantize})", evaluate_eagle(shipped, model, Path(args.cache), depth))]
        text = (out / "training_card.md").read_text() if (out / "training_card.md").is_file() else ""
        text += ("\n## As shipped\n\n`python bench/ship_drafter.py " + " ".join(sys.argv[1:]) + "`: the same "
                 "held-out windows, the copy in the package against the trained one.\n\n"
                 "| weights | top-1 per depth | chain tau |\n|---|---|---:|\n" + "\n".join(rows) + "\n")
        atomic_write_text(out / "training_card.md", text)
        print("\n".join(rows))
    print(json.dumps({"shipped": str(out), "bytes": (out / "drafter.safetensors").stat().st_size}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
