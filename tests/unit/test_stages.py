"""Stages that know what they were made from (``frmdn_worldmodels.runtime.records``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from frmdn_worldmodels.runtime import records as stages
from frmdn_worldmodels.runtime.config import ConfigError, load_config
from frmdn_worldmodels.runtime.io import read_json, write_json
from frmdn_worldmodels.runtime.records import MADE_FROM, Stage, output_digest, recorded_seconds


def cfg(tmp_path, *overrides):
    return load_config(None, [f"runs_dir={tmp_path}", *overrides])


def finished_vae(tmp_path, *overrides, weights=b"weights"):
    """A train-vae stage made and finished by hand, its vae.pt holding ``weights``."""
    stage = Stage(cfg(tmp_path, *overrides), "train-vae")
    assert stage.open() is None
    (stage.folder / "vae.pt").write_bytes(weights)
    stage.finish({"val_loss": 1.0})
    return stage


def test_a_finished_stage_is_skipped_and_a_changed_setting_makes_it_stale(tmp_path):
    stage = finished_vae(tmp_path)
    assert read_json(stage.folder / MADE_FROM)["finished"]
    assert Stage(cfg(tmp_path), "train-vae").open() == {"val_loss": 1.0}
    # log and checkpoint cadence change no result
    assert Stage(cfg(tmp_path, "vae.log_every=3", "vae.checkpoint_every=7"), "train-vae").done() is not None

    changed = Stage(cfg(tmp_path, "vae.lr=0.002"), "train-vae")
    assert changed.stale_reasons() == ["vae.lr: 0.001 -> 0.002"]
    with pytest.raises(ConfigError, match=r"vae.lr: 0.001 -> 0.002"):
        Stage(cfg(tmp_path, "vae.lr=0.002", "stale=refuse"), "train-vae").open()
    assert (stage.folder / "vae.pt").exists(), "a refused stage is left as it is"
    assert changed.open() is None  # redone: cleared, an unfinished record of the new fingerprint
    assert not (stage.folder / "vae.pt").exists()
    assert read_json(stage.folder / MADE_FROM)["fingerprint"] == changed.fingerprint


def test_extending_settings_continue_a_finished_stage_and_fewer_make_it_stale(tmp_path):
    finished_vae(tmp_path, "vae.epochs=3")
    more = Stage(cfg(tmp_path, "vae.epochs=5"), "train-vae")
    assert more.stale_reasons() == [] and more.done() is None  # not finished: it goes on from epoch 3
    assert more.open() is None and (more.folder / "vae.pt").exists()
    fewer = Stage(cfg(tmp_path, "vae.epochs=2"), "train-vae")
    assert fewer.stale_reasons() == ["vae.epochs: 5 -> 2 (less than was done)"]


def test_an_upstream_output_that_changed_makes_the_downstream_stage_stale(tmp_path):
    finished_vae(tmp_path)
    encode = Stage(cfg(tmp_path), "encode")
    encode.open()
    encode.finish({"encoded": 0})
    before = output_digest(cfg(tmp_path), "train-vae")
    assert Stage(cfg(tmp_path), "encode").done() == {"encoded": 0}
    # the VAE retrained with the same settings but other weights: its digest is its file's content
    (Stage(cfg(tmp_path), "train-vae").folder / "vae.pt").write_bytes(b"other weights")
    assert output_digest(cfg(tmp_path), "train-vae") != before
    assert Stage(cfg(tmp_path), "encode").stale_reasons() == ["the output of train-vae changed since"]


def test_a_folder_without_a_record_is_stale_and_a_new_setting_at_its_default_is_not(tmp_path):
    folder = Stage(cfg(tmp_path), "train-vae").folder
    folder.mkdir(parents=True)
    (folder / "vae.pt").write_bytes(b"from an older version")
    reasons = Stage(cfg(tmp_path), "train-vae").stale_reasons()
    assert reasons == [f"{folder / MADE_FROM} is missing or unreadable"]
    with pytest.raises(ConfigError, match="move or delete the folder"):  # never deleted: not known to be ours
        Stage(cfg(tmp_path), "train-vae").open()
    assert (folder / "vae.pt").read_bytes() == b"from an older version"

    stage = finished_vae(tmp_path / "b")
    record = read_json(stage.folder / MADE_FROM)
    del record["fingerprint"]["settings"]["vae.grad_clip"]  # made before the setting existed
    write_json(stage.folder / MADE_FROM, record)
    assert Stage(cfg(tmp_path / "b"), "train-vae").stale_reasons() == []
    assert Stage(cfg(tmp_path / "b", "vae.grad_clip=1.0"), "train-vae").stale_reasons() == [
        "vae.grad_clip: 0.0 -> 1.0"
    ]

    # a setting whose default changed what the stage does: a record without it was made the old way
    memory = Stage(cfg(tmp_path / "c"), "train-memory")
    memory.open()
    memory.finish({"done": True})
    record = read_json(memory.folder / MADE_FROM)
    del record["fingerprint"]["settings"]["memory.heads_read_z"]
    write_json(memory.folder / MADE_FROM, record)
    assert Stage(cfg(tmp_path / "c"), "train-memory").stale_reasons() == [
        "memory.heads_read_z: False -> True"
    ]
    assert Stage(cfg(tmp_path / "c", "memory.heads_read_z=false"), "train-memory").done() == {"done": True}


def test_extra_inputs_are_part_of_the_fingerprint(tmp_path):
    stage = Stage(cfg(tmp_path), "train-memory", inputs={"initial": "abc"})
    stage.open()
    stage.finish({"done": True})
    assert Stage(cfg(tmp_path), "train-memory", inputs={"initial": "abc"}).done() == {"done": True}
    assert Stage(cfg(tmp_path), "train-memory", inputs={"initial": "xyz"}).stale_reasons() == [
        "its input initial changed"
    ]


def test_a_stage_records_its_work_time_summed_over_the_invocations_that_did_it(tmp_path, monkeypatch):
    clock = iter([100.0, 103.5, 200.0, 202.0, 300.0, 301.0, 400.0, 405.0])
    monkeypatch.setattr(stages, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    stage = Stage(cfg(tmp_path, "vae.epochs=3"), "train-vae")
    assert recorded_seconds(stage.folder) is None and stage.open() is None
    stage.finish({})
    assert recorded_seconds(stage.folder) == 3.5
    skipped = Stage(cfg(tmp_path, "vae.epochs=3"), "train-vae")
    assert skipped.open() == {}  # skipped: nothing added
    assert recorded_seconds(stage.folder) == 3.5
    skipped.finish({})  # finished again after a check of its files (collect, encode): its time is kept
    assert recorded_seconds(stage.folder) == 3.5
    more = Stage(cfg(tmp_path, "vae.epochs=5"), "train-vae")  # continued from epoch 3
    assert more.open() is None
    more.finish({})
    assert recorded_seconds(stage.folder) == 5.5
    redone = Stage(cfg(tmp_path, "vae.epochs=5", "vae.lr=0.002"), "train-vae")  # stale: its old work is gone
    assert redone.open() is None
    redone.finish({})
    assert recorded_seconds(stage.folder) == 1.0
    # a record written before stages timed themselves: the time stays unknown, not the last invocation's
    record = read_json(stage.folder / MADE_FROM)
    write_json(stage.folder / MADE_FROM, {key: v for key, v in record.items() if key != "seconds"})
    again = Stage(cfg(tmp_path, "vae.epochs=6", "vae.lr=0.002"), "train-vae")
    assert again.open() is None
    again.finish({})
    assert recorded_seconds(stage.folder) is None


def test_a_killed_invocation_keeps_the_time_of_the_work_it_saved(tmp_path, monkeypatch):
    clock = iter([100.0, 104.0, 107.0, 200.0, 202.0])
    monkeypatch.setattr(stages, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    stage = Stage(cfg(tmp_path, "vae.epochs=3"), "train-vae")
    stage.record_progress()  # not opened: nothing to record
    assert recorded_seconds(stage.folder) is None
    assert stage.open() is None
    stage.record_progress()  # a checkpoint at 104
    assert recorded_seconds(stage.folder) == 4.0 and read_json(stage.folder / MADE_FROM)["finished"] is False
    stage.record_progress()  # and at 107; then killed
    resumed = Stage(cfg(tmp_path, "vae.epochs=3"), "train-vae")
    assert resumed.open() is None  # not finished: resumed, with the 7 s saved
    resumed.finish({})
    assert recorded_seconds(stage.folder) == 9.0
