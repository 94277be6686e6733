"""Write the King James Bible (public domain) as a corpus, one chapter per document (blank-line separated).

The text comes from Debian's ``bible-kjv`` package (``apt-get install bible-kjv``), which any machine with the
Debian registry can install without a model hub. Usage: python scripts/get_kjv_corpus.py OUT.txt
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

if shutil.which("bible") is None:
    sys.exit("the `bible` program is missing: apt-get install -y bible-kjv")
raw = subprocess.run(["bible", "-f", "Ge1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
chapters: dict[str, list[str]] = {}
for line in raw.splitlines():
    m = re.match(r"^(\w+?)(\d+):(\d+) (.*)$", line.strip())
    if m:
        chapters.setdefault(f"{m.group(1)}{m.group(2)}", []).append(m.group(4).strip())
out = Path(sys.argv[1])
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text("\n\n".join(" ".join(v) for v in chapters.values()) + "\n")
print(f"{len(chapters)} chapters, {sum(len(' '.join(v).split()) for v in chapters.values()):,} words -> {out}")
