"""apo-ray export-hdf5: episode Parquet files -> one robomimic-format HDF5 dataset."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-hdf5", help="export episodes as a robomimic HDF5 dataset",
                       description="Write data/demo_i/{obs/*, next_obs/*, actions, rewards, dones, states, c, "
                                   "intervention_id} with env_args in the data attrs; robomimic's "
                                   "SequenceDataset loads it. Prints a JSON summary as the last stdout line.")
    p.add_argument("--episodes", nargs="+", required=True, metavar="DIR", help="episode dirs (apo-ray collect)")
    p.add_argument("--out", required=True, metavar="FILE", help="output .hdf5 file (written atomically)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from apo_ray import fsio
    from apo_ray.hdf5 import export_hdf5

    fsio.refuse_source_tree(args.out, "--out")
    print(json.dumps(export_hdf5(args.episodes, args.out)))
    return 0
