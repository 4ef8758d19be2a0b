"""`model service`: what it writes is what launchd and systemd accept, and uninstall removes
exactly that. systemd's own checker (systemd-analyze verify) reads the unit; the plist is read
back with plistlib (launchd cannot run here). systemctl, launchctl and crontab are stand-ins
on PATH that record their calls (no service manager runs in this sandbox)."""

import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli import service
from shared.settings import ROOT, load


def fake_tools(tmp_path: Path) -> Path:
    """systemctl, launchctl and crontab that log their arguments; crontab keeps a file."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    for tool in ("systemctl", "launchctl"):
        (bindir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {tmp_path}/calls\n')
    (bindir / "crontab").write_text(
        f'#!/bin/sh\nif [ "$1" = "-l" ]; then cat {tmp_path}/crontab 2>/dev/null || '
        f'{{ echo "no crontab" >&2; exit 1; }}; else cat > {tmp_path}/crontab; fi\n')
    for tool in bindir.iterdir():
        tool.chmod(0o755)
    return bindir


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    return {**os.environ, "HOME": str(home), "STATE_DIR": str(tmp_path / "state"),
            "MODEL_SERVE_ENV_FILE": str(tmp_path / "none"),
            "PATH": f"{fake_tools(tmp_path)}{os.pathsep}{os.environ['PATH']}"}


def model(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd-analyze")
def test_the_systemd_unit_passes_systemds_own_checker(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("STATE_DIR", str(tmp_path / "state"))
    unit = tmp_path / service.UNIT
    unit.write_text(service.systemd_unit(load({"STATE_DIR": str(tmp_path / "state")},
                                              env_file=tmp_path / "none")))
    checked = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                             text=True)
    assert checked.returncode == 0 and not checked.stdout + checked.stderr, checked.stderr
    text = unit.read_text()
    assert f"ExecStart={Path(sys.executable).parent / 'model'} supervise" in text
    assert "Restart=on-failure" in text and f'Environment="STATE_DIR={tmp_path}/state"' in text


def test_the_launchd_agent_runs_at_load_and_comes_back_after_a_crash(tmp_path) -> None:
    settings = load({"STATE_DIR": str(tmp_path / "s")}, env_file=tmp_path / "none")
    plist = plistlib.loads(service.launchd_plist(settings))
    assert plist["Label"] == "model-serve" and plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ProgramArguments"] == [str(Path(sys.executable).parent / "model"),
                                         "supervise"]
    assert plist["EnvironmentVariables"]["PATH"].split(os.pathsep)[0] == \
        str(Path(sys.executable).parent)
    assert plist["StandardOutPath"] == str(tmp_path / "s/logs/service.log")


def test_systemd_install_and_uninstall_touch_only_their_own_file(env, tmp_path) -> None:
    unit = Path(env["HOME"]) / ".config/systemd/user" / service.UNIT
    result = model(env, "service", "install", "--platform", "systemd", "--no-start")
    assert result.returncode == 0, result.stderr
    assert unit.is_file() and "loginctl enable-linger" in result.stdout
    calls = (tmp_path / "calls").read_text()
    assert "systemctl --user daemon-reload" in calls
    assert f"systemctl --user enable {service.UNIT}\n" in calls
    assert "(as installed)" in model(env, "service", "status").stdout
    unit.write_text(unit.read_text() + "# the user's own edit\n")
    result = model(env, "service", "uninstall")
    assert "left as it is" in result.stdout and unit.is_file()  # changed: not ours to delete
    assert model(env, "service", "status").returncode == 1  # nothing recorded any more


def test_install_never_overwrites_a_unit_it_did_not_write(env) -> None:
    unit = Path(env["HOME"]) / ".config/systemd/user" / service.UNIT
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    result = model(env, "service", "install", "--platform", "systemd", "--no-start")
    assert result.returncode == 1 and "not written by model-serve" in result.stderr
    assert unit.read_text() == "[Service]\nExecStart=/bin/true\n"


def test_cron_fallback_adds_one_block_and_removes_only_it(env, tmp_path) -> None:
    crontab = tmp_path / "crontab"
    crontab.write_text("0 3 * * * /usr/bin/backup\n")
    for _ in range(2):  # installing twice leaves one block
        result = model(env, "service", "install", "--platform", "cron", "--no-start")
        assert result.returncode == 0, result.stderr
    text = crontab.read_text()
    assert text.startswith("0 3 * * * /usr/bin/backup\n")
    assert text.count(service.CRON_BEGIN) == 1
    assert "@reboot cd " in text and "model start --quiet" in text
    assert model(env, "service", "status").stdout.startswith("cron: installed")
    assert model(env, "service", "uninstall").returncode == 0
    assert crontab.read_text() == "0 3 * * * /usr/bin/backup\n"


def test_launchd_install_loads_the_agent(env, tmp_path) -> None:
    result = model(env, "service", "install", "--platform", "launchd")
    assert result.returncode == 0, result.stderr
    agent = Path(env["HOME"]) / "Library/LaunchAgents/model-serve.plist"
    assert plistlib.loads(agent.read_bytes())["Label"] == "model-serve"
    assert f"launchctl bootstrap gui/{os.getuid()} {agent}" in (tmp_path / "calls").read_text()
    assert model(env, "service", "uninstall").returncode == 0 and not agent.exists()
    assert f"launchctl bootout gui/{os.getuid()}/model-serve" in \
        (tmp_path / "calls").read_text()


def test_cron_line_carries_path_and_the_shells_variables(env, tmp_path) -> None:
    env = {**env, "CONFIG_DIR": str(tmp_path / "my config")}  # a space stays in one word
    assert model(env, "service", "install", "--platform", "cron", "--no-start").returncode == 0
    line = next(x for x in (tmp_path / "crontab").read_text().splitlines()
                if x.startswith("@reboot"))
    assert " env PATH=" in line and f"'CONFIG_DIR={tmp_path}/my config'" in line
    assert f"STATE_DIR={tmp_path}/state" in line


def test_one_service_at_a_time_so_uninstall_leaves_nothing_behind(env, tmp_path) -> None:
    assert model(env, "service", "install", "--platform", "systemd", "--no-start").returncode == 0
    second = model(env, "service", "install", "--platform", "launchd", "--no-start")
    assert second.returncode == 1 and "uninstall" in second.stderr
    assert not (Path(env["HOME"]) / "Library/LaunchAgents/model-serve.plist").exists()
    assert model(env, "service", "uninstall").returncode == 0
    assert not (Path(env["HOME"]) / ".config/systemd/user" / service.UNIT).exists()


def test_uninstall_works_where_the_service_manager_is_missing(env, tmp_path) -> None:
    assert model(env, "service", "install", "--platform", "launchd", "--no-start").returncode == 0
    (tmp_path / "fakebin" / "launchctl").unlink()  # a Linux machine has none
    result = model(env, "service", "uninstall")
    assert result.returncode == 0, result.stderr
    assert not (Path(env["HOME"]) / "Library/LaunchAgents/model-serve.plist").exists()


def test_without_a_systemd_user_manager_cron_is_the_default(env, tmp_path) -> None:
    (tmp_path / "fakebin" / "systemctl").write_text("#!/bin/sh\necho offline\nexit 1\n")
    result = model(env, "service", "install", "--no-start")
    assert result.returncode == 0, result.stderr
    assert "cron line" in result.stdout


def with_real_cache(env: dict) -> dict:
    """The real build cache, where rpc-server is (HOME is a test folder)."""
    cache = os.environ.get("LLAMA_BUILD_CACHE", str(Path.home() / ".cache/model-serve"))
    return {**env, "LLAMA_BUILD_CACHE": cache}


def test_an_rpc_worker_service_sits_beside_the_stacks_and_uninstall_removes_only_it(
        env, tmp_path) -> None:
    env = with_real_cache(env)
    stack_unit = Path(env["HOME"]) / ".config/systemd/user" / service.UNIT
    worker_unit = Path(env["HOME"]) / ".config/systemd/user" / service.RPC_WORKER.unit
    assert model(env, "service", "install", "--platform", "systemd", "--no-start").returncode == 0
    result = model(env, "service", "install", "--rpc-worker", "--platform", "systemd",
                   "--no-start", "--host", "0.0.0.0", "--port", "50099", "--mem", "2048",
                   "--threads", "3", "--cache")
    if "rpc-server not found" in result.stderr:
        pytest.skip(result.stderr)
    assert result.returncode == 0, result.stderr
    assert "WARNING: rpc-worker listens on 0.0.0.0:50099" in result.stderr
    text = worker_unit.read_text()
    assert (f"ExecStart={Path(sys.executable).parent / 'model'} rpc-worker --host 0.0.0.0 "
            "--port 50099 --mem 2048 --threads 3 --cache") in text
    assert "Restart=always" in text and "rpc-worker.log" in text
    if shutil.which("systemd-analyze"):
        checked = subprocess.run(["systemd-analyze", "verify", str(worker_unit)],
                                 capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
    status = model(env, "service", "status", "--rpc-worker").stdout
    assert "listening on 0.0.0.0:50099" in status and "(as installed)" in status
    assert "--host" in model(env, "service", "install", "--host", "0.0.0.0").stderr
    assert model(env, "service", "uninstall", "--rpc-worker").returncode == 0
    assert not worker_unit.exists() and stack_unit.is_file()
    assert f"disable --now {service.RPC_WORKER.unit}" in (tmp_path / "calls").read_text()
    assert model(env, "service", "status").returncode == 0


def test_an_rpc_worker_cron_line_starts_it_only_when_it_is_not_running(env, tmp_path) -> None:
    env = with_real_cache(env)
    if not shutil.which("flock"):
        pytest.skip("needs flock")
    result = model(env, "service", "install", "--rpc-worker", "--platform", "cron")
    if "rpc-server not found" in result.stderr:
        pytest.skip(result.stderr)
    assert result.returncode == 0, result.stderr
    cron = (tmp_path / "crontab").read_text()
    assert service.RPC_WORKER.cron_begin in cron and "flock -n" in cron
    assert "rpc-worker --host 127.0.0.1 --port 50052" in cron
    assert model(env, "service", "uninstall", "--rpc-worker").returncode == 0
    assert service.RPC_WORKER.cron_begin not in (tmp_path / "crontab").read_text()
