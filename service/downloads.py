"""Fetch one Replicate output safely: allow-listed hosts, no private addresses, capped size, images only.

Every hop (the URL and each redirect) is checked before anything is sent to it: the scheme
(https for replicate.delivery and its subdomains; http too for hosts listed in
OUTPUT_ALLOWED_HOSTS), the host, and every address the host resolves to. The name is
resolved once per hop and the connection goes to the address that was checked (the URL is
rewritten to that IP; the Host header, TLS SNI and certificate check keep the host name), so
a DNS answer that changes between check and connect cannot reach another address. Private,
loopback, link-local, multicast and reserved addresses are refused unless that very address
is listed in OUTPUT_ALLOWED_HOSTS. Proxies from the environment are ignored: they would
connect on our behalf to an address we never checked.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, unquote_to_bytes, urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ReadTimeoutError

from service.errors import ConfigError, ServiceError
from service.imaging import NotAnImage, media_type

logger = logging.getLogger(__name__)

REPLICATE_DELIVERY = "replicate.delivery"
REDIRECTS = {301, 302, 303, 307, 308}
TRANSIENT_STATUSES = {408, 425, 429}
CHUNK = 64 * 1024
SNIFF_BYTES = 16  # enough for every signature sniff_image knows
IMAGE_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]


class DisallowedURL(ServiceError):
    """The URL is not one the service may fetch."""

    code = "disallowed_url"
    status = 422
    transient = False

    def __init__(self, message: str | None = None, *, reason: str = "host") -> None:
        # reason: scheme | host | private_address | redirect | malformed
        self.reason = reason
        super().__init__(message)


class DownloadTooLarge(ServiceError):
    """The download is larger than DOWNLOAD_MAX_BYTES."""

    code = "download_too_large"
    status = 413
    transient = False


class DownloadFailed(ServiceError):
    """The download failed."""

    code = "download_failed"
    status = 502

    def __init__(self, message: str | None = None, *, transient: bool,
                 http_status: int | None = None) -> None:
        self.transient = transient
        self.http_status = http_status
        super().__init__(message)


def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for host, in its order of preference."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class DownloadPolicy:
    """Where downloads may come from and how much they may cost."""

    # Host names (lowercase) and IPs (normalized) from OUTPUT_ALLOWED_HOSTS.
    allowed_hosts: frozenset[str] = frozenset()
    max_bytes: int = 50_000_000
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    total_timeout: float = 120.0
    max_redirects: int = 5
    # None: the certifi bundle requests ships with.
    ca_bundle: str | None = None
    resolver: Resolver = field(default=system_resolver, repr=False, compare=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> DownloadPolicy:
        """The policy from settings (OUTPUT_ALLOWED_HOSTS, DOWNLOAD_*); overrides win."""
        values: dict[str, Any] = {
            "allowed_hosts": parse_allowed_hosts(config.get("OUTPUT_ALLOWED_HOSTS")),
            "max_bytes": int(_number(config, "DOWNLOAD_MAX_BYTES", 50_000_000, 1, 2**40)),
            "connect_timeout": _number(config, "DOWNLOAD_CONNECT_TIMEOUT", 5.0, 0.01, 600),
            "read_timeout": _number(config, "DOWNLOAD_READ_TIMEOUT", 30.0, 0.01, 3600),
            "total_timeout": _number(config, "DOWNLOAD_TOTAL_TIMEOUT", 120.0, 0.01, 24 * 3600),
        }
        return cls(**(values | overrides))

    def is_listed(self, host: str) -> bool:
        return _host_key(host) in self.allowed_hosts


@dataclass(frozen=True)
class Downloaded:
    data: bytes
    content_type: str | None  # as the server (or the data: URI) declared it; not trusted
    final_url: str            # after redirects; for a data: URI its header only ("data:image/png;base64,")
    elapsed_ms: int
    image_type: str           # from the magic bytes: image/png, image/jpeg, image/webp or image/gif

    @property
    def extension(self) -> str:
        return IMAGE_EXTENSIONS[self.image_type]


def parse_allowed_hosts(raw: str | Iterable[str] | None) -> frozenset[str]:
    """OUTPUT_ALLOWED_HOSTS as normalized entries; a malformed entry is a ConfigError."""
    items = raw.split(",") if isinstance(raw, str) else list(raw or ())
    hosts = set()
    for item in (i.strip().lower().rstrip(".") for i in items):
        if not item:
            continue
        key = _host_key(item)
        if _ip(key) is None and not _HOST_NAME.fullmatch(key):
            raise ConfigError(f"OUTPUT_ALLOWED_HOSTS entries must be host names or IPs, got {item!r}")
        hosts.add(key)
    return frozenset(hosts)


# One table of image signatures for the whole service (imaging decodes what this lets in).
sniff_image = media_type


def fetch(url: str, policy: DownloadPolicy) -> Downloaded:
    """Download url under policy; raises DisallowedURL, DownloadTooLarge, NotAnImage or DownloadFailed."""
    started = time.monotonic()
    try:
        if url[:5].lower() == "data:":
            data, content_type, final_url, source = *_decode_data_uri(url, policy.max_bytes), "data"
        else:
            data, content_type, final_url = _fetch_http(url, policy, started)
            source = _origin(final_url)
        image_type = _require_image(data, content_type)
    except (DisallowedURL, DownloadTooLarge, NotAnImage, DownloadFailed) as exc:
        logger.warning("download failed: %s", exc, extra={"action": "download_failed", "error": exc.code,
                                                            "transient": exc.transient})
        raise
    elapsed_ms = round((time.monotonic() - started) * 1000)
    logger.info("output downloaded", extra={"action": "download", "source": source, "bytes": len(data),
                                            "image_type": image_type, "ms": elapsed_ms})
    return Downloaded(data, content_type, final_url, elapsed_ms, image_type)


def _fetch_http(url: str, policy: DownloadPolicy, started: float) -> tuple[bytes, str | None, str]:
    current = url
    for hop in range(policy.max_redirects + 1):
        target = _checked(current, policy, redirect=hop > 0)
        with _session(target, policy) as session:
            response = _send(session, target, policy)
            with response:
                location = _redirect_location(response, target)
                if location is None:
                    data = _read(response, target, policy, started)
                    return data, response.headers.get("Content-Type"), current
        current = urljoin(current, location)
    raise DownloadFailed(f"more than {policy.max_redirects} redirects from {_origin(url)}", transient=False)


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str           # the host name (or IP) of the URL, lowercase
    address: str        # the checked address the connection goes to
    connect_url: str    # the URL with the host replaced by that address
    host_header: str


def _checked(url: str, policy: DownloadPolicy, redirect: bool) -> _Target:
    try:
        return _check(url, policy)
    except DisallowedURL as exc:
        if not redirect:
            raise
        raise DisallowedURL(f"redirect refused: {exc}", reason="redirect") from exc


def _check(url: str, policy: DownloadPolicy) -> _Target:
    parts = _split(url)
    scheme, host = parts.scheme.lower(), _host_key(parts.hostname or "")
    if scheme not in ("http", "https"):
        raise DisallowedURL(f"scheme {scheme or '(none)'!r} is not allowed", reason="scheme")
    if not host or parts.username is not None or (_ip(host) is None and not _HOST_NAME.fullmatch(host)):
        raise DisallowedURL("the URL's host is malformed or carries credentials", reason="malformed")
    listed = policy.is_listed(host)
    if not listed and not (host == REPLICATE_DELIVERY or host.endswith("." + REPLICATE_DELIVERY)):
        raise DisallowedURL(f"host {host} is not allowed (see OUTPUT_ALLOWED_HOSTS)", reason="host")
    if scheme == "http" and not listed:
        raise DisallowedURL(f"plain http is not allowed for {host}; use https", reason="scheme")
    port = parts.port or (443 if scheme == "https" else 80)
    address = _checked_address(host, port, policy)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(scheme, host, address, f"{scheme}://{_bracketed(address)}:{port}{path}",
                   _bracketed(host) + ("" if parts.port is None else f":{port}"))


def _split(url: str) -> Any:
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        raise DisallowedURL("the URL is malformed", reason="malformed") from None
    return parts


def _checked_address(host: str, port: int, policy: DownloadPolicy) -> str:
    """The address to connect to: every address host resolves to must be allowed."""
    literal = _ip(host)
    try:
        addresses = [host] if literal is not None else policy.resolver(host, port)
    except (OSError, UnicodeError) as exc:
        raise DownloadFailed(f"could not resolve {host}: {exc}", transient=True) from None
    if not addresses:
        raise DownloadFailed(f"{host} resolved to no address", transient=True)
    for address in addresses:
        ip = _ip(address)
        if ip is None or (not _public(ip) and not policy.is_listed(str(ip))):
            raise DisallowedURL(f"host {host} resolves to a non-public address ({address})",
                                reason="private_address")
    return str(_ip(addresses[0]))


def _public(ip: IPAddress) -> bool:
    """A globally routable unicast address, also when it hides inside an IPv6 form."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and not _public(embedded):
            return False
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


class _PinnedTLSAdapter(HTTPAdapter):
    """Connects to the URL's IP while SNI and the certificate check use the real host name."""

    def __init__(self, host: str) -> None:
        self._host = host
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["server_hostname"] = self._host
        kwargs["assert_hostname"] = self._host
        super().init_poolmanager(*args, **kwargs)


def _session(target: _Target, policy: DownloadPolicy) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxies, no .netrc credentials
    session.mount("http://", HTTPAdapter(max_retries=0))
    session.mount("https://", _PinnedTLSAdapter(target.host))
    session.verify = policy.ca_bundle or True
    return session


def _send(session: requests.Session, target: _Target, policy: DownloadPolicy) -> requests.Response:
    headers = {"Host": target.host_header, "Accept": "image/*", "Accept-Encoding": "identity",
               "User-Agent": "replicate-jobs-service"}
    try:
        return session.get(target.connect_url, headers=headers, stream=True, allow_redirects=False,
                           timeout=(policy.connect_timeout, policy.read_timeout))
    except requests.RequestException as exc:
        raise _transport_error(exc, target.host) from None


def _transport_error(exc: requests.RequestException, host: str) -> DownloadFailed:
    # requests' own messages repeat the URL, query string included: name only the kind of failure.
    if isinstance(exc, requests.Timeout) or any(isinstance(a, ReadTimeoutError) for a in exc.args):
        return DownloadFailed(f"timed out talking to {host}", transient=True)
    if isinstance(exc, requests.ConnectionError | requests.exceptions.ChunkedEncodingError):
        return DownloadFailed(f"connection to {host} failed ({type(exc).__name__})", transient=True)
    return DownloadFailed(f"download from {host} failed ({type(exc).__name__})", transient=False)


def _redirect_location(response: requests.Response, target: _Target) -> str | None:
    """Where a redirect points, None for a 200; any other status is a DownloadFailed."""
    status = response.status_code
    if status == 200:
        return None
    if status in REDIRECTS and response.headers.get("Location"):
        return response.headers["Location"]
    transient = status >= 500 or status in TRANSIENT_STATUSES
    raise DownloadFailed(f"{target.host} answered HTTP {status}", transient=transient, http_status=status)


def _read(response: requests.Response, target: _Target, policy: DownloadPolicy, started: float) -> bytes:
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > policy.max_bytes:
        raise DownloadTooLarge(f"the output is {int(declared)} bytes; the limit is {policy.max_bytes}")
    body, sniffed, declared_type = bytearray(), False, response.headers.get("Content-Type")
    try:
        for chunk in response.iter_content(CHUNK):
            body += chunk
            if len(body) > policy.max_bytes:
                raise DownloadTooLarge(f"the output is over the limit of {policy.max_bytes} bytes")
            if not sniffed and len(body) >= SNIFF_BYTES:  # refuse a non-image without reading on
                sniffed = bool(_require_image(bytes(body[:SNIFF_BYTES]), declared_type))
            if time.monotonic() - started > policy.total_timeout:
                raise DownloadFailed(f"the download took over {policy.total_timeout:g} s", transient=True)
    except requests.RequestException as exc:
        raise _transport_error(exc, target.host) from None
    return bytes(body)


def _require_image(data: bytes, declared: str | None) -> str:
    image_type = sniff_image(data)
    if image_type is None:
        served = f" (declared as {declared.split(';')[0].strip()})" if declared else ""
        raise NotAnImage(f"the content is not a PNG, JPEG, WebP or GIF image{served}")
    return image_type


def _decode_data_uri(uri: str, max_bytes: int) -> tuple[bytes, str | None, str]:
    """Bytes, declared media type and the URI's header for data:[<type>][;base64],<data>."""
    header, comma, payload = uri[5:].partition(",")
    if not comma:
        raise DisallowedURL("the data: URI has no comma", reason="malformed")
    params = [p.strip() for p in header.split(";")]
    media_type = params[0].lower() or None
    if len(params) > 1 and params[-1].lower() == "base64":
        payload = unquote(payload) if "%" in payload else payload
        if len(payload) // 4 * 3 - 2 > max_bytes:  # refused before decoding anything
            raise DownloadTooLarge(f"the data: URI holds over {max_bytes} bytes")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise DisallowedURL("the data: URI is not valid base64", reason="malformed") from None
    else:
        data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise DownloadTooLarge(f"the data: URI holds {len(data)} bytes; the limit is {max_bytes}")
    return data, media_type, f"data:{header},"


def _number(config: Mapping[str, Any], name: str, default: float, low: float, high: float) -> float:
    raw = config.get(name)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return default
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low:g} and {high:g}, got {value:g}")
    return value


def _host_key(host: str) -> str:
    """A host as allow-list entries are kept: lowercase, no brackets or final dot, IPs normalized."""
    host = host.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")
    ip = _ip(host)
    return str(ip) if ip is not None else host


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _origin(url: str) -> str:
    """scheme://host[:port] only: paths and query strings stay out of logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
