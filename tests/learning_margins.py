"""The table of `make audit-learning`: each learning test's margin over its threshold, per seed.

Reads the JSON lines the `report_margin` fixture (conftest.py) appends to $REGIONCLIP_MARGINS and
prints, for every (test, quantity), the value and the margin of each seed and the smallest relative
margin (margin / |threshold|), thinnest first.

  python tests/learning_margins.py .learning-margins.jsonl
"""

from __future__ import annotations

import collections
import json
import sys


def table(rows: list[dict]) -> str:
    groups: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
    for r in rows:
        groups[(r["test"], r["what"])].append(r)

    def worst(item):
        return min(r["relative_margin"] for r in item[1])

    lines = [
        "| test | quantity | threshold | value (seed: margin) | min rel. margin |",
        "|---|---|---|---|---|",
    ]
    for (test, what), rs in sorted(groups.items(), key=worst):
        rs = sorted(rs, key=lambda r: r["seed"])
        per_seed = ", ".join(f"{r['value']:.4g} (s{r['seed']}: {r['margin']:+.3g})" for r in rs)
        lines.append(
            f"| {test.split('::', 1)[-1]} | {what} | {rs[0]['threshold']:g} | {per_seed} "
            f"| {min(r['relative_margin'] for r in rs):+.0%} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        print(f"{argv[1]}: no margins recorded", file=sys.stderr)
        return 1
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
