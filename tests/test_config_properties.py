"""Property tests over the config parsers: whatever a config file, an override or a decoding
request holds, the parser returns a config or raises ConfigError naming the problem, never
another exception; and a config it returns survives a JSON round trip unchanged."""

import copy
import json
import math
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lm.config import ConfigError, LMConfig
from lm.hf import config_from_hf, config_to_hf
from mm.config import MMConfig, preset
from mm.generate import GenerationConfig
from train.config import TrainConfig, apply_overrides, load_train_config

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Values a JSON file (Python's json accepts NaN and Infinity) or a Python caller may put anywhere.
EDGE_NUMBERS = st.sampled_from([0, -1, 1, 2, 3, 7, 4096, 10**30, -(10**30), 2**63, 2**64, 0.0, -0.0, 0.5, 2.5,
                                1e-9, 1e308, math.nan, math.inf, -math.inf])
SCALARS = (st.none() | st.booleans() | EDGE_NUMBERS | st.integers() | st.floats()
           | st.text(max_size=8) | st.sampled_from(["5", "nan", "caption", "yarn", ""]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def _paths(data: dict, prefix=()) -> list[tuple]:
    """Every key path in a nested dict, so a mutation can reach any field of any section."""
    out = []
    for key, value in data.items():
        out.append(prefix + (key,))
        if isinstance(value, dict):
            out += _paths(value, prefix + (key,))
    return out


@st.composite
def mutated(draw, base: dict):
    """`base` with one to three fields replaced (or keys added) at any depth."""
    data, paths = copy.deepcopy(base), _paths(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        if draw(st.booleans()):  # sometimes a key that does not exist
            path = path[:-1] + (draw(st.text(max_size=6)),)
        node = data
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                break
            node = node[key]
        else:
            node[path[-1]] = draw(VALUES)
    return data


def _round_trips(cfg) -> None:
    text = json.dumps(cfg.to_dict(), sort_keys=True)
    assert json.dumps(type(cfg).from_dict(json.loads(text)).to_dict(), sort_keys=True) == text


@SETTINGS
@given(mutated(TrainConfig().to_dict()))
def test_train_config_from_any_dict(data):
    try:
        cfg = TrainConfig.from_dict(data)
    except ConfigError:
        return
    _round_trips(cfg)
    assert cfg.optim.lr > 0 and cfg.optim.batch_size >= 1 and cfg.optim.grad_accum >= 1 and cfg.save_every >= 1
    assert set(cfg.data.tasks) <= set(cfg.model.tasks)


def _set(data: dict, path: tuple, value) -> dict:
    data = copy.deepcopy(data)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


@pytest.mark.parametrize("edge", [0, -1, 2**64, math.nan, math.inf, -math.inf, "5", None, True, [1]],
                         ids=lambda v: repr(v))
def test_every_field_at_every_edge_value(edge):
    """Exhaustive: each field of the training config (model included) set to an edge value either
    parses or raises ConfigError naming that field; a non-finite number is refused everywhere."""
    base = TrainConfig().to_dict()
    for path in _paths(base):
        default = _get(base, path)
        if isinstance(default, dict) and not isinstance(edge, dict):
            continue  # a section: replacing it whole is covered by the random test
        try:
            cfg = TrainConfig.from_dict(_set(base, path, edge))
        except ConfigError as e:
            assert path[-1] in str(e), (path, e)
            continue
        assert not (isinstance(edge, float) and not math.isfinite(edge)), path
        _round_trips(cfg)


def _get(data: dict, path: tuple):
    for key in path:
        data = data[key]
    return data


@SETTINGS
@given(mutated(preset("small").to_dict()))
def test_model_config_from_any_dict(data):
    try:
        cfg = MMConfig.from_dict(data)
    except ConfigError:
        return
    _round_trips(cfg)
    assert all(isinstance(p, str) for p in cfg.tasks.values()) and cfg.lm.hidden_size >= 1


@SETTINGS
@given(st.lists(st.one_of(
    st.builds(lambda path, raw: f"--{'.'.join(path)}={raw}",
              st.sampled_from(_paths(TrainConfig().to_dict())),
              st.sampled_from(["0", "-1", "NaN", "Infinity", "1e400", "\"x\"", "[]", "{}", "null", "true", "2.5", "",
                               "{\"a\": 1}", "caption"]) | st.text(max_size=6)),
    st.text(max_size=12)), max_size=3))
def test_command_line_overrides(overrides):
    try:
        cfg = load_train_config(None, overrides)
    except ConfigError:
        return
    _round_trips(cfg)


def test_overrides_of_a_non_section_are_named():
    with pytest.raises(ConfigError, match="'optim' is not a section"):
        apply_overrides({"optim": 3}, ["--optim.lr=1"])


def _hf_config() -> dict:
    lm_cfg = LMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    import torch

    return config_to_hf(lm_cfg, "deepseek_v3", torch.bfloat16)


@SETTINGS
@given(mutated(_hf_config()))
def test_hf_config_from_any_dict(hf):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown keys warn by design
        try:
            cfg, interleaved = config_from_hf(hf)
        except ConfigError:
            return
    assert isinstance(interleaved, bool)
    _round_trips(cfg)


GEN_FIELDS = [f for f in GenerationConfig.__dataclass_fields__]


@SETTINGS
@given(st.dictionaries(st.sampled_from(GEN_FIELDS), SCALARS, max_size=5))
def test_generation_config_any_values(options):
    try:
        gen = GenerationConfig(**options).validate()
    except ConfigError as e:
        assert any(name in str(e) for name in list(options) + ["beam search"]), e
        return
    for name in GenerationConfig.INTS:
        assert type(getattr(gen, name)) is int
    for name in GenerationConfig.FLOATS:
        assert math.isfinite(getattr(gen, name))
    assert 1 <= gen.num_beams <= 16 and 0 <= gen.temperature <= 100


@pytest.mark.parametrize("options, named", [
    (dict(temperature=math.nan), "temperature"), (dict(temperature=math.inf), "temperature"),
    (dict(temperature=1e6), "temperature"), (dict(repetition_penalty=math.nan), "repetition_penalty"),
    (dict(top_p=math.nan), "top_p"), (dict(length_penalty=-math.inf), "length_penalty"),
    (dict(num_beams=1000), "num_beams"), (dict(max_new_tokens="5"), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"), (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(top_k="3"), "top_k"), (dict(seed=1.5), "seed"), (dict(draft_tokens="2"), "draft_tokens"),
    (dict(seed=2**64), "seed"), (dict(speculative="yes"), "speculative"),
])
def test_generation_config_names_the_bad_option(options, named):
    with pytest.raises(ValueError, match=named):
        GenerationConfig(**options).validate()


@pytest.mark.parametrize("change, named", [
    ({"optim": {"lr": math.nan}}, "optim.lr: expected a finite number"),
    ({"optim": {"lr": -1e-3}}, "lr must be > 0, got -0.001"),
    ({"optim": {"lr": 0}}, "lr must be > 0"),
    ({"optim": {"grad_accum": 0}}, "grad_accum must be >= 1, got 0"),
    ({"optim": {"batch_size": 0}}, "batch_size must be >= 1, got 0"),
    ({"optim": {"batch_size": -4}}, "batch_size must be >= 1, got -4"),
    ({"data": {"tasks": ["caption", "poem"]}}, r"data.tasks must be tasks the model has a prompt for"),
    ({"save_every": 0}, "save_every must be >= 1, got 0"),
    ({"log_every": 0}, "log_every must be >= 1, got 0"),
    ({"keep_last": 0}, "keep_last must be >= 1"),
    ({"optim": {"betas": [0.9, 1.5]}}, "betas must be two numbers"),
    ({"data": {"pad_to": {"caption": "long"}}}, "pad_to must map task names to lengths"),
    ({"data": {"pad_to": {"poem": 40}}}, "pad_to must only name tasks in data.tasks"),
    ({"vision_warmup": {"lr": math.inf}}, "vision_warmup.lr: expected a finite number"),
    ({"model": {"lm": {"n_group": 0}}}, "n_group must be >= 1, got 0"),
    ({"model": {"lm": {"rope_scaling": {"type": "yarn"}}}}, "factor must be a number > 0"),
    ({"model": {"tasks": {"caption": 3}}}, "tasks must map task names to prompt strings"),
])
def test_train_config_names_the_bad_value(change, named, tmp_path):
    data = TrainConfig().to_dict()
    for section, value in change.items():
        if isinstance(value, dict) and isinstance(data[section], dict):
            data[section] = _merge(data[section], value)
        else:
            data[section] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))  # NaN and Infinity as Python's json writes them
    with pytest.raises(ConfigError, match=named):
        load_train_config(str(path))


def _merge(base: dict, change: dict) -> dict:
    out = dict(base)
    for k, v in change.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) and k != "pad_to" else v
    return out


@pytest.mark.parametrize("text", ["[1, 2]", "\"tiny\"", "{\"optim\": {\"lr\": NaN}}"])
def test_config_files_that_are_not_configs(text, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=str(path).replace("\\", "\\\\") + "|optim.lr"):
        load_train_config(str(path))


def test_config_file_that_is_not_utf8_or_a_file(tmp_path):
    bad = tmp_path / "latin1.json"
    bad.write_bytes(b'{"out_dir": "caf\xe9"}')
    with pytest.raises(ConfigError, match="latin1.json: not valid JSON"):
        load_train_config(str(bad))
    with pytest.raises(ConfigError, match="cannot be read"):
        load_train_config(str(tmp_path))
