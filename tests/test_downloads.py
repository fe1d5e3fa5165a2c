"""service.downloads over real HTTP(S), against local servers that misbehave on purpose.

The only fake is DNS: tests pass a resolver so that names like cdn.replicate.delivery lead to
the local server (or to a private address) without touching the network."""

from __future__ import annotations

import base64
import shutil
import ssl
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from service.downloads import (
    DisallowedURL,
    DownloadFailed,
    DownloadPolicy,
    DownloadTooLarge,
    NotAnImage,
    fetch,
    sniff_image,
)
from service.errors import ConfigError

CAP = 200_000  # bytes; small so the over-the-cap bodies stay cheap


def png(width: int = 2, height: int = 2) -> bytes:
    """A real RGB PNG, built with zlib and struct."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + bytes([200, 30, 30]) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


PNG = png()
# A JFIF header (SOI, APP0); the module judges images by their signature only.
JPEG = bytes.fromhex("ffd8ffe000104a46494600010100000100010000") + b"\x00" * 64 + b"\xff\xd9"
GIF = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"
WEBP = b"RIFF" + struct.pack("<I", 20) + b"WEBPVP8 " + b"\x00" * 12
HTML = b"<!doctype html><html><body>not an image</body></html>"


class Server:
    """A local HTTP(S) server whose routes misbehave on purpose; `seen` lists every request."""

    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        self.seen: list[dict[str, Any]] = []
        handler = type("Handler", (_Handler,), {"owner": self})
        self.httpd = ThreadingHTTPServer((host, 0), handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.host, self.port = host, self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str, host: str | None = None, scheme: str = "http") -> str:
        return f"{scheme}://{host or self.host}:{self.port}{path}"

    def paths(self) -> list[str]:
        return [r["path"] for r in self.seen]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        self.owner.seen.append({"path": parts.path, "headers": dict(self.headers)})
        try:
            ROUTES[parts.path](self, parse_qs(parts.query))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading, as it should

    def reply(self, status: int, body: bytes = b"", content_type: str | None = None,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def chunked(self, parts: Iterator[bytes], headers: dict[str, str] | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        for part in parts:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
        self.wfile.write(b"0\r\n\r\n")


def _big_body() -> Iterator[bytes]:
    yield PNG[:16]
    for _ in range(2 * CAP // 8192 + 2):
        yield b"\x00" * 8192


def _declared_huge(h: _Handler, q: dict) -> None:
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Content-Length", str(10**9))
    h.end_headers()
    h.wfile.write(PNG[:16])
    h.wfile.flush()
    time.sleep(3)  # a client that started reading would wait here
    h.wfile.write(b"\x00" * 1024)


def _close_delimited_huge(h: _Handler, q: dict) -> None:
    h.close_connection = True
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Connection", "close")
    h.end_headers()
    for part in _big_body():
        h.wfile.write(part)


def _slow_body(h: _Handler, q: dict) -> None:
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Content-Length", str(len(PNG)))
    h.end_headers()
    h.wfile.write(PNG[:16])
    h.wfile.flush()
    time.sleep(1.5)
    h.wfile.write(PNG[16:])


def _slow_headers(h: _Handler, q: dict) -> None:
    time.sleep(1.5)
    h.reply(200, PNG, "image/png")


ROUTES: dict[str, Callable[[_Handler, dict], None]] = {
    "/image.png": lambda h, q: h.reply(200, PNG, "image/png"),
    "/photo.jpg": lambda h, q: h.reply(200, JPEG, "image/jpeg"),
    "/anim.gif": lambda h, q: h.reply(200, GIF, "image/gif"),
    "/pic.webp": lambda h, q: h.reply(200, WEBP, "image/webp"),
    "/download": lambda h, q: h.reply(200, PNG, "application/octet-stream"),
    "/page.png": lambda h, q: h.reply(200, HTML, "image/png"),
    "/declared-huge.png": _declared_huge,
    "/chunked-huge.png": lambda h, q: h.chunked(_big_body()),
    "/lying-length.png": lambda h, q: h.chunked(_big_body(), {"Content-Length": "100"}),
    "/close-delimited-huge.png": _close_delimited_huge,
    "/chunked-small.png": lambda h, q: h.chunked(iter([PNG[:3], PNG[3:10], PNG[10:]])),
    "/slow-body.png": _slow_body,
    "/slow-headers.png": _slow_headers,
    "/redirect-to-image": lambda h, q: h.reply(302, headers={"Location": "/image.png"}),
    "/redirect": lambda h, q: h.reply(int(q.get("status", ["302"])[0]), headers={"Location": q["to"][0]}),
    "/redirect-loop": lambda h, q: h.reply(301, headers={"Location": "/redirect-loop"}),
    "/missing.png": lambda h, q: h.reply(404, b"not found", "text/plain"),
    "/unavailable.png": lambda h, q: h.reply(503, b"try later", "text/plain"),
    "/throttled.png": lambda h, q: h.reply(429, b"slow down", "text/plain"),
}


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def other() -> Iterator[Server]:
    """A second server on 127.0.0.2, which the policies below never allow."""
    try:
        s = Server("127.0.0.2")
    except OSError:
        pytest.skip("127.0.0.2 is not available on this machine")
    yield s
    s.close()


def resolver(table: dict[str, list[str]], calls: list[str] | None = None) -> Callable[[str, int], list[str]]:
    def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise OSError(f"unknown host {host}")
        return table[host]
    return resolve


def no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"{host} was resolved; the URL should have been refused before any network use")


def policy(hosts: str = "127.0.0.1", **overrides: Any) -> DownloadPolicy:
    config = {"OUTPUT_ALLOWED_HOSTS": hosts, "DOWNLOAD_MAX_BYTES": str(CAP),
              "DOWNLOAD_CONNECT_TIMEOUT": "1", "DOWNLOAD_READ_TIMEOUT": "0.5"}
    return DownloadPolicy.from_config(config, **overrides)


def data_uri(body: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(body).decode()


# --- settings ---------------------------------------------------------------------------------

def test_policy_defaults_and_settings() -> None:
    default = DownloadPolicy.from_config({})
    assert (default.allowed_hosts, default.max_bytes) == (frozenset(), 50_000_000)
    assert (default.connect_timeout, default.read_timeout) == (5.0, 30.0)
    custom = DownloadPolicy.from_config({"OUTPUT_ALLOWED_HOSTS": " 127.0.0.1, Sim.Local. ,[::1],",
                                         "DOWNLOAD_MAX_BYTES": "1000", "DOWNLOAD_READ_TIMEOUT": "2.5"})
    assert custom.allowed_hosts == {"127.0.0.1", "sim.local", "::1"}
    assert (custom.max_bytes, custom.read_timeout) == (1000, 2.5)


@pytest.mark.parametrize("config", [{"OUTPUT_ALLOWED_HOSTS": "127.0.0.1:8000"},
                                    {"OUTPUT_ALLOWED_HOSTS": "http://sim.local"},
                                    {"OUTPUT_ALLOWED_HOSTS": "10.0.0.0/8"},
                                    {"DOWNLOAD_MAX_BYTES": "lots"}, {"DOWNLOAD_READ_TIMEOUT": "0"}])
def test_malformed_settings_name_themselves(config: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=next(iter(config))):
        DownloadPolicy.from_config(config)


# --- what is fetched --------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "image_type", "body"), [
    ("/image.png", "image/png", PNG), ("/photo.jpg", "image/jpeg", JPEG), ("/anim.gif", "image/gif", GIF),
    ("/pic.webp", "image/webp", WEBP), ("/chunked-small.png", "image/png", PNG),
])
def test_images_are_fetched(server: Server, path: str, image_type: str, body: bytes) -> None:
    got = fetch(server.url(path), policy())
    assert (got.data, got.image_type, got.final_url) == (body, image_type, server.url(path))
    assert got.elapsed_ms >= 0
    assert got.extension == {"image/jpeg": "jpg"}.get(image_type, image_type.split("/")[1])


def test_image_type_comes_from_the_bytes_not_the_header(server: Server) -> None:
    got = fetch(server.url("/download"), policy())
    assert (got.content_type, got.image_type) == ("application/octet-stream", "image/png")


def test_html_named_png_is_refused(server: Server) -> None:
    with pytest.raises(NotAnImage, match="declared as image/png") as caught:
        fetch(server.url("/page.png"), policy())
    assert caught.value.transient is False


def test_sniffing() -> None:
    assert sniff_image(PNG) == "image/png"
    assert sniff_image(b"") is None
    assert sniff_image(b"RIFF\x00\x00\x00\x00WAVEfmt ") is None  # a RIFF that is not WebP


# --- size and time ----------------------------------------------------------------------------

def test_declared_length_over_the_cap_is_refused_before_reading(server: Server) -> None:
    started = time.monotonic()
    with pytest.raises(DownloadTooLarge, match="1000000000 bytes") as caught:
        fetch(server.url("/declared-huge.png"), policy())
    assert time.monotonic() - started < 1.5  # the body would take 3 s to come
    assert caught.value.transient is False


@pytest.mark.parametrize("path", ["/chunked-huge.png", "/lying-length.png", "/close-delimited-huge.png"])
def test_cap_is_enforced_while_streaming(server: Server, path: str) -> None:
    with pytest.raises(DownloadTooLarge, match=f"limit of {CAP} bytes"):
        fetch(server.url(path), policy())


def test_a_body_at_the_cap_passes(server: Server) -> None:
    assert fetch(server.url("/image.png"), policy(max_bytes=len(PNG))).data == PNG
    with pytest.raises(DownloadTooLarge):
        fetch(server.url("/image.png"), policy(max_bytes=len(PNG) - 1))


@pytest.mark.parametrize("path", ["/slow-body.png", "/slow-headers.png"])
def test_read_timeout_is_transient(server: Server, path: str) -> None:
    started = time.monotonic()
    with pytest.raises(DownloadFailed, match="timed out") as caught:
        fetch(server.url(path), policy(read_timeout=0.3))
    assert caught.value.transient is True
    assert time.monotonic() - started < 1.4


def test_total_timeout(server: Server) -> None:
    with pytest.raises(DownloadFailed, match="took over") as caught:
        fetch(server.url("/slow-body.png"), policy(read_timeout=3, total_timeout=0.2))
    assert caught.value.transient is True


def test_refused_connection_is_transient() -> None:
    with pytest.raises(DownloadFailed, match="connection to 127.0.0.1 failed") as caught:
        fetch("http://127.0.0.1:9/image.png", policy())
    assert caught.value.transient is True


# --- HTTP statuses ----------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "status", "transient"), [
    ("/missing.png", 404, False), ("/unavailable.png", 503, True), ("/throttled.png", 429, True),
])
def test_statuses(server: Server, path: str, status: int, transient: bool) -> None:
    with pytest.raises(DownloadFailed, match=f"HTTP {status}") as caught:
        fetch(server.url(path), policy())
    assert (caught.value.http_status, caught.value.transient) == (status, transient)


# --- redirects --------------------------------------------------------------------------------

def test_redirect_to_an_allowed_path_is_followed(server: Server) -> None:
    got = fetch(server.url("/redirect-to-image"), policy())
    assert (got.data, got.final_url) == (PNG, server.url("/image.png"))


def test_at_most_five_redirects(server: Server) -> None:
    before = server.paths().count("/redirect-loop")
    with pytest.raises(DownloadFailed, match="more than 5 redirects") as caught:
        fetch(server.url("/redirect-loop"), policy())
    assert caught.value.transient is False
    assert server.paths().count("/redirect-loop") - before == 6  # the URL and five redirects


def test_redirect_to_a_disallowed_host_fetches_nothing_from_it(server: Server, other: Server) -> None:
    target = other.url("/image.png")
    with pytest.raises(DisallowedURL, match="redirect refused: host 127.0.0.2") as caught:
        fetch(server.url(f"/redirect?to={target}"), policy())
    assert caught.value.reason == "redirect"
    assert other.seen == []


@pytest.mark.parametrize("target", ["http://localhost:{port}/image.png", "file:///etc/passwd",
                                    "http://169.254.169.254/latest/meta-data/", "http://[::1]:{port}/x.png",
                                    "data:image/png;base64,iVBORw0KGgo=", "gopher://127.0.0.1:{port}/x"])
def test_redirect_targets_are_checked_like_urls(server: Server, target: str) -> None:
    before = len(server.seen)
    with pytest.raises(DisallowedURL) as caught:
        fetch(server.url("/redirect?status=307&to=" + target.format(port=server.port)), policy())
    assert caught.value.reason == "redirect"
    assert len(server.seen) == before + 1  # only the redirect itself was asked for


# --- the allow list and the SSRF guard --------------------------------------------------------

@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://replicate.delivery/out.png",
                                 "gopher://replicate.delivery/", "javascript:alert(1)",
                                 "//replicate.delivery/out.png", "http://replicate.delivery/out.png",
                                 "http://cdn.replicate.delivery/out.png"])
def test_schemes_other_than_https_are_refused_without_network(url: str) -> None:
    with pytest.raises(DisallowedURL) as caught:
        fetch(url, policy(resolver=no_dns))
    assert caught.value.reason == "scheme"
    assert caught.value.transient is False


@pytest.mark.parametrize("url", ["https://evilreplicate.delivery/out.png", "https://replicate.delivery.evil.com/x",
                                 "https://example.com/out.png", "http://169.254.169.254/latest/meta-data/",
                                 "http://[::1]/", "http://localhost/x.png", "http://127.0.0.2/x.png",
                                 "http://2130706433/x.png", "http://0x7f.1/x.png"])
def test_hosts_not_allowed_are_refused_without_network(url: str) -> None:
    with pytest.raises(DisallowedURL) as caught:
        fetch(url, policy(resolver=no_dns))
    assert caught.value.reason == "host"


@pytest.mark.parametrize("url", ["https://user:pw@replicate.delivery/out.png",
                                 "https://replicate.delivery:99999/out.png", "https://[::1/out.png",
                                 "https://repl icate.delivery/x"])
def test_malformed_urls_are_refused(url: str) -> None:
    with pytest.raises(DisallowedURL) as caught:
        fetch(url, policy(resolver=no_dns))
    assert caught.value.reason == "malformed"


def test_a_name_that_only_resolves_to_an_allowed_ip_is_still_refused(server: Server) -> None:
    # 127.0.0.1 is allowed for the simulator; "localhost" is not, though it resolves there.
    before = len(server.seen)
    with pytest.raises(DisallowedURL, match="host localhost is not allowed"):
        fetch(server.url("/image.png", host="localhost"), policy())
    assert len(server.seen) == before


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
                                     "100.64.0.1", "224.0.0.1", "0.0.0.0", "::1", "fc00::1", "fe80::1", "::",
                                     "ff02::1", "::ffff:10.0.0.1", "2002:a00:1::1"])
def test_replicate_names_resolving_to_private_addresses_are_refused(address: str) -> None:
    resolve = resolver({"cdn.replicate.delivery": [address]})
    with pytest.raises(DisallowedURL, match="non-public address") as caught:
        fetch("https://cdn.replicate.delivery/out.png", policy("", resolver=resolve))
    assert caught.value.reason == "private_address"


def test_one_private_address_among_public_ones_is_enough_to_refuse() -> None:
    resolve = resolver({"replicate.delivery": ["93.184.216.34", "10.0.0.7"]})
    with pytest.raises(DisallowedURL, match=r"10\.0\.0\.7"):
        fetch("https://replicate.delivery/out.png", policy(resolver=resolve))


def test_a_listed_name_must_resolve_to_a_listed_address_when_private(server: Server) -> None:
    resolve = resolver({"sim.local": ["127.0.0.1"]})
    with pytest.raises(DisallowedURL, match="non-public address"):
        fetch(server.url("/image.png", host="sim.local"), policy("sim.local", resolver=resolve))
    got = fetch(server.url("/image.png", host="sim.local"), policy("sim.local,127.0.0.1", resolver=resolve))
    assert got.data == PNG


def test_the_checked_address_is_the_one_connected_to(server: Server) -> None:
    """Resolved once per hop: a second, different answer (DNS rebinding) is never used."""
    answers = iter([["127.0.0.1"], ["10.255.255.1"], ["10.255.255.1"]])
    calls: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return next(answers)

    got = fetch(server.url("/image.png", host="sim.local"), policy("sim.local,127.0.0.1", resolver=rebinding))
    assert got.data == PNG
    assert calls == ["sim.local"]
    assert server.seen[-1]["headers"]["Host"] == f"sim.local:{server.port}"


def test_unresolvable_names_are_transient() -> None:
    with pytest.raises(DownloadFailed, match="could not resolve") as caught:
        fetch("https://nowhere.replicate.delivery/out.png", policy(resolver=resolver({})))
    assert caught.value.transient is True


# --- data: URIs -------------------------------------------------------------------------------

def test_data_uri_is_decoded_locally() -> None:
    got = fetch(data_uri(PNG), policy(resolver=no_dns))
    assert (got.data, got.image_type, got.content_type) == (PNG, "image/png", "image/png")
    assert got.final_url == "data:image/png;base64,"


def test_data_uri_declared_type_is_not_trusted() -> None:
    assert fetch(data_uri(JPEG, "text/plain"), policy()).image_type == "image/jpeg"
    with pytest.raises(NotAnImage):
        fetch(data_uri(HTML, "image/png"), policy())


def test_data_uri_over_the_cap_is_refused() -> None:
    with pytest.raises(DownloadTooLarge):
        fetch(data_uri(PNG + b"\x00" * CAP), policy())
    with pytest.raises(DownloadTooLarge):  # close to the cap: decided after decoding
        fetch(data_uri(PNG + b"\x00" * (CAP - len(PNG) + 1)), policy())
    assert len(fetch(data_uri(PNG + b"\x00" * (CAP - len(PNG))), policy()).data) == CAP


@pytest.mark.parametrize("uri", ["data:image/png;base64,iVBORw0KGgo@@@", "data:image/png;base64,iVBORw0KGg",
                                 "data:image/png;base64"])
def test_malformed_data_uris_are_refused(uri: str) -> None:
    with pytest.raises(DisallowedURL) as caught:
        fetch(uri, policy())
    assert (caught.value.reason, caught.value.transient) == ("malformed", False)


def test_percent_encoded_data_uri() -> None:
    assert fetch("data:image/gif,GIF89a%01%00%01%00%00%00%00;", policy()).data == GIF


# --- https: the connection goes to the checked IP, TLS still checks the name ------------------

@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str, list[str]]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=images.test",
                    "-addext", "subjectAltName=DNS:images.test,DNS:cdn.replicate.delivery"],
                   check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    names: list[str] = []
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    s = Server(tls=context)
    yield s, str(Path(cert)), names
    s.close()


LOCAL = {"images.test": ["127.0.0.1"], "cdn.replicate.delivery": ["127.0.0.1"], "other.test": ["127.0.0.1"]}


@pytest.mark.parametrize("host", ["images.test", "cdn.replicate.delivery"])
def test_https_by_checked_ip_with_the_name_for_sni_and_certificate(tls: tuple, host: str) -> None:
    server, cert, names = tls
    got = fetch(server.url("/image.png", host=host, scheme="https"),
                policy("images.test,127.0.0.1", resolver=resolver(LOCAL), ca_bundle=cert))
    assert got.data == PNG
    assert names[-1] == host
    assert server.seen[-1]["headers"]["Host"] == f"{host}:{server.port}"


def test_https_certificate_must_match_the_name(tls: tuple) -> None:
    server, cert, _ = tls
    with pytest.raises(DownloadFailed, match="other.test"):
        fetch(server.url("/image.png", host="other.test", scheme="https"),
              policy("other.test,127.0.0.1", resolver=resolver(LOCAL), ca_bundle=cert))
