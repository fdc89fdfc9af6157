"""``spamopt <command>``: parses arguments, then calls one function."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="spamopt", description="SPAM optimizer tools")
    commands = parser.add_subparsers(dest="command", required=True)
    spikes = commands.add_parser("spikes", help="gradient-spike telemetry").add_subparsers(dest="action",
                                                                                          required=True)
    report = spikes.add_parser("report", help="plots and a markdown summary of a monitored run")
    report.add_argument("run_dir", type=Path)
    demo = spikes.add_parser("demo", help="monitor a tiny LLaMA on the stdlib source with AdamW and SPAM")
    demo.add_argument("--run-dir", type=Path, default=Path("runs/spikes-demo"))
    demo.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)

    if args.action == "report":
        from spamopt.spikes.report import build_report

        print(build_report(args.run_dir))
    else:
        from spamopt.experiments.spikes_demo import main as demo_main

        for path in demo_main(args.run_dir, args.steps):
            print(path)


if __name__ == "__main__":
    main()
