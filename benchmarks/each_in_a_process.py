"""Benchmarks that run each case in a process of its own (its peak RSS, its imports, its
failures its own): ``in_process(script, key)`` runs ``script --one key`` and returns the JSON its
last line prints, or the error it ended with; ``entry(one, main)`` is such a script's ``__main__``."""

from __future__ import annotations

import json
import subprocess
import sys


def in_process(script: str, key) -> dict | list:
    out = subprocess.run([sys.executable, script, "--one", str(key)], capture_output=True, text=True)
    if out.returncode:
        lines = out.stderr.strip().splitlines() or ["no output"]
        return {"error": lines[-1][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def entry(one, main) -> None:
    """``script --one KEY`` prints ``one(KEY)`` as JSON; ``script [args]`` runs ``main(args)``."""
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2])))
    else:
        main(sys.argv[1:])
