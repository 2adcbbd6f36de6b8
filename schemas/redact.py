"""Secrets out of telemetry and out of anything printed: one compiled pass per string.

:class:`Redactor` replaces the secret part of a string with ``****`` and keeps
the rest, so a detection that matches a resource (``postgres://db/payroll``,
``s3://bucket/key``) still matches the redacted text:

* ``Authorization``-style credentials: ``Bearer``/``Basic``/``Token`` + value;
* API keys by their format: OpenAI ``sk-``, AWS ``AKIA``/``ASIA``, GitHub
  ``ghp_``/``gho_``/``ghu_``/``ghs_``/``ghr_``/``github_pat_``, Slack ``xox?-``;
* JWTs (three base64url parts starting ``eyJ``) and PEM private key blocks;
* the password of a URL or DSN (``scheme://user:PASSWORD@host``);
* ``password=``/``token=``/``secret=``/``api_key=`` ... parameters, in query
  strings, connection strings (``Password=...;``) and ``key: value`` text;
* password literals of SQL statements (``ALTER ROLE r PASSWORD '...'``,
  ``IDENTIFIED BY '...'``) and ``--password``/``--token`` command-line flags;
* the whole value of an attribute whose *name* says it is a credential
  (``http.request.header.authorization``, ``...cookie``, ``...api_key``).

Extensible by the policy (``redaction.patterns``): each extra regex's match
(or its first group, when it has one) becomes ``****``.

Pure: no I/O. The worker applies it once per event at ingest, before anything
is stored or forwarded; logs and printed settings go through
:func:`mask_secrets`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from schemas.events import Event

MASK = "****"

# a credential-ish parameter name, matched from its keyword on (AWS_SECRET_ACCESS_KEY matches at
# SECRET): starting at the keyword keeps the scan linear, a [name-chars]* prefix would backtrack
_SECRET_KEY = r"(?:passw(?:or)?d|pwd|secret|token(?!s)|api[_\-]?key|apikey|access[_\-]?key|credential)[A-Za-z0-9_.\-]*"

# (name, triggers, pattern, replacement): a rule runs only on strings containing one of its
# triggers (lower case), so the common clean string costs a few substring tests, not nine
# regex scans. Private key blocks go first: their base64 looks like anything.
_DEFAULT_RULES: tuple[tuple[str, tuple[str, ...], str, str], ...] = (
    ("private_key", ("private key",),
     r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|$)",
     r"-----BEGIN \1PRIVATE KEY-----" + MASK + r"-----END \1PRIVATE KEY-----"),
    # the separator may be URL-encoded (``?authorization=Bearer%20...``)
    ("auth_header", ("bearer", "basic", "token", "digest"),
     r"(?i)\b(bearer|basic|token|digest)(\s+|%20|\+)[A-Za-z0-9._~+/=\-]{6,}", r"\1\2" + MASK),
    ("jwt", ("eyj",), r"\beyJ[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]*", MASK),
    ("openai_key", ("sk-",), r"\bsk-(?:proj-|ant-|live-|test-)?[A-Za-z0-9_\-]{16,}", MASK),
    ("aws_key", ("akia", "asia"), r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", MASK),
    ("github_token", ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
     r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})", MASK),
    ("slack_token", ("xox",), r"\bxox[abposr]-[A-Za-z0-9\-]{10,}", MASK),
    ("url_password", ("@",), r"(://[^\s:/@?#]*:)([^\s@/?#]+)(@)", r"\1" + MASK + r"\3"),
    ("secret_param", ("pass", "pwd", "secret", "token", "key", "credential"),
     r"(?i)(" + _SECRET_KEY + r"[\"']?\s*[=:]\s*[\"']?)([^\s&;,\"'}]+)", r"\1" + MASK),
    # SQL sets passwords as literals, and audit logs (pgaudit, log_statement) keep the statement:
    # ALTER ROLE r PASSWORD '...', CREATE USER u IDENTIFIED [WITH plugin] BY '...', PASSWORD('...');
    # an unterminated literal (a cut log line) is masked to the end
    ("sql_password", ("password", "identified"),
     r"(?i)(\b(?:password|identified(?:\s+with\s+\w+)?\s+by)(?:\s+|\s*\(\s*))(?:'(?:[^']|'')*(?:'|$)|\"(?:[^\"]|\"\")*(?:\"|$))",
     r"\1'" + MASK + "'"),
    # command lines: --password VALUE, --token VALUE (the = form is secret_param's)
    ("flag_secret", ("--",),
     r"(?i)(--(?:password|passwd|token|secret|api-key|access-token)\s+)([^\s-][^\s]*)", r"\1" + MASK),
)

_SECRET_NAME = re.compile(
    r"(?i)(?:^|[._\-])(?:authorization|proxy-authorization|cookie|set-cookie|x-api-key|"
    r"passw(?:or)?d|secret|api[_\-]?key|apikey|access[_\-]?key|private[_\-]?key|credentials?|token(?!s))(?:$|[._\-])"
)


class Redactor:
    """The default rules plus any extra patterns; compiled once, applied per string."""

    def __init__(self, extra_patterns: Iterable[str] = ()) -> None:
        self.extra = tuple(re.compile(p) for p in extra_patterns)
        self._rules = tuple((triggers, re.compile(p), r) for _, triggers, p, r in _DEFAULT_RULES)
        self._any = re.compile("|".join(re.escape(t) for _, ts, _, _ in _DEFAULT_RULES for t in ts))

    def text(self, s: str) -> str:
        """``s`` with every secret it carries replaced by ``****``."""
        if not s:
            return s
        low = s.lower()
        if self._any.search(low):
            for triggers, rx, repl in self._rules:
                for t in triggers:
                    if t in low:
                        s = rx.sub(repl, s)
                        break
        for rx in self.extra:
            s = rx.sub(_extra_repl, s)
        return s

    def value(self, name: str, value: str) -> str:
        """An attribute value: entirely masked when its name says it is a credential."""
        if value and _secret_name(name):
            return MASK
        return self.text(value)

    def events(self, events: list[Event]) -> None:
        """Redact the events of one record in place (see ``event``).

        One joined test for the whole record first: spans of one batch carry no secret in
        the common case, and one scan of their text costs a fraction of a scan per event."""
        if not events:
            return
        if self.extra or len(events) == 1 or self._suspect(events):
            for ev in events:
                self.event(ev)

    def _suspect(self, events: list[Event]) -> bool:
        strings: list[str] = []
        keys: set[str] = set()
        for ev in events:
            d = ev.__dict__  # the fields as stored: no per-field attribute hook
            strings += (d["name"], d["resource"], d["covers_resource"], d["principal"], d["action"],
                        d["error_type"], d["origin"], *d["attributes"].values(), *d["correlation"].values())
            keys.update(d["attributes"])
        return bool(self._any.search("\x00".join(strings).lower())) or any(_secret_name(k) for k in keys)

    def event(self, ev: Event) -> None:
        """Redact an event in place: every free-text field, attributes and correlation keys.

        One joined test first: most events carry no trigger at all and cost one scan.
        """
        strings = [ev.name, ev.resource, ev.covers_resource, ev.principal, ev.action, ev.error_type, ev.origin,
                   *ev.attributes.values(), *ev.correlation.values()]
        if not self._any.search("\x00".join(strings).lower()) and not self.extra and not any(
                _secret_name(k) for k in ev.attributes):
            return
        ev.name, ev.resource, ev.covers_resource = self.text(ev.name), self.text(ev.resource), self.text(
            ev.covers_resource)
        ev.principal, ev.action, ev.error_type, ev.origin = (self.text(ev.principal), self.text(ev.action),
                                                              self.text(ev.error_type), self.text(ev.origin))
        if ev.attributes:
            ev.attributes = self.mapping(ev.attributes)
        if ev.correlation:
            ev.correlation = {k: self.text(v) for k, v in ev.correlation.items()}

    def raw(self, data: bytes) -> bytes:
        """Raw bytes (a DLQ record's copy): text parts redacted, any other byte kept as it was."""
        text = data.decode("utf-8", errors="surrogateescape")
        out = self.text(text)
        return data if out == text else out.encode("utf-8", errors="surrogateescape")

    def mapping(self, attrs: Mapping[str, str]) -> dict[str, str]:
        return {k: self.value(k, v) for k, v in attrs.items()}

    def any(self, v: Any) -> Any:
        """Strings, and the strings inside lists, tuples and dicts (JSON-like payloads)."""
        if isinstance(v, str):
            return self.text(v)
        if isinstance(v, dict):
            return {k: (self.value(k, x) if isinstance(x, str) and isinstance(k, str) else self.any(x))
                    for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(self.any(x) for x in v)
        return v


_SECRET_NAMES: dict[str, bool] = {}


def _secret_name(name: str) -> bool:
    """Does an attribute name say its value is a credential? (Names repeat: cached.)"""
    known = _SECRET_NAMES.get(name)
    if known is None:
        known = bool(_SECRET_NAME.search(name))
        if len(_SECRET_NAMES) < 65536:
            _SECRET_NAMES[name] = known
    return known


def _extra_repl(m: re.Match[str]) -> str:
    if m.re.groups:
        start, end = m.span(1)
        if start >= 0:
            whole = m.group(0)
            return whole[: start - m.start()] + MASK + whole[end - m.start():]
    return MASK


DEFAULT = Redactor()


def mask_secrets(text: str) -> str:
    """Passwords and tokens inside a DSN, URL or log line as ``****`` (the default rules)."""
    return DEFAULT.text(text)
