"""Server settings: defaults < NORMSERVE_* environment < command-line flags."""

from __future__ import annotations

import dataclasses
import re

import pytest

from normserve import cli
from normserve.client import _client
from normserve.server import settings as settings_mod
from normserve.server.settings import Settings

FIELDS = [f.name for f in dataclasses.fields(Settings)]

# A valid, non-default raw value (as it would appear in the environment / on the command
# line) for every setting, and what it parses to.
VALID = {
    "host": ("::1", "::1"),
    "port": ("6000", 6000),
    "metrics_host": ("0.0.0.0", "0.0.0.0"),
    "metrics_port": ("0", 0),
    "max_message_bytes": ("1048576", 1048576),
    "max_tensor_elements": ("1000", 1000),
    "max_tensor_rank": ("4", 4),
    "max_layers": ("7", 7),
    "max_workers": ("3", 3),
    "grace_seconds": ("2.5", 2.5),
    "torch_threads": ("0", 0),
    "metrics_max_labelled_layers": ("5", 5),
    "log_level": ("DEBUG", "DEBUG"),
    "log_format": ("json", "json"),
    "state_dir": (":memory:", ":memory:"),
    "durability": ("interval", "interval"),
    "flush_interval_seconds": ("0.25", 0.25),
    "idempotency_window": ("16", 16),
    "store": ("redis://user:secret@redis.internal:6380/2", "redis://user:secret@redis.internal:6380/2"),
    "store_prefix": ("team-a:norm", "team-a:norm"),
    "store_refresh_seconds": ("0.1", 0.1),
    "max_streams": ("2", 2),
    "max_layer_state_bytes": ("4096", 4096),
    "drain_seconds": ("0.5", 0.5),
    "tls_cert": ("/etc/normserve/cert.pem", "/etc/normserve/cert.pem"),
    "tls_key": ("/etc/normserve/key.pem", "/etc/normserve/key.pem"),
    "tls_client_ca": ("/etc/normserve/ca.pem", "/etc/normserve/ca.pem"),
    "tokens_file": ("/etc/normserve/tokens.json", "/etc/normserve/tokens.json"),
    "max_concurrent_rpcs": ("64", 64),
    "stream_idle_seconds": ("30", 30.0),
    "device": ("cpu", "cpu"),
    "batching": ("on", "on"),
    "batch_max_size": ("8", 8),
    "batch_max_delay_ms": ("0.5", 0.5),
    "max_shm_regions": ("0", 0),
    "max_shm_bytes": ("1048576", 1048576),
    "shm_lease_seconds": ("2.5", 2.5),
}

W3_BATCH_BYTES = 32 * 3 * 224 * 224 * 4  # a (32, 3, 224, 224) float32 batch


def test_valid_table_covers_every_setting():
    assert set(VALID) == set(FIELDS)


# -- defaults ------------------------------------------------------------------------------
def test_defaults_without_environment():
    s = Settings.load(environ={})
    assert s == Settings()
    assert s.host == "127.0.0.1"  # loopback unless asked otherwise
    assert s.metrics_port not in (9090, 9100)  # DESIGN 6: own port, not Prometheus/node-exporter
    assert s.metrics_port != s.port
    assert 1 <= s.port <= 65535 and 1 <= s.metrics_port <= 65535
    assert s.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR")
    s.validate()


def test_default_limits_fit_a_w3_batch():
    s = Settings()
    # The request message carries the tensor plus a few bytes of framing.
    assert s.max_message_bytes >= W3_BATCH_BYTES + 1024
    assert s.max_tensor_elements >= 32 * 3 * 224 * 224
    assert s.max_layers >= 1 and s.max_workers >= 1 and s.grace_seconds > 0


def test_client_defaults_match_server_defaults():
    s = Settings()
    assert _client.DEFAULT_MAX_MESSAGE_BYTES == s.max_message_bytes == settings_mod.DEFAULT_MAX_MESSAGE_BYTES
    host, port = _client.DEFAULT_TARGET.rsplit(":", 1)
    assert int(port) == s.port
    assert host == s.host


def test_settings_are_immutable():
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.port = 1  # type: ignore[misc]
    t = s.replace(port=1)
    assert t.port == 1 and s.port == Settings().port


# -- environment ---------------------------------------------------------------------------
@pytest.mark.parametrize("field", FIELDS)
def test_env_var_name(field):
    assert Settings.env_name(field) == "NORMSERVE_" + field.upper()


# Settings that are only valid together with others.
COMPANIONS = {"tls_cert": ("tls_key",), "tls_key": ("tls_cert",), "tls_client_ca": ("tls_cert", "tls_key")}


@pytest.mark.parametrize("field", FIELDS)
def test_each_setting_read_from_env(field):
    raw, parsed = VALID[field]
    together = (field, *COMPANIONS.get(field, ()))
    s = Settings.load(environ={Settings.env_name(f): VALID[f][0] for f in together})
    value = getattr(s, field)
    assert value == parsed and type(value) is type(parsed)
    # Nothing else moved.
    for other in FIELDS:
        if other not in together:
            assert getattr(s, other) == getattr(Settings(), other)


@pytest.mark.parametrize(
    "values, message",
    [({"tls_cert": "c.pem"}, "go together"), ({"tls_key": "k.pem"}, "go together"),
     ({"tls_client_ca": "ca.pem"}, "needs tls_cert"), ({"max_concurrent_rpcs": 8}, "must exceed the stream limit"),
     ({"stream_idle_seconds": -1.0}, "stream_idle_seconds")],
)
def test_security_settings_are_checked(values, message):
    with pytest.raises(ValueError, match=message):
        Settings.load(values, environ={})


def test_env_is_read_from_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("NORMSERVE_MAX_LAYERS", "3")
    monkeypatch.setenv("NORMSERVE_GRACE_SECONDS", "0")
    s = Settings.load()
    assert s.max_layers == 3 and s.grace_seconds == 0.0


def test_unrelated_env_vars_ignored():
    s = Settings.load(environ={"NORMSERVE_NOT_A_SETTING": "x", "PORT": "1", "normserve_port": "2"})
    assert s == Settings()


def test_metrics_can_be_disabled_from_env():
    assert Settings.load(environ={"NORMSERVE_METRICS_PORT": "-1"}).metrics_port == -1


def test_port_zero_allowed():
    assert Settings.load(environ={"NORMSERVE_PORT": "0"}).port == 0


# -- precedence ----------------------------------------------------------------------------
def test_precedence_defaults_env_overrides():
    env = {"NORMSERVE_PORT": "6001", "NORMSERVE_MAX_LAYERS": "5", "NORMSERVE_LOG_LEVEL": "WARNING"}
    s = Settings.load({"port": 7001, "max_workers": 2}, environ=env)
    assert s.port == 7001  # override beats env
    assert s.max_layers == 5  # env beats default
    assert s.log_level == "WARNING"
    assert s.max_workers == 2  # override beats default
    assert s.host == Settings().host  # default


def test_none_overrides_are_ignored():
    s = Settings.load({"port": None, "max_layers": None}, environ={"NORMSERVE_PORT": "6002"})
    assert s.port == 6002 and s.max_layers == Settings().max_layers


def test_override_is_validated():
    with pytest.raises(ValueError, match="max_layers"):
        Settings.load({"max_layers": 0}, environ={})


# -- invalid values ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "var, raw",
    [
        ("NORMSERVE_PORT", "abc"),
        ("NORMSERVE_PORT", "1.5"),
        ("NORMSERVE_PORT", ""),
        ("NORMSERVE_MAX_LAYERS", "ten"),
        ("NORMSERVE_MAX_MESSAGE_BYTES", "64MB"),
        ("NORMSERVE_GRACE_SECONDS", "soon"),
        ("NORMSERVE_METRICS_PORT", "off"),
    ],
)
def test_unparseable_env_values_rejected(var, raw):
    with pytest.raises(ValueError) as e:
        Settings.load(environ={var: raw})
    msg = str(e.value)
    assert var in msg and repr(raw) in msg, msg


@pytest.mark.parametrize(
    "field, value",
    [
        ("port", -1),
        ("port", 65536),
        ("metrics_port", -2),
        ("metrics_port", 70000),
        ("max_message_bytes", 0),
        ("max_tensor_elements", -5),
        ("max_layers", 0),
        ("max_workers", 0),
        ("grace_seconds", -0.5),
        ("torch_threads", -1),
        ("log_level", "verbose"),
        ("log_level", ""),
        ("store", "postgresql://db/normserve"),
        ("store", "/var/lib/normserve"),
        ("store_prefix", ""),
        ("store_prefix", "a b"),
        ("store_refresh_seconds", 0),
        ("store_refresh_seconds", float("nan")),
        ("store_refresh_seconds", 61),
        ("batching", "maybe"),
        ("batch_max_size", 0),
        ("batch_max_size", -4),
        ("batch_max_delay_ms", -1.0),
        ("batch_max_delay_ms", 5000.0),
        ("max_shm_regions", -1),
        ("max_shm_bytes", 0),
        ("shm_lease_seconds", 0.0),
        ("shm_lease_seconds", float("inf")),
    ],
)
def test_out_of_range_values_rejected(field, value):
    with pytest.raises(ValueError) as e:
        Settings.load({field: value}, environ={})
    assert field in str(e.value), str(e.value)
    with pytest.raises(ValueError):
        Settings.load(environ={Settings.env_name(field): str(value)})


def test_negative_labelled_layer_cap_rejected():
    """A negative cap would slice the layer list from the end (layers[:-1] labels all but
    the last layer), so it must be refused like the other counts."""
    with pytest.raises(ValueError, match="metrics_max_labelled_layers"):
        Settings.load({"metrics_max_labelled_layers": -1}, environ={})


def test_non_finite_grace_seconds_rejected():
    """grace_seconds is a duration: NaN is not one (it is neither < 0 nor >= 0, so a plain
    `< 0` check lets it through)."""
    with pytest.raises(ValueError, match="grace_seconds"):
        Settings.load(environ={"NORMSERVE_GRACE_SECONDS": "nan"})


def test_log_level_case_insensitive():
    assert Settings.load(environ={"NORMSERVE_LOG_LEVEL": "debug"}).log_level.upper() == "DEBUG"


# -- command line --------------------------------------------------------------------------
def _help(capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_serve_help_lists_every_setting_with_its_env_var(capsys, monkeypatch):
    text = _help(capsys, monkeypatch)
    for field in FIELDS:
        flag = "--" + field.replace("_", "-")
        assert re.search(rf"{re.escape(flag)}\b", text), f"{flag} missing from `normserve serve --help`"
        assert Settings.env_name(field) in text, f"{Settings.env_name(field)} missing from help"
    # Each flag's own help entry names its env var (not just somewhere in the page).
    options = text.split("options:", 1)[1]
    for field in FIELDS:
        flag = "--" + field.replace("_", "-")
        entry = re.search(rf"{re.escape(flag)} {field.upper()} (.*?)(?= --[a-z]|$)", options)
        assert entry, flag
        assert f"env {Settings.env_name(field)}" in entry.group(1), entry.group(1)
        assert f"default {getattr(Settings(), field)}" in entry.group(1), entry.group(1)


def test_metrics_disable_documented_in_help(capsys, monkeypatch):
    text = _help(capsys, monkeypatch)
    options = text.split("options:", 1)[1]
    entry = options.split("--metrics-port METRICS_PORT", 1)[1].split("--max-message-bytes", 1)[0]
    assert "-1" in entry and "disable" in entry, entry


@pytest.fixture
def captured_settings(monkeypatch):
    """Run `normserve serve ...` in-process up to the point where it would start serving,
    capturing the Settings the command line produced."""
    from normserve.server import app

    seen: list[Settings] = []

    def fake_serve(settings: Settings) -> int:
        seen.append(settings)
        return 0

    monkeypatch.setattr(app, "serve", fake_serve)
    for field in FIELDS:
        monkeypatch.delenv(Settings.env_name(field), raising=False)
    return seen


def test_cli_flags_parsed_with_types(captured_settings):
    argv = ["serve"]
    for field in FIELDS:
        argv += ["--" + field.replace("_", "-"), VALID[field][0]]
    assert cli.main(argv) == 0
    (s,) = captured_settings
    for field in FIELDS:
        assert getattr(s, field) == VALID[field][1], field


def test_cli_flag_beats_env_beats_default(captured_settings, monkeypatch):
    monkeypatch.setenv("NORMSERVE_MAX_LAYERS", "4")
    monkeypatch.setenv("NORMSERVE_PORT", "6003")
    assert cli.main(["serve", "--port", "6004", "--metrics-port", "-1"]) == 0
    (s,) = captured_settings
    assert s.port == 6004 and s.max_layers == 4 and s.metrics_port == -1
    assert s.max_workers == Settings().max_workers


@pytest.mark.parametrize(
    "argv, env, needle",
    [
        (["serve", "--port", "abc"], {}, "--port"),
        (["serve", "--max-layers", "0"], {}, "max_layers"),
        (["serve"], {"NORMSERVE_MAX_WORKERS": "many"}, "NORMSERVE_MAX_WORKERS"),
        (["serve", "--log-level", "loud"], {}, "log_level"),
        (["serve", "--no-such-flag", "1"], {}, "--no-such-flag"),
        (["serve", "--batch-max-size", "-1"], {}, "batch_max_size must be in [1, "),
        (["serve", "--batch-max-delay-ms", "-0.5"], {}, "batch_max_delay_ms must be a number in [0, 1000]"),
        (["serve"], {"NORMSERVE_BATCHING": "yes"}, "batching must be on or off"),
    ],
)
def test_cli_invalid_values_exit_2_with_message(captured_settings, monkeypatch, capsys, argv, env, needle):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "error" in err, err
    assert captured_settings == []


def test_version_flag(capsys):
    import normserve

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert normserve.__version__ in capsys.readouterr().out

