"""Regenerate the files derived from ``service.settings.Settings``: the README table and the chart schema."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from service.settings import markdown_table

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    pattern = re.compile(r"\| flag \| environment \| default \| description \|\n(?:\|.*\|\n)+")
    if not pattern.search(text):
        sys.exit("README.md has no settings table to replace")
    readme.write_text(pattern.sub(lambda _: markdown_table() + "\n", text, count=1))
    subprocess.run([sys.executable, "-m", "scripts.gen_chart_schema"], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
