"""Compare two JUnit XML reports of Celery's integration tests: plain vs ReliableTask.

Usage: python tests/peer/compare.py PLAIN.xml RELIABLE.xml [--markdown OUT.md]

Prints the counts of each run and every test whose outcome differs; exits 1 when a test
that passed plain does not pass with the extension (the target is none).
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections import Counter

#: Outcomes, as read from a JUnit <testcase>.
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


def outcomes(path: str) -> dict[str, str]:
    """Test id -> outcome (``passed``, ``failed``, ``skipped``) of one JUnit XML report."""
    result: dict[str, str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            result[name] = FAILED
        elif case.find("skipped") is not None:
            result[name] = SKIPPED
        else:
            result[name] = PASSED
    return result


def summary(results: dict[str, str]) -> str:
    counts = Counter(results.values())
    return ", ".join(f"{counts.get(k, 0)} {k}" for k in (PASSED, FAILED, SKIPPED))


def compare(plain: dict[str, str], reliable: dict[str, str]) -> list[tuple[str, str, str]]:
    """Every test whose outcome differs: ``(test, plain outcome, reliable outcome)``."""
    names = sorted(set(plain) | set(reliable))
    return [
        (n, plain.get(n, "missing"), reliable.get(n, "missing"))
        for n in names
        if plain.get(n, "missing") != reliable.get(n, "missing")
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plain")
    parser.add_argument("reliable")
    parser.add_argument("--markdown", help="also write the result as a markdown table here")
    ns = parser.parse_args(argv)
    plain, reliable = outcomes(ns.plain), outcomes(ns.reliable)
    diff = compare(plain, reliable)
    regressions = [d for d in diff if d[1] == PASSED]
    lines = [
        f"plain:    {summary(plain)}",
        f"reliable: {summary(reliable)}",
        f"differences: {len(diff)}, passing plain but not with the extension: {len(regressions)}",
    ]
    lines += [f"  {name}: {a} -> {b}" for name, a, b in diff]
    print("\n".join(lines))
    if ns.markdown:
        table = ["| test | plain | with ReliableTask |", "|---|---|---|"]
        table += [f"| `{name}` | {a} | {b} |" for name, a, b in diff] or ["| (none) | | |"]
        with open(ns.markdown, "w") as out:
            out.write("\n".join([*(f"- {line}" for line in lines[:3]), "", *table, ""]))
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
