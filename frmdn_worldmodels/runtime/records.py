"""Stages that know what they were made from.

Every stage of the pipeline writes ``made_from.json`` into its folder: the settings its output depends on and
a digest of every upstream stage's output (the VAE's weights, the episode and latent files, the memory's
weights, ...). When the stage runs again:

- same fingerprint, finished: the stage is skipped (its ``summary.json`` is returned);
- same fingerprint, unfinished: the stage resumes (its checkpoints were made from the same inputs);
- another fingerprint: the folder is **stale** (say a retrained VAE under an old memory). It is cleared and
  the stage is redone, or, with ``stale: refuse`` (``--refuse-stale``), refused with the list of what changed.
  Downstream stages then see a new digest of this one's output, so a new V is never mixed with an old M or C.

Some settings only extend a stage's work (``vae.epochs``, ``memory_train.epochs``, ``controller.generations``,
``collect.episodes``): a larger value continues the finished stage from where it stopped, a smaller one makes
it stale. Settings that change no result (log and checkpoint cadence, worker counts, timeouts) are left out.

The record also keeps the stage's wall ``seconds`` of work, added up over the invocations that finished or
continued it, so a pipeline rerun that skips the stage still reports what it cost (``recorded_seconds``); the
stages update it wherever they save work (``Stage.record_progress``), so a killed invocation keeps the time of
what it saved.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from frmdn_worldmodels.runtime.config import Config, ConfigError, config_to_dict
from frmdn_worldmodels.runtime.io import DataError, read_json, write_json
from frmdn_worldmodels.runtime.paths import prepare_stage, run_paths
from frmdn_worldmodels.runtime.progress import note
from frmdn_worldmodels.runtime.registry import RECORDED, StageSpec

MADE_FROM = "made_from.json"


def _flat(values: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(values, dict):
        return {prefix: values}
    return {
        key: value
        for name, inner in values.items()
        for key, value in _flat(inner, f"{prefix}.{name}").items()
    }


def _within(key: str, names: tuple[str, ...]) -> bool:
    return any(key == name or key.startswith(name + ".") for name in names)


def stage_settings(cfg: Config, spec: StageSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the settings that must match, the extendable ones), as flat ``dotted.key: value`` dicts."""
    everything = _flat(config_to_dict(cfg), "")
    everything = {key[1:]: value for key, value in everything.items()}
    chosen = {key: value for key, value in everything.items() if _within(key, spec.settings)}
    strict = {key: value for key, value in chosen.items() if not _within(key, spec.neutral + spec.extendable)}
    extent = {key: value for key, value in chosen.items() if _within(key, spec.extendable)}
    return strict, extent


def file_digest(path: Path) -> str:
    """sha256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def output_digest(cfg: Config, name: str) -> str | None:
    """A digest of stage ``name``'s output as it is on disk now (None when it has made nothing yet): its own
    fingerprint and its output files (patterns by names and sizes, single files by content)."""
    spec = RECORDED[name]
    folder = run_paths(cfg).of(name)
    record = _read_record(folder)
    if record is None:
        return None
    parts: dict[str, Any] = {"made_from": record.get("fingerprint"), "extent": record.get("extent")}
    for pattern in spec.outputs:
        if "*" in pattern:
            parts[pattern] = [(path.name, path.stat().st_size) for path in sorted(folder.glob(pattern))]
        else:
            path = folder / pattern
            parts[pattern] = file_digest(path) if path.exists() else None
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _read_record(folder: Path) -> dict | None:
    try:
        record = read_json(folder / MADE_FROM)
    except DataError:
        return None
    return record if isinstance(record, dict) else None


def recorded_seconds(folder: Path) -> float | None:
    """Wall seconds the stage in ``folder`` has worked, summed over the invocations that finished or continued
    it (an invocation killed before its end adds the time up to the last work it saved); None: no record, or
    one written before stages timed themselves."""
    record = _read_record(folder)
    return None if record is None else _seconds_of(record)


def _seconds_of(record: dict) -> float | None:
    seconds = record.get("seconds")
    return float(seconds) if isinstance(seconds, int | float) else None


LEGACY_BEHAVIOUR = {"memory.heads_read_z": False, "memory_train.carry_state": False}
"""Settings added with a default that changed what the stage does: the value a record that lacks them was made
with."""


def _differences(before: dict, now: dict) -> list[str]:
    """``key: before -> now`` for every setting that differs. A setting the record lacks was made with the
    behaviour of the version before it: its default, unless ``LEGACY_BEHAVIOUR`` says otherwise."""
    defaults = {key[1:]: value for key, value in _flat(config_to_dict(Config()), "").items()}
    defaults |= LEGACY_BEHAVIOUR
    return [
        f"{key}: {before.get(key, defaults.get(key))!r} -> {now.get(key)!r}"
        for key in sorted(set(before) | set(now))
        if before.get(key) != now.get(key) and not (key not in before and now.get(key) == defaults.get(key))
    ]


class Stage:
    """One stage's folder, checked against what the stage would be made from now (see the module
    docstring)."""

    def __init__(self, cfg: Config, name: str, folder: Path | None = None, inputs: dict | None = None):
        """``folder``: where this stage's output goes, when not the run's own (a cell of the Table 1
        sweep); ``inputs``: what else the output is made from (the weights a training starts from, ...), as
        plain data."""
        self.cfg, self.name, self.spec = cfg, name, RECORDED[name]
        self.folder = folder if folder is not None else run_paths(cfg).of(name)
        settings, self.extent = stage_settings(cfg, self.spec)
        upstream = {stage: output_digest(cfg, stage) for stage in self.spec.upstream}
        self.fingerprint = {"settings": settings, "inputs": {**upstream, **(inputs or {})}}
        self._seconds_before: float | None = 0.0
        self._opened_at: float | None = None

    def stale_reasons(self) -> list[str]:
        """Why the folder's content was not made from this stage's inputs now (empty: it was, or is empty)."""
        if not self.folder.exists() or not any(self.folder.iterdir()):
            return []
        record = _read_record(self.folder)
        if record is None:
            return [f"{self.folder / MADE_FROM} is missing or unreadable"]
        before = record.get("fingerprint") or {}
        reasons = _differences(before.get("settings") or {}, self.fingerprint["settings"])
        reasons += [
            f"the output of {source} changed since" if source in RECORDED else f"its input {source} changed"
            for source, digest in self.fingerprint["inputs"].items()
            if (before.get("inputs") or {}).get(source) != digest
        ]
        recorded_extent = record.get("extent") or {}
        reasons += [
            f"{key}: {recorded_extent[key]!r} -> {value!r} (less than was done)"
            for key, value in self.extent.items()
            if key in recorded_extent and isinstance(value, int | float) and value < recorded_extent[key]
        ]
        return reasons

    def open(self) -> dict | None:
        """Make the folder hold work of this fingerprint (clearing a stale one, or refusing it with
        ``stale: refuse``); return the stage's summary if it is finished, else None (run or resume it)."""
        reasons = self.stale_reasons()
        if reasons and _read_record(self.folder) is None:
            # not known to be ours (made before stages recorded their inputs, or another program's): never
            # deleted, whatever the policy
            raise ConfigError(
                f"{self.name}: {self.folder} holds files but no {MADE_FROM}, so what they were made from is "
                "unknown (an older version of this program made them, or another one): move or delete the "
                "folder to redo the stage"
            )
        if reasons:
            listed = "\n  ".join(reasons[:12])
            if self.cfg.stale == "refuse":
                raise ConfigError(
                    f"{self.name}: {self.folder} is stale, it was made from other inputs:\n  {listed}\n"
                    "rerun without --refuse-stale (stale: redo) to redo it"
                )
            note(f"[{self.name}] {self.folder} was made from other inputs; redoing it:\n  {listed}")
            shutil.rmtree(self.folder)
        elif (summary := self._finished_summary()) is not None:  # not stale: already checked
            # collect and encode check every file of a finished stage and finish it again: keep its time
            self._seconds_before = _seconds_of(_read_record(self.folder) or {})
            return summary
        prepare_stage(self.cfg, self.folder, root=self.folder == run_paths(self.cfg).of(self.name))
        # the stage's work time adds up over invocations: a resumed or continued stage keeps what it spent (a
        # record from before stages timed themselves leaves it unknown)
        record = _read_record(self.folder)
        self._seconds_before = 0.0 if record is None else _seconds_of(record)
        self._opened_at = time.monotonic()
        self._write_record(finished=False, seconds=self._seconds_before)
        return None

    def done(self) -> dict | None:
        """The summary of this stage's finished work in the folder, if it was made from these inputs (no side
        effects)."""
        return None if self.stale_reasons() else self._finished_summary()

    def _finished_summary(self) -> dict | None:
        """The summary of the folder's work if its record says it finished with this extent."""
        record = _read_record(self.folder)
        if record is None or not record.get("finished") or record.get("extent") != self.extent:
            return None
        try:
            return read_json(self.folder / "summary.json")
        except DataError:
            return None

    def _seconds_now(self) -> float | None:
        spent = 0.0 if self._opened_at is None else time.monotonic() - self._opened_at
        return None if self._seconds_before is None else self._seconds_before + spent

    def record_progress(self) -> None:
        """Record the work time so far in the unfinished stage's record: called where the stage has just
        saved its work (a checkpoint, an episode file), so an invocation killed later keeps the time of the
        work it saved, and a resumed stage's total is that of one uninterrupted invocation."""
        if self._opened_at is not None:
            self._write_record(finished=False, seconds=self._seconds_now())

    def finish(self, summary: dict) -> dict:
        """Write the stage's ``summary.json`` and mark it finished; returns ``summary``."""
        write_json(self.folder / "summary.json", summary)
        self._write_record(finished=True, seconds=self._seconds_now())
        return summary

    def _write_record(self, finished: bool, seconds: float | None) -> None:
        record = {"stage": self.name, "fingerprint": self.fingerprint, "extent": self.extent}
        seconds = None if seconds is None else round(seconds, 1)
        write_json(self.folder / MADE_FROM, {**record, "finished": finished, "seconds": seconds})

    @property
    def key(self) -> str:
        """A short digest of the fingerprint, for checkpoints that must match it."""
        return hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True, default=str).encode()).hexdigest()
