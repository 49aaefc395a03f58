"""apo-ray export-hf: a checkpoint -> a self-contained HF VLA directory (a tiny one for ``model.kind: hf``;
an hf one ``--merged``, base + adapter, that the model's own ``predict_action`` loads)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-hf", help="export a checkpoint as an HF VLA dir (tiny: for model.kind hf; "
                                         "hf: --merged, for the model's own predict_action)",
                       description="Write config.json (with auto_map), the modeling code, safetensors and the "
                                   "tokenizer, as an OpenVLA-style local directory that model.kind: hf loads "
                                   "with trust_remote_code and LoRA. It exercises the hf path (LoRA, bf16, "
                                   "DeepSpeed) without a model hub. An hf checkpoint exports --merged: the base "
                                   "with the LoRA adapter merged, the base's code/tokenizer/processor files, and "
                                   "norm_stats[unnorm key] for predict_action(..., unnorm_key=...). Robosuite's "
                                   "gripper is a = 1 - 2 g of an OpenVLA's g. Prints a JSON summary as the last "
                                   "stdout line.")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a checkpoint (apo-ray train; a tiny one "
                                                                       "with one camera view and no proprio)")
    p.add_argument("--merged", action="store_true", help="hf checkpoint: merge the adapter into the base")
    p.add_argument("--out", required=True, metavar="DIR", help="output dir (written atomically)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from apo_ray import fsio
    from apo_ray.model import export_hf

    fsio.refuse_source_tree(args.out, "--out")
    out = export_hf(args.checkpoint, args.out, merged=args.merged)
    print(json.dumps({"out": str(out), "files": sorted(p.name for p in out.iterdir())}))
    return 0
