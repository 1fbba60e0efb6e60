"""Where the CPU goes, from py-spy's collapsed stacks (``side_by_side.py --profile FILE``).

    python load/stacks.py FILE... [--top 30] [--match ratelimitd]

Prints, per function (name and file, lines merged), the share of samples in
which it is on the stack (inclusive) and on top (self). ``--match`` keeps only
functions whose file contains that text in the inclusive table.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def function(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    parts = Path(m.group("file")).parts
    short = "/".join(parts[parts.index("ratelimitd") :]) if "ratelimitd" in parts else "/".join(parts[-2:])
    return f"{m.group('name')} ({short})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--match", default="", help="only functions whose file contains this (inclusive table)")
    args = ap.parse_args()
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for f in args.files:
        for line in Path(f).read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = [function(fr) for fr in stack.split(";")]
            for name in set(frames):
                inclusive[name] += n
            own[frames[-1]] += n
    if not total:
        print("no samples")
        return 1
    print(f"{total} samples")
    print(f"\n{'inclusive':>9}  function")
    shown = [(k, v) for k, v in inclusive.most_common() if args.match in k][: args.top]
    for name, n in shown:
        print(f"{100 * n / total:>8.1f}%  {name}")
    print(f"\n{'self':>9}  function")
    for name, n in own.most_common(args.top):
        print(f"{100 * n / total:>8.1f}%  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
