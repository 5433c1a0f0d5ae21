"""Are two runs of the same config the same run? Every file they share, compared by what it holds.

    .venv/bin/python experiments/compare_runs.py RUN_A RUN_B

For the evidence that a refactoring changed nothing (``docs/results/layout.md``): run the same pipeline
before and after (same seeds, ``--set threads=1``) and compare. Checkpoints (``.pt``) must hold equal
tensors, pictures and videos must be the same bytes, and every other value must be equal once timings,
speeds, file digests and the run's own path are left out (``report.md``, a table of seconds, always
differs). Prints one line per differing file; exits 1 if any differs, 2 if a folder is missing.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

VOLATILE = ("seconds", "elapsed", "time", "started", "finished", "pid", "gflops")
"""Words of the keys (split at ``_``) whose values are timings or process ids; with ``per_s`` (speeds): not
part of what a run computed."""
DIGEST = re.compile(r"^[0-9a-f]{64}$")
"""A file's sha256 (a stage's record of its inputs): it covers the run's own path written inside the file, and
the files themselves are compared directly."""


def _volatile(key: object) -> bool:
    if not isinstance(key, str):
        return False
    return "per_s" in key or any(word in key.split("_") for word in VOLATILE)


def _strip(value, root: Path):
    """``value`` without timing keys, with the run's folder and its ``runs_dir`` written as ``<run>`` and
    ``<runs>``; tensors stay as they are."""
    if isinstance(value, dict):
        return {key: _strip(item, root) for key, item in value.items() if not _volatile(key)}
    if isinstance(value, list | tuple):
        return [_strip(item, root) for item in value]
    if isinstance(value, str):
        if DIGEST.match(value):
            return "<digest>"
        return value.replace(str(root), "<run>").replace(str(root.parent), "<runs>")
    return value


def _json_values(path: Path, root: Path):
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [_strip(json.loads(line), root) for line in text.splitlines() if line.strip()]
    return _strip(json.loads(text), root)


def _same_tensors(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_tensors(a[key], b[key]) for key in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_tensors(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def differs(a: Path, b: Path, roots: tuple[Path, Path]) -> bool:
    """True when the files ``a`` (of the run ``roots[0]``) and ``b`` (of ``roots[1]``) hold different
    results."""
    if a.suffix == ".pt":
        loaded = [_strip(torch.load(path, weights_only=True), root) for path, root in zip((a, b), roots)]
        return not _same_tensors(*loaded)
    if a.suffix in (".json", ".jsonl"):
        return _json_values(a, roots[0]) != _json_values(b, roots[1])
    if a.suffix in (".yaml", ".log", ".md"):
        return _strip(a.read_text(), roots[0]) != _strip(b.read_text(), roots[1])
    return a.read_bytes() != b.read_bytes()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    first, second = (Path(arg).resolve() for arg in argv)
    for folder in (first, second):
        if not folder.is_dir():
            print(f"{folder}: not a folder", file=sys.stderr)
            return 2
    files = {path.relative_to(first) for path in first.rglob("*") if path.is_file()}
    others = {path.relative_to(second) for path in second.rglob("*") if path.is_file()}
    roots = (first, second)
    bad = 0
    for name in sorted(files ^ others):
        print(f"only in {'the first' if name in files else 'the second'}: {name}")
        bad += 1
    for name in sorted(files & others):
        if differs(first / name, second / name, roots):
            print(f"differs: {name}")
            bad += 1
    print(f"{len(files & others)} files compared, {bad} differ or are missing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
