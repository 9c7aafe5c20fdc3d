"""One ``pagellm bench`` run in a subprocess, for the GPU benchmark scripts (imported beside them)."""
from __future__ import annotations

import json
import os
import subprocess
import time
import traceback


def run_bench(cmd: list[str], path: str, timeout: int) -> dict:
    """Run ``cmd`` (``python ... bench ... --json path``): ``command`` (path shown as X.json),
    ``wall_s`` and the JSON it wrote (``data``), or ``error`` with the end of its stderr."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:], "command": " ".join(cmd)}
    with open(path) as f:
        data = json.load(f)
    os.remove(path)
    return {"command": " ".join(cmd[1:]).replace(path, "X.json"), "wall_s": time.perf_counter() - start,
            "data": data}


def run_section(result: dict, name: str, section, path: str) -> None:
    """``result[name] = section()`` (its traceback when it raises), timed, and ``result`` saved to ``path``
    after every section, so a run cut short keeps what it made."""
    start = time.perf_counter()
    try:
        result[name] = section()
    except Exception:
        result[name] = {"error": traceback.format_exc()}
    print(f"[{name}] {time.perf_counter() - start:.0f} s", flush=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
