import re
from pathlib import Path

import pytest

from shared import settings as settings_mod
from shared.settings import SettingsError, load


def test_defaults_listen_on_loopback_with_the_documented_ports(tmp_path: Path) -> None:
    s = load({}, env_file=tmp_path / "none")
    assert (s.listen_host, s.proxy_port, s.engine_port) == ("127.0.0.1", 5846, 5847)
    assert s.model_prefix == "ms/" and s.model_ttl == 1800 and s.default_parallel == 1
    assert s.models_dir == Path.home() / ".cache/lm-studio/models"


def test_environment_wins_over_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("# comment\nMODEL_TTL=60\nexport MODEL_PREFIX='x/'\n")
    s = load({"MODEL_TTL": "90"}, env_file=env_file)
    assert s.model_ttl == 90 and s.model_prefix == "x/"


@pytest.mark.parametrize(("env", "words"), [
    ({"MODEL_TTL": "soon"}, ["MODEL_TTL", "whole number"]),
    ({"HARMONY_PROXY_PORT": "70000"}, ["HARMONY_PROXY_PORT", "port"]),
    ({"ENGINE": "vllm"}, ["ENGINE", "router"]),
    ({"DEFAULT_PARALLEL": "0"}, ["DEFAULT_PARALLEL", "at least 1"]),
    ({"OLLAMA_BASE": "localhost:11434"}, ["OLLAMA_BASE", "http://"]),
])
def test_bad_settings_name_the_key_and_the_reason(tmp_path: Path, env, words) -> None:
    with pytest.raises(SettingsError) as e:
        load(env, env_file=tmp_path / "none")
    for word in words:
        assert word in str(e.value)


def test_env_keys_lists_every_variable_settings_read() -> None:
    """The installed service carries these; one that load() reads but ENV_KEYS lacks would be
    lost."""
    source = Path(settings_mod.__file__).read_text().split("def load(")[1]
    assert set(re.findall(r'"([A-Z][A-Z_]+)"', source)) <= set(settings_mod.ENV_KEYS)
