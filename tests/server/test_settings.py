"""Settings are declared once and reach the server three ways: defaults, ``HOOKLAB_*``
environment variables and command-line flags (a flag wins over the environment)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from hooklab_server.settings import (
    Settings,
    build_parser,
    env_name,
    flag_name,
    load_settings,
    settings_markdown,
)

FIELDS = [spec.name for spec in dataclasses.fields(Settings)]


def test_every_setting_has_a_flag_and_an_environment_variable_in_help() -> None:
    server = Path(sys.executable).parent / "hooklab-server"
    out = subprocess.run([server, "--help"], capture_output=True, text=True, check=True).stdout
    for name in FIELDS:
        assert flag_name(name) in out, name
        assert env_name(name) in out, name


@pytest.mark.parametrize("name", FIELDS)
def test_each_setting_is_read_from_the_environment_and_from_its_flag(name: str) -> None:
    spec = next(spec for spec in dataclasses.fields(Settings) if spec.name == name)
    text, value = {
        "int": ("7", 7),
        "float": ("2.5", 2.5),
        "str": ("cpu", "cpu"),
        "bool": ("false", False),
        "tuple[str, ...]": ("a.example, b.example", ("a.example", "b.example")),
    }[str(spec.type)]
    if name == "dtype":
        text, value = "bfloat16", "bfloat16"
    from_env = load_settings([], {env_name(name): text})
    assert getattr(from_env, name) == value
    flag = [flag_name(name) if value is not False else "--no-" + name.replace("_", "-")]
    if value is not False:
        flag.append(text)
    assert getattr(load_settings(flag, {}), name) == value


def test_flag_wins_over_environment_and_sizes_take_binary_suffixes() -> None:
    settings = load_settings(
        ["--max-request-bytes", "2MiB"],
        {"HOOKLAB_MAX_REQUEST_BYTES": "1GiB", "HOOKLAB_MAX_SPECS": "9"},
    )
    assert settings.max_request_bytes == 2 * 1024 * 1024
    assert settings.max_specs == 9
    assert load_settings([], {"HOOKLAB_MAX_STORED_BYTES": "3 kib"}).max_stored_bytes == 3072
    assert load_settings([], {}) == Settings()


@pytest.mark.parametrize(
    "argv,environ",
    [
        (["--max-specs", "many"], {}),
        ([], {"HOOKLAB_MAX_SPECS": "1.5"}),
        ([], {"HOOKLAB_PROCESSING": "maybe"}),
        (["--max-batch", "0"], {}),
        (["--dtype", "float8"], {}),
    ],
)
def test_bad_values_are_refused_with_the_setting_named(
    argv: list[str], environ: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        load_settings(argv, environ, build_parser())
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert any(
        word in err for word in ("max-specs", "MAX_SPECS", "PROCESSING", "max_batch", "dtype")
    )


def test_default_hosts_are_the_loopback_names_plus_a_named_bind_address() -> None:
    assert set(Settings().open_hosts) == {"localhost", "127.0.0.1", "::1"}
    assert "gpu-box" in Settings(host="gpu-box").open_hosts
    assert set(Settings(host="0.0.0.0").open_hosts) == {"localhost", "127.0.0.1", "::1"}
    assert Settings(allowed_hosts=("*",)).open_hosts == ("*",)


def test_a_wildcard_bind_without_allowed_hosts_refuses_to_start() -> None:
    server = Path(sys.executable).parent / "hooklab-server"
    done = subprocess.run(
        [server, "--host", "0.0.0.0", "--model", "nowhere"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "--allowed-hosts" in done.stderr


def test_the_readme_lists_every_setting() -> None:
    """The README's table is settings_markdown() as it is now (paste it there when it moves)."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert settings_markdown() in readme
    for name in FIELDS:
        assert f"`{flag_name(name)}` · `{env_name(name)}`" in readme, name


def test_sae_flag_repeats_and_env_separates_with_commas() -> None:
    settings = load_settings(["--sae", "/a@blocks.0.hook_resid_pre", "--sae", "/b@x"], environ={})
    assert settings.sae == ("/a@blocks.0.hook_resid_pre", "/b@x")
    from_env = load_settings([], environ={"HOOKLAB_SAE": "/a@h1,/b@h2"})
    assert from_env.sae == ("/a@h1", "/b@h2")
    assert load_settings([], environ={}).sae == ()
