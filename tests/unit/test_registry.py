"""The one registry of commands (``runtime/registry.py``): every entry names code, sections, a folder and
upstream stages that exist, and the command line, the stale check and the report all read it."""

import dataclasses
import inspect

import pytest

from frmdn_worldmodels import cli
from frmdn_worldmodels.runtime.config import Config, load_config
from frmdn_worldmodels.runtime.paths import RunPaths, run_paths
from frmdn_worldmodels.runtime.registry import COMMANDS, FINAL, PIPELINE, RECORDED


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_names_what_exists(name):
    command = COMMANDS[name]
    assert callable(cli.resolve(command.run))
    # its sections are the config's; a section with rules its field types cannot say has a check
    fields = {item.name for item in dataclasses.fields(Config)}
    assert set(command.sections) <= fields and set(cli.SECTION_CHECKS) <= {"run", "sweep", *fields}
    assert isinstance(getattr(RunPaths, command.folder), property)
    if command.record is not None:
        assert set(command.record.upstream) <= set(RECORDED)
        assert all(COMMANDS[stage].pipeline for stage in command.record.upstream)
    # a command that plays on Ray takes the command's PoolKeeper; no other one is handed it
    takes_keeper = "keeper" in inspect.signature(cli.resolve(command.run)).parameters
    assert takes_keeper == command.plays


def test_the_command_line_offers_every_registered_command():
    choices = cli.build_parser(fields=False)._subparsers._group_actions[0].choices
    offered = {name for name in choices if name != "benchmark"} | {
        f"benchmark {k}" for k in ("speech", "image")
    }
    assert offered == set(COMMANDS) | {"pipeline"}


def test_the_pipeline_reads_the_sections_of_its_stages_and_shows_the_final_controller_last():
    assert PIPELINE[:5] == ("collect", "train-vae", "encode", "train-memory", "train-controller")
    assert PIPELINE[-len(FINAL) :] == FINAL == ("evaluate", "dream")
    assert set(cli.sections_of("pipeline")) == {"run"} | {s for n in PIPELINE for s in COMMANDS[n].sections}


def test_a_stage_folder_is_where_the_run_paths_put_it(tmp_path):
    paths = run_paths(load_config(overrides=[f"runs_dir={tmp_path}"]))
    assert paths.controller == paths.root / COMMANDS["train-controller"].folder
    assert paths.episodes == paths.root / COMMANDS["collect"].folder
