"""apo-ray report: (re)write report.html, results.md and results.json of a run dir."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write report.html for a run dir",
                       description="Draw success curves, interventions, c-mix and training curves of a (finished "
                                   "or running) loop into RUN_DIR/report/report.html; print its path.")
    p.add_argument("--run-dir", required=True, help="local run dir, or s3:// URI (pulled to a local cache)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from apo_ray.errors import UserError
    from apo_ray.report import write_report
    from apo_ray.storage import RunStorage

    st = RunStorage(args.run_dir)
    if st.remote:
        st.pull()
    if not (st.local / "journal.json").exists():
        raise UserError("no journal.json: not an apo_ray loop run dir (or nothing finished yet)", args.run_dir,
                        "pass the --run-dir given to apo-ray loop")
    path = write_report(st.local)
    if st.remote:
        st.push("report")
    print(path)
    return 0
