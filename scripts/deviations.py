"""The README's table of known deviations from the papers' code, made from tests/transcribed/<preset>.yaml (the
settings transcribed from the official scripts and the deviations kept on purpose, each with its reason):

    python scripts/deviations.py            # print the table
    python scripts/deviations.py --check    # exit 1 if README.md's table differs from it
    python scripts/deviations.py --write    # put it into README.md (between its markers)

One line per preset, setting and kept value (the rows it concerns joined; `* except R` for every row but R, which
runs the official value); the full official / ours values and the source
lines are in the YAML files."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- deviations: begin (python scripts/deviations.py) -->", "<!-- deviations: end -->"


def short(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= n else text[: n - 1].rstrip() + "…"


def table() -> str:
    lines = ["| preset | setting | rows (tasks) | the official code | here, and why |", "|---|---|---|---|---|"]
    for path in sorted((ROOT / "tests" / "transcribed").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        groups: dict[tuple, list[dict]] = {}  # one line per setting and value: rows that keep another value get theirs
        for d in spec.get("deviations") or []:
            groups.setdefault((d["key"], str(d.get("official")), str(d.get("ours")), d["reason"]), []).append(d)
        for (key, *_), ds in groups.items():
            where = sorted(
                {
                    f"{d.get('row', '*')}"
                    + (f" ({d['task']})" if d.get("task", "*") != "*" else "")
                    + (f" except {', '.join(d['except'])}" if d.get("except") else "")
                    for d in ds
                }
            )
            first = ds[0]
            lines.append(
                f"| {spec['preset']} | {key} | {short(', '.join(where), 120)} | {short(first.get('official'), 90)} | "
                f"{short(first.get('ours'), 70)}: {short(first['reason'])} |"
            )
    return "\n".join(lines)


def main() -> int:
    text = table()
    if "--write" in sys.argv:
        path = ROOT / "README.md"
        readme = path.read_text(encoding="utf-8")
        head, rest = readme.split(BEGIN, 1)
        path.write_text(f"{head}{BEGIN}\n{text}\n{END}{rest.split(END, 1)[1]}", encoding="utf-8")
        return 0
    if "--check" in sys.argv:
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        inside = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip() if BEGIN in readme else ""
        if inside != text:
            print("README.md's deviations table differs from tests/transcribed/: run python scripts/deviations.py")
            return 1
        return 0
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
