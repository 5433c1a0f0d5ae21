"""The config system: YAML into typed dataclasses, --set overrides, unknown keys refused by name."""

from pathlib import Path

import pytest
import yaml

from frmdn_worldmodels.runtime.config import (
    DEFAULT_CONFIG,
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from frmdn_worldmodels.runtime.rules import check_rules

REPO = Path(__file__).resolve().parents[2]


def test_embedded_default_loads_and_differs_from_dataclass_defaults():
    config = load_config()
    assert isinstance(config, Config)
    assert config.name == "tiny"
    assert config.memory.hidden == yaml.safe_load(DEFAULT_CONFIG.read_text())["memory"]["hidden"]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    from frmdn_worldmodels import cli

    config = load_config(path)
    for command in ("pipeline", "benchmark image", "benchmark speech"):
        cli.check_config(config, command)


# one bad value per section (and the rules across sections): every command that uses the section refuses it
# by name
BAD_VALUES = [
    ("pipeline", "seed=-1", "seed must be at least 0"),
    ("pipeline", "stale=maybe", "stale must be one of"),
    ("pipeline", "device=tpu", "device must be"),
    ("pipeline", "ray.num_cpus=0", "ray.num_cpus"),
    ("pipeline", "env.name=pong", "env.name"),
    ("pipeline", "env.frame_size=96", "env.frame_size"),
    ("pipeline", "collect.episodes=-1", "collect.episodes"),
    ("pipeline", "collect.max_steps=5000", "collect.max_steps must be between 0"),
    ("pipeline", "collect.policy=greedy", "collect.policy"),
    ("pipeline", "vae.lr=0", "vae.lr"),
    ("pipeline", "memory.components=0", "memory.components"),
    ("pipeline", "memory.diag_clamp=[2.0, 1.0]", "memory.diag_clamp"),
    ("pipeline", "memory_train.optimizer=sgd", "memory_train.optimizer"),
    ("pipeline", "controller.population=-1", "controller.population"),
    ("pipeline", "controller.max_steps=5000", "controller.max_steps must be between 0"),
    ("pipeline", "controller.dream_start=middle", "controller.dream_start"),
    ("pipeline", "controller.policy=greedy", "controller.policy must be one of"),
    ("pipeline", "controller.policy=sample", "controller.policy: sample draws from a softmax over discrete"),
    ("train-controller", "controller.policy=sample", "env.name=carracing has continuous"),
    ("evaluate", "controller.policy=sample", "env.name=carracing has continuous"),
    ("pipeline", "evaluate.episodes=0", "evaluate.episodes"),
    (
        "pipeline",
        "controller.imitate_top=0.5",
        "controller.imitate_top=0.5 is only read with controller.init",
    ),
    ("collect", "collect.follower_blend=0.5", "collect.follower_blend=0.5 is only read with collect.policy"),
    (
        "collect",
        "collect.follower_gas_max=0.4",
        "collect.follower_gas_max=0.4 is only read with collect.policy",
    ),
    (
        "pipeline",
        "controller.imitate_actions=follower",
        "controller.imitate_actions='follower' is only read with controller.init",
    ),
    ("collect", "collect.mario_repeat=2", "collect.mario_repeat=2 is only read with env.name: mario"),
    ("collect", "collect.workers=-1", "collect.workers"),
    ("train-vae", "vae.batch_size=0", "vae.batch_size"),
    ("train-memory", "memory.kind=lstm", "memory.kind"),
    ("train-memory --sweep table1", "memory_train.sweep_ranks=[-1]", "memory_train.sweep_ranks"),
    ("train-memory --sweep table1", "memory_train.sweep_seeds=0", "memory_train.sweep_seeds"),
    (
        "train-memory --sweep table1",
        "memory_train.sweep_extra=[context]",
        "memory_train.sweep_extra[0] must be one of flow_context, heads",
    ),
    ("train-memory --sweep table1", "memory_train.sweep_extra=[heads]", "the heads row needs a grid without"),
    ("train-memory", "memory_train.seed=-3", "memory_train.seed must be at least 0, got -3"),
    ("train-memory", "memory_train.val_fraction=1", "memory_train.val_fraction must be in [0, 1), got 1"),
    ("train-controller", "controller.population=2", "controller.population must be at least 3, got 2"),
    ("train-controller", "controller.sigma=0", "controller.sigma"),
    ("evaluate", "evaluate.video_scale=0", "evaluate.video_scale"),
    (
        "evaluate",
        "evaluate.teacher=ram_expert",
        "evaluate.teacher: 'ram_expert' is not a teacher of env.name",
    ),
    ("dream", "controller.temperature=-1", "controller.temperature"),
    ("train-vae", "vae.player_weight=4", "vae.player_weight=4.0 weighs the patches around the player"),
    (
        "train-memory",
        "memory_train.val_fraction=0.5 --set memory_train.test_fraction=0.5",
        "memory_train.val_fraction + test_fraction must leave episodes for training",
    ),
    ("train-memory --sweep table1", "memory_train.sweep_ranks=[]", "must each list one or more"),
    (
        "iterate",
        "iterate.iterations=1 --set controller.train_in=real",
        "iterate.iterations > 0 trains the controller in the dream",
    ),
    (
        "train-controller",
        "env.name=mario --set controller.init=imitate --set controller.imitate_actions=follower",
        "controller.imitate_actions=follower labels CarRacing frames; env.name is 'mario'",
    ),
    ("train-controller", "controller.pessimism=1", "set memory_train.critics to 1 or more"),
    (
        "train-controller",
        "controller.pessimism=1 --set memory_train.critics=1 --set memory.dropout=0.1",
        "it needs memory.ensemble 1 and memory.dropout 0, got 1 and 0.1",
    ),
    (
        "train-controller",
        "controller.train_in=real --set controller.pessimism=1",
        "controller.pessimism=1.0 is only read with controller.train_in: dream",
    ),
    ("benchmark speech", "speech.clip_seconds=0.001", "speech.clip_seconds=0.001 is shorter than one frame"),
    ("benchmark image", "image.memory.components=0", "image.memory.components"),
    ("benchmark speech", "speech.frame=1", "speech.frame"),
]


def test_every_rule_has_a_bad_value_that_breaks_it():
    """Each rule of ``runtime.rules`` is broken by a row of ``BAD_VALUES`` (whose message the test below
    checks from the command line)."""
    from frmdn_worldmodels.runtime.rules import RULES

    broken = set()
    for _command, override, _message in BAD_VALUES:
        try:
            cfg = load_config(None, override.split(" --set "))
        except ConfigError:
            continue
        for rules in RULES.values():
            for rule in rules:
                try:
                    rule(cfg)
                except ConfigError:
                    broken.add(rule.__name__)
    assert broken == {rule.__name__ for rules in RULES.values() for rule in rules}


@pytest.mark.parametrize("command, override, message", BAD_VALUES, ids=[case[1] for case in BAD_VALUES])
def test_a_bad_value_in_any_section_is_refused_before_any_work(tmp_path, capsys, command, override, message):
    from frmdn_worldmodels import cli

    overrides = [part for setting in override.split(" --set ") for part in ("--set", setting)]
    code = cli.main([*command.split(), "--set", f"runs_dir={tmp_path / 'runs'}", *overrides])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists(), "a refused config must not start any work"


def check_run_rules(cfg):
    check_rules(cfg, "run")


def test_a_conditional_field_is_refused_only_where_its_condition_fails():
    hour = REPO / "configs" / "carracing-hour.yaml"
    # at its default the field is harmless wherever it is unused, so a config can switch its condition off
    imitation_defaults = [
        "controller.imitate_weight=0",
        "controller.imitate_actions=recorded",
        "controller.imitate_top=0.25",
    ]
    check_run_rules(load_config(hour, ["controller.init=zeros", *imitation_defaults]))
    check_run_rules(load_config(hour, ["controller.imitate_top=0.5"]))
    with pytest.raises(ConfigError, match=r"controller.imitate_top=0.5 is only read with controller.init"):
        check_run_rules(
            load_config(hour, ["controller.init=zeros", *imitation_defaults, "controller.imitate_top=0.5"])
        )
    with pytest.raises(ConfigError, match=r"controller.imitate_actions='follower' is only read with"):
        check_run_rules(load_config(hour, ["controller.init=zeros", *imitation_defaults[::2]]))
    with pytest.raises(ConfigError, match=r"controller.dream_start_limit=8 is only read with"):
        check_run_rules(load_config(hour, ["controller.dream_start=first", "controller.dream_start_limit=8"]))
    mario = REPO / "configs" / "mario-hour-random.yaml"
    right_biased = ["collect.policy=right_biased", "collect.right_bias=0.5", "collect.mario_repeat=2"]
    check_run_rules(load_config(mario, right_biased))
    with pytest.raises(ConfigError, match=r"collect.right_bias=0.5 is only read with env.name: mario"):
        check_run_rules(load_config(mario, ["collect.policy=random", "collect.right_bias=0.5"]))
    expert = REPO / "configs" / "mario-hour-expert.yaml"
    check_run_rules(load_config(expert, ["collect.expert_noise=0.1"]))
    with pytest.raises(ConfigError, match=r"collect.expert_noise=0.1 is only read with collect.policy: ram"):
        check_run_rules(load_config(expert, [*right_biased, "collect.expert_noise=0.1"]))
    with pytest.raises(ConfigError, match=r"collect.mario_repeat=2 is only read with env.name: mario with"):
        check_run_rules(load_config(expert, ["collect.mario_repeat=2"]))


def test_overrides_are_typed():
    config = load_config(
        None,
        [
            "memory.rank=2",
            "controller.sigma=1",
            "memory.diag_clamp=[0.1, 1.9]",
            "ray.address=null",
            "memory.flow_context=true",
            "name=other",
        ],
    )
    assert config.memory.rank == 2
    assert config.controller.sigma == 1.0 and isinstance(config.controller.sigma, float)
    assert config.memory.diag_clamp == [0.1, 1.9]
    assert config.ray.address is None
    assert config.memory.flow_context is True
    assert load_config(None, ["memory_train.lr=1e6"]).memory_train.lr == 1e6
    assert config.run_dir == Path("runs") / "other"


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("memory.rnak=2", "rnak"),
        ("memroy.rank=2", "memroy"),
        ("memory.rank=two", "memory.rank"),
        ("memory.flow_context=3", "memory.flow_context"),
        ("memory.rank.x=1", "rank"),
        ("memory", "key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("memory:\n  components: 3\n  colour: red\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "memory.colour" in str(info.value) and str(path) in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("memory: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_saved_config_round_trips(tmp_path):
    config = load_config(None, ["memory.components=7", "image.ranks=[0, 2]"])
    save_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert config_to_dict(again) == config_to_dict(config)
    assert config_from_dict(config_to_dict(config)) == config


def test_threads_setting_is_applied_to_torch_and_validated(tmp_path, run_main):
    import torch

    from frmdn_worldmodels import cli

    before = torch.get_num_threads()
    try:
        cli.use_threads(1)
        assert torch.get_num_threads() == 1
        cli.use_threads(0)  # torch's default stays as it is
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    result = run_main("encode", "--set", "threads=-1", "--set", f"runs_dir={tmp_path}")
    assert result.returncode == 2 and "threads must be at least 0" in result.stderr
    assert not any(tmp_path.iterdir())


def test_every_field_has_a_doc_line_and_each_command_help_lists_the_fields_it_reads(run_main):
    """``run.py <command> --help`` ends with every field of every section the command reads, its default and
    its doc line; a field without a doc line would be listed bare, so every field must have one."""
    import dataclasses

    from frmdn_worldmodels import cli
    from frmdn_worldmodels.runtime.config import Config, field_docs

    def undocumented(value, prefix=""):
        docs = field_docs(type(value))
        for item in dataclasses.fields(value):
            inner = getattr(value, item.name)
            if dataclasses.is_dataclass(inner):
                yield from undocumented(inner, f"{prefix}{item.name}.")
            elif item.name not in docs:
                yield prefix + item.name

    assert list(undocumented(Config())) == []
    shown = run_main("train-memory", "--help").stdout
    for item in dataclasses.fields(Config().memory_train):
        assert f"  memory_train.{item.name} = " in shown
    assert "  memory_train.carry_state = True\n      Truncated backpropagation through time" in shown
    assert "  seed = 0  (at least 0)\n" in shown and "controller." not in shown  # what it reads, nothing else
    assert "  memory_train.lr = 0.001  (> 0)\n" in shown  # a field's bounds, from its type
    assert "  speech.memory.components = 20" in run_main("benchmark", "--help").stdout
    assert set(cli.sections_of("pipeline")) >= {"collect", "vae", "memory", "controller", "iterate"}


def _choice_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, tuple]]:
    """Every field of the config whose type lists the values it takes, with those values."""
    import dataclasses
    import typing

    found = []
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            found += _choice_fields(hint, f"{prefix}{name}.")
        elif typing.get_origin(hint) is typing.Literal:
            found.append((f"{prefix}{name}", typing.get_args(hint)))
    return found


@pytest.mark.parametrize("key, choices", _choice_fields(), ids=lambda value: str(value))
def test_a_field_with_choices_takes_each_and_refuses_any_other_naming_them(key, choices):
    for choice in choices:
        config = load_config(overrides=[f"{key}={choice}"])
        for part in key.split("."):
            config = getattr(config, part)
        assert config == choice
    with pytest.raises(ConfigError, match=f"{key} must be one of {', '.join(choices)}, got 'nonsense'"):
        load_config(overrides=[f"{key}=nonsense"])
