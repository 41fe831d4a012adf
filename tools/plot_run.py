#!/usr/bin/env python3
"""Write the PNG plots of a megashear run: ``python tools/plot_run.py RUN_DIR [--out DIR]``."""

from __future__ import annotations

import argparse
import os
import sys

from megashear.cli import report_error


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", help="a run directory holding events.jsonl")
    parser.add_argument("--out", help="output directory (default RUN_DIR/plots)")
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.run_dir, "events.jsonl")):
        return report_error(ValueError(f"{args.run_dir} has no events.jsonl"))
    from megashear.plots import write_plots

    for path in write_plots(args.run_dir, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
