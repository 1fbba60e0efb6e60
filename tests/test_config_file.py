"""``serve --config FILE`` and ``config show``: one precedence, unknown keys refused, secrets redacted."""

from __future__ import annotations

import tomllib
import urllib.request
from pathlib import Path

import pytest

from ratelimitd import config_file
from ratelimitd.cli import main
from ratelimitd.settings import Settings
from tests.servers import ROOT, RatelimitdProcess, ValkeyProcess, free_port

FILE = """\
listen = "127.0.0.1:6000"
storage_timeout_ms = 300
windows = { minute = 60, hour = 3600 }
header_windows = { requests = "hour", tokens = "minute" }
envoy_domains = ["edge", "internal"]
redis_url = "redis://:hunter2@cache.internal:6379/0"
operator_token = "rlt_file-secret-0123456789"
manual_clock = true
"""


@pytest.fixture(autouse=True)
def no_settings_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets: the developer's own RATELIMITD_* must not leak into these."""
    import os

    for name in list(os.environ):
        if name.startswith("RATELIMITD_"):
            monkeypatch.delenv(name)


def show(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["config", "show", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def shown(out: str) -> dict[str, tuple[str, str]]:
    """config show's lines as {setting: (value as TOML, source)}."""
    rows = {}
    for line in out.splitlines():
        if line.startswith("#"):
            continue
        name, _, rest = line.partition(" = ")
        value, _, source = rest.rpartition("  # ")
        rows[name] = (value, source)
    return rows


def test_flags_beat_the_environment_which_beats_the_file_which_beats_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ratelimitd.toml"
    path.write_text(FILE)
    monkeypatch.setenv("RATELIMITD_STORAGE_TIMEOUT_MS", "400")
    monkeypatch.setenv("RATELIMITD_LISTEN", "127.0.0.1:6500")
    code, out, _ = show(capsys, "--config", str(path), "--listen", "127.0.0.1:7000")
    assert code == 0
    rows = shown(out)
    assert rows["listen"] == ('"127.0.0.1:7000"', "flag")
    assert rows["storage_timeout_ms"] == ("400", "environment RATELIMITD_STORAGE_TIMEOUT_MS")
    assert rows["windows"] == ("{ minute = 60, hour = 3600 }", f"file {path}")
    assert rows["envoy_domains"] == ('["edge", "internal"]', f"file {path}")
    assert rows["drain_s"] == ("5.0", "default")


def test_the_file_may_be_named_by_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ratelimitd.toml"
    path.write_text('listen = "127.0.0.1:6001"\n')
    monkeypatch.setenv("RATELIMITD_CONFIG", str(path))
    code, out, _ = show(capsys)
    assert code == 0 and shown(out)["listen"] == ('"127.0.0.1:6001"', f"file {path}")


def test_secrets_are_redacted_when_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ratelimitd.toml"
    path.write_text(FILE)
    code, out, _ = show(capsys, "--config", str(path))
    assert code == 0
    assert "hunter2" not in out and "rlt_file-secret" not in out
    rows = shown(out)
    assert rows["operator_token"][0] == '"<redacted>"'
    assert rows["redis_url"][0] == '"redis://***@cache.internal:6379/0"'
    # what the file said is still what would run
    settings = config_file.resolve(str(path), {}, {}).settings
    assert settings.operator_token == "rlt_file-secret-0123456789"
    assert settings.redis_url == "redis://:hunter2@cache.internal:6379/0"


def test_what_config_show_prints_is_a_config_file_for_the_same_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ratelimitd.toml"
    path.write_text(FILE.replace("redis_url", "# redis_url").replace("operator_token", "# operator_token"))
    code, out, _ = show(capsys, "--config", str(path))
    assert code == 0
    tomllib.loads(out)  # valid TOML as printed
    again = tmp_path / "again.toml"
    again.write_text(out)
    assert config_file.resolve(str(again), {}, {}).settings == config_file.resolve(str(path), {}, {}).settings


def test_yaml_files_are_read_too(tmp_path: Path) -> None:
    path = tmp_path / "ratelimitd.yaml"
    path.write_text("listen: 127.0.0.1:6002\nwindows: {minute: 60}\nheader_windows: requests=minute,tokens=minute\n")
    settings = config_file.resolve(str(path), {}, {}).settings
    assert (settings.listen, settings.windows) == ("127.0.0.1:6002", {"minute": 60})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("listne = 1\n", "{path}: unknown setting 'listne' (did you mean 'listen'?)"),
        (
            "[metrics]\nlisten = 1\n",
            "{path}: unknown setting 'metrics': settings are top-level NAME = VALUE lines, not tables",
        ),
        ("qqq = 1\n", "{path}: unknown setting 'qqq' (the names are listed by `ratelimitd config show`)"),
        ('workers = "2"\n', "{path}: workers: expected an integer, not '2'"),
        ("manual_clock = 1\n", "{path}: manual_clock: expected true or false, not 1"),
        (
            'windows = { minute = "soon" }\n',
            "{path}: windows: windows: minute=soon must be a name and a positive number of seconds",
        ),
        ('on_storage_error = "maybe"\n', "on_storage_error must be one of unavailable, allow, deny"),
        ('log_format = "xml"\n', "log_format must be one of text, json, not 'xml'"),
        ("listen = \n", "{path} is not valid TOML: "),
    ],
)
def test_a_bad_file_is_refused_naming_the_file_and_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = tmp_path / "ratelimitd.toml"
    path.write_text(text)
    for verb in (["config", "show"], ["serve"]):
        assert main([*verb, "--config", str(path)]) == 2
        _, err = capsys.readouterr()
        assert err.startswith(f"ratelimitd: {message.format(path=path)}"), err
        assert err.count("\n") == 1, err


def test_a_missing_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--config", str(tmp_path / "nope.toml")]) == 2
    assert (
        capsys.readouterr().err
        == f"ratelimitd: cannot read config file {tmp_path / 'nope.toml'}: No such file or directory\n"
    )


def metrics_answer(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return b"ratelimitd_storage_up" in r.read()
    except OSError:
        return False


def test_serve_runs_with_the_file_under_the_environment(tmp_path: Path, valkey: ValkeyProcess) -> None:
    file_port, env_port = free_port(), free_port()
    path = tmp_path / "ratelimitd.toml"
    path.write_text(
        f'redis_url = "{valkey.url}"\nmetrics_listen = "127.0.0.1:{file_port}"\n'
        'operator_token = "rlt_test-operator-token"\nwindows = { minute = 60, hour = 3600 }\n'
        'header_windows = { requests = "hour", tokens = "minute" }\n'
    )
    server = RatelimitdProcess("--config", str(path), log=tmp_path / "serve.log")
    server.start()
    try:
        assert metrics_answer(file_port)
    finally:
        server.stop()
    overridden = RatelimitdProcess(
        "--config", str(path), env={"RATELIMITD_METRICS_LISTEN": f"127.0.0.1:{env_port}"}, log=tmp_path / "env.log"
    )
    overridden.start()
    try:
        assert metrics_answer(env_port) and not metrics_answer(file_port)
    finally:
        overridden.stop()


def test_every_setting_can_be_set_in_a_file() -> None:
    """No setting is left out of the file's type table: each default, written as TOML, reads back."""
    defaults = Settings()
    values = config_file.shown_values(defaults)
    lines = [f"{name} = {config_file._toml(value)}" for name, value in values.items() if value is not None]
    parsed = tomllib.loads("\n".join(lines))
    for name, value in parsed.items():
        assert config_file._typed(name, value) == getattr(defaults, name), name


def section(doc: str, heading: str) -> str:
    text = (ROOT / "docs" / doc).read_text()
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_the_config_file_example_in_operations_md_works_as_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = section("operations.md", "## Config file")
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    Path("ratelimitd.toml").write_text(example)
    monkeypatch.setenv("RATELIMITD_STORAGE_TIMEOUT_MS", "400")
    code, out, _ = show(capsys, "--config", "ratelimitd.toml", "--listen", "127.0.0.1:7000")
    assert code == 0
    documented = text.split("```text\n", 1)[1].split("```", 1)[0]
    for line in documented.splitlines():
        if line != "…":
            assert line in out.splitlines(), line
    refusals = text.split("```text\n", 2)[2].split("```", 1)[0].splitlines()
    for line, file in zip(refusals, ["listne = 1\n", 'workers = "2"\n', "listen = \n"], strict=True):
        Path("ratelimitd.toml").write_text(file)
        assert show(capsys, "--config", "ratelimitd.toml")[:3:2] == (2, line + "\n")
