"""``rafs.hosts``: containerd's hosts.toml layout, read as containerd reads it.

Pure parsing (order, capabilities, URLs and ``override_path``, paths relative
to the file, headers, durations), the directory lookup (``HOST_PORT_``, then
``HOST:PORT``, then ``_default``; Docker's certificate files without a
hosts.toml), and one error line naming the file for each kind of bad input.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from rafs.errors import ConfigError
from rafs.hosts import CAPABILITIES, host_dirs, load_hosts, parse_hosts

REG = "registry.example:5000"


def parse(text: str, registry: str = REG, base: str = "/etc/certs.d/x"):
    return parse_hosts(text, registry, base_dir=Path(base), name="/etc/certs.d/x/hosts.toml")


def test_mirrors_come_in_file_order_then_the_registry_with_every_capability() -> None:
    hosts = parse('[host."https://b.mirror"]\ncapabilities = ["pull"]\n'
                  '[host."http://a.mirror:5000"]\ncapabilities = ["pull", "resolve"]\n')
    assert [e.url for e in hosts.endpoints] == ["https://b.mirror", "http://a.mirror:5000",
                                                 "https://registry.example:5000"]
    assert [e.server for e in hosts.endpoints] == [False, False, True]
    assert hosts.endpoints[-1].capabilities == CAPABILITIES
    assert [e.url for e in hosts.serving("resolve")] == ["http://a.mirror:5000",
                                                          "https://registry.example:5000"]
    assert len(hosts.serving("pull")) == 3
    assert [e.url for e in hosts.serving("push")] == ["https://registry.example:5000"]


def test_server_replaces_the_registry_and_takes_the_root_settings() -> None:
    hosts = parse('server = "mirror.only"\ncapabilities = ["pull", "resolve"]\n'
                  'skip_verify = true\n')
    (only,) = hosts.endpoints
    assert only.url == "https://mirror.only" and only.server and only.skip_verify
    assert hosts.serving("push") == ()


def test_a_host_without_capabilities_gets_all_of_them_as_in_containerd() -> None:
    hosts = parse('[host."https://m"]\n[host."https://n"]\ncapabilities = []\n'
                  '[host."https://r"]\ncapabilities = ["pull", "referrers"]\n')
    assert hosts.endpoints[0].capabilities == CAPABILITIES
    assert hosts.endpoints[1].capabilities == CAPABILITIES
    assert hosts.endpoints[2].capabilities == frozenset({"pull"})


@pytest.mark.parametrize(("url", "override", "expected"), [
    ("https://m", False, ("https://m", "/v2")),
    ("m:5000", False, ("https://m:5000", "/v2")),
    ("http://m/v2", False, ("http://m", "/v2")),
    ("https://m/cache/", False, ("https://m", "/cache/v2")),
    ("https://m/v2/upstream", True, ("https://m", "/v2/upstream")),
    ("https://m", True, ("https://m", "")),
    ("http://[::1]:5000", False, ("http://[::1]:5000", "/v2")),
])
def test_endpoint_urls_and_api_roots(url: str, override: bool, expected: tuple[str, str]) -> None:
    text = f'[host."{url}"]\noverride_path = {str(override).lower()}\n'
    e = parse(text).endpoints[0]
    assert (e.url, e.root) == expected


def test_paths_are_relative_to_the_file_and_headers_repeat() -> None:
    hosts = parse('[host."https://m"]\nca = ["m.pem", "/abs/other.pem"]\n'
                  'client = [["c.cert", "c.key"], "both.pem"]\ndial_timeout = "1m30s"\n'
                  '[host."https://m".header]\nx-one = "1"\nx-two = ["a", "b"]\n',
                  base="/etc/certs.d/x")
    e = hosts.endpoints[0]
    assert e.ca == ("/etc/certs.d/x/m.pem", "/abs/other.pem")
    assert e.client == (("/etc/certs.d/x/c.cert", "/etc/certs.d/x/c.key"),
                        ("/etc/certs.d/x/both.pem", None))
    assert e.headers == (("x-one", "1"), ("x-two", "a"), ("x-two", "b"))
    assert e.dial_timeout == 90.0
    assert e.custom_tls


def test_docker_hub_and_localhost_defaults() -> None:
    assert parse("", "docker.io").endpoints[-1].url == "https://registry-1.docker.io"
    assert parse("", "localhost:5000").endpoints[-1].url == "http://localhost:5000"


def test_unknown_keys_are_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        hosts = parse('[host."https://m"]\ncapabilites = ["pull"]\n')
    assert hosts.endpoints[0].capabilities == CAPABILITIES
    assert "capabilites" in caplog.text and "hosts.toml" in caplog.text


@pytest.mark.parametrize(("text", "words"), [
    ('server = "https://x"\n[host', "not valid TOML"),
    ('[host."https://m"]\ncapabilities = ["pul"]\n', "unknown capability 'pul'"),
    ('[host."https://m"]\ncapabilities = "pull, resolve"\n', "unknown capability"),
    ('[host."https://m"]\nskip_verify = "yes"\n', "skip_verify must be true or false"),
    ('[host."https://m"]\nca = 3\n', "ca must be a string or a list"),
    ('[host."https://m"]\nclient = [["a"]]\n', "client must be"),
    ('[host."https://m"]\ndial_timeout = "soon"\n', "not a duration"),
    ('[host."https://m:99999"]\n', "bad URL"),
    ('[host."https://"]\n', "bad URL"),
    ('[host."https://m?x=1"]\n', "bad URL"),
    ('server = 5\n', "server must be a URL"),
    ('host = 5\n', "host must be a table"),
])
def test_bad_input_is_one_line_naming_the_file(text: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text)
    message = str(info.value)
    assert message.startswith("/etc/certs.d/x/hosts.toml: ") and words in message, message
    assert "\n" not in message


def test_lookup_order_of_the_directories(tmp_path: Path) -> None:
    assert host_dirs(tmp_path, "r.example:5000") == [
        tmp_path / "r.example_5000_", tmp_path / "r.example:5000", tmp_path / "_default"]
    assert host_dirs(tmp_path, "r.example") == [tmp_path / "r.example", tmp_path / "_default"]
    (tmp_path / "_default").mkdir()
    (tmp_path / "_default" / "hosts.toml").write_text('[host."https://any.mirror"]\n')
    assert load_hosts("r.example:5000", tmp_path).endpoints[0].url == "https://any.mirror"
    (tmp_path / "r.example:5000").mkdir()
    (tmp_path / "r.example:5000" / "hosts.toml").write_text('[host."https://colon"]\n')
    assert load_hosts("r.example:5000", tmp_path).endpoints[0].url == "https://colon"
    (tmp_path / "r.example_5000_").mkdir()
    (tmp_path / "r.example_5000_" / "hosts.toml").write_text('[host."https://under"]\n')
    hosts = load_hosts("r.example:5000", tmp_path)
    assert hosts.endpoints[0].url == "https://under"
    assert hosts.source == tmp_path / "r.example_5000_" / "hosts.toml"


def test_no_configuration_is_the_registry_alone(tmp_path: Path) -> None:
    hosts = load_hosts("r.example", tmp_path / "missing")
    assert [e.url for e in hosts.endpoints] == ["https://r.example"] and not hosts.mirrored


def test_docker_certificate_files_without_a_hosts_toml(tmp_path: Path) -> None:
    d = tmp_path / "r.example"
    d.mkdir()
    for name in ("ca.crt", "client.cert", "client.key", "other.cert"):
        (d / name).write_text("x")
    (only,) = load_hosts("r.example", tmp_path).endpoints
    assert only.ca == (str(d / "ca.crt"),)
    assert only.client == ((str(d / "client.cert"), str(d / "client.key")),
                           (str(d / "other.cert"), None))


def test_missing_certificate_files_name_the_hosts_toml(tmp_path: Path) -> None:
    d = tmp_path / "r.example"
    d.mkdir()
    (d / "hosts.toml").write_text('[host."https://m"]\nca = "nope.pem"\n')
    with pytest.raises(ConfigError, match=r"hosts.toml: .*CA file .*nope.pem does not exist"):
        load_hosts("r.example", tmp_path)
    (d / "hosts.toml").write_text('[host."https://m"]\nclient = ["c.pem"]\n')
    with pytest.raises(ConfigError, match=r"client certificate file .*c.pem does not exist"):
        load_hosts("r.example", tmp_path)


def test_the_environment_names_the_default_directory(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "r.example"
    d.mkdir()
    (d / "hosts.toml").write_text('[host."https://m"]\n')
    monkeypatch.setenv("RAFS_HOSTS_DIR", str(tmp_path))
    assert load_hosts("r.example").mirrored
