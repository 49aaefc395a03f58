"""apo-ray export-hf: a tiny checkpoint -> a self-contained HF VLA directory for ``model.kind: hf``."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-hf", help="export a tiny checkpoint as an HF VLA dir (model.kind: hf)",
                       description="Write config.json (with auto_map), the modeling code, safetensors and the "
                                   "tokenizer, as an OpenVLA-style local directory that model.kind: hf loads "
                                   "with trust_remote_code and LoRA. It exercises the hf path (LoRA, bf16, "
                                   "DeepSpeed) without a model hub. Prints a JSON summary as the last stdout line.")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a tiny checkpoint (apo-ray train, one "
                                                                       "camera view, no proprio)")
    p.add_argument("--out", required=True, metavar="DIR", help="output dir (written atomically)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from apo_ray import fsio
    from apo_ray.model import export_hf

    fsio.refuse_source_tree(args.out, "--out")
    out = export_hf(args.checkpoint, args.out)
    print(json.dumps({"out": str(out), "files": sorted(p.name for p in out.iterdir())}))
    return 0
