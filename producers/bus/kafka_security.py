"""How a Kafka bus authenticates and encrypts: the security settings of kafka-python's clients.

`KafkaSecurity` holds the security protocol, the SASL mechanism, user and password, and the TLS
files; `client_config()` turns them into kafka-python's own configuration keys. The password is a
`Secret`: no repr, str, log line or error message shows its value, and it crosses to another process
only as where it comes from (an environment variable or a file), read again there.
"""

from __future__ import annotations

import logging
import os
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
FIELDS = ("protocol", "mechanism", "user", "password", "ca_file", "cert_file", "key_file")


class KafkaSecurityError(ValueError):
    """A Kafka security setting Runbus cannot use. `field` names it; `explain` words the message
    with other names for the fields (the settings' variable names)."""

    def __init__(self, field: str, reason: str) -> None:
        self.field, self.reason = field, reason
        super().__init__(self.explain())

    def explain(self, names: Mapping[str, str] | None = None) -> str:
        """One line naming the field, under `names` (field -> name) where given."""
        named = {f: f for f in FIELDS} | dict(names or {})
        reason = self.reason.format_map(named)
        return f"{named[self.field]}{'' if reason.startswith('=') else ' '}{reason}"


def _read_secret(kind: str, where: str, env: Mapping[str, str] | None = None) -> str:
    """The value of the variable `where` (kind 'env') in `env` (default: the environment), or the
    content of the file `where` ('file') without its final newline. The user's own file must be
    owner-only; another owner's (a mounted secret) must not be writable by others."""
    if kind == "env":
        value = (os.environ if env is None else env).get(where)
        if not value:
            raise KafkaSecurityError("password", f"is to come from the environment variable {where}, "
                                                 f"which is {'empty' if value == '' else 'not set'}")
        return value
    try:
        with open(where, encoding="utf-8") as file:
            found = os.fstat(file.fileno())  # the file read, whatever the path points to meanwhile
            value = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise KafkaSecurityError("password", f"={where!r}: the file cannot be read: "
                                             f"{getattr(exc, 'strerror', None) or exc}") from None
    # as libpq refuses a .pgpass others may read: the user's own file must be owner-only; a file of
    # another owner (a secret root mounts in a container, 0444/0644) the user cannot chmod, so only
    # one that others may change is refused
    loose = 0o077 if found.st_uid == os.getuid() else 0o022
    if found.st_mode & loose:
        fix = "make it owner-only (chmod 600)" if loose == 0o077 else "ask its owner to make it read-only for others"
        raise KafkaSecurityError("password", f"={where!r}: other users may "
                                             f"{'read or change' if loose == 0o077 else 'change'} the file "
                                             f"(mode {stat.S_IMODE(found.st_mode):04o}): {fix}")
    value = value.removesuffix("\n").removesuffix("\r")  # editors end a file with a newline
    if not value:
        raise KafkaSecurityError("password", f"={where!r}: the file is empty")
    return value


def masked_address(address: str) -> str:
    """One bus URL or "host:port" list as a message may show it: when it carries a login, everything
    between the user and the login's last "@" is ***, whatever characters the password holds."""
    if not has_login(address):
        return address
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "", address
    slash, path = "", ""
    if sep and scheme.lower() != "kafka":
        rest, slash, path = rest.partition("/")
    login, _, hosts = rest.rpartition("@")
    return f"{scheme}{sep}{login.partition(':')[0]}:***@{hosts}{slash}{path}"


def login_refused(shown: str) -> str:
    """One line: the bus address `shown` (already masked) carries a login, and where it goes instead."""
    return (f"{shown} carries a login: Runbus takes none from the URL (it would be shown wherever the URL "
            f"is); drop it and set RUNBUS_KAFKA_USER and RUNBUS_KAFKA_PASSWORD (or RUNBUS_KAFKA_PASSWORD_FILE) "
            f"with RUNBUS_KAFKA_SECURITY_PROTOCOL=SASL_SSL or SASL_PLAINTEXT and RUNBUS_KAFKA_SASL_MECHANISM")


def has_login(address: str) -> bool:
    """Whether a bus URL or "host:port" list carries a "user[:password]@" login: anywhere in a Kafka
    address (which has no path, and a password may hold '/'), in the authority of another URL (the
    part before its path: 'sqlite:///a@b/log.sqlite' carries none)."""
    scheme, sep, rest = address.partition("://")
    if not sep or scheme.lower() == "kafka":
        return "@" in address
    return "@" in rest.split("/", 1)[0]


def _where(kind: str, where: str) -> str:
    return where if kind == "env" else f"file {where}"


class Secret:
    """A password. repr and str show where it comes from, never the value; `reveal()` gives it.

    Pickled, it carries only where it comes from and is read again where it is unpickled (so a Dask
    worker needs the same variable or file); one given as a plain value cannot be pickled."""

    __slots__ = ("_kind", "_problem", "_value", "_where")

    def __init__(self, value: str, kind: str = "value", where: str = "") -> None:
        self._value, self._kind, self._where = value, kind, where
        self._problem: str | None = None

    @classmethod
    def from_env(cls, name: str, env: Mapping[str, str] | None = None) -> Secret:
        """The value of the environment variable `name` in `env` (default: the environment);
        KafkaSecurityError when unset or empty."""
        return cls(_read_secret("env", name, env), "env", name)

    @classmethod
    def from_file(cls, path: str) -> Secret:
        """The content of the file at `path` without its final newline (KafkaSecurityError when it
        cannot be read or is empty)."""
        return cls(_read_secret("file", path), "file", path)

    @property
    def source(self) -> str:
        """Where the value comes from, for messages."""
        return "a value" if self._kind == "value" else _where(self._kind, self._where)

    def reveal(self) -> str:
        """The value; KafkaSecurityError if it could not be read again in this process."""
        if self._problem is not None:
            raise KafkaSecurityError("password", self._problem)
        return self._value

    def __repr__(self) -> str:
        return f"Secret(from {self.source})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and (self._kind, self._where, self._value) == (
            other._kind, other._where, other._value)

    def __hash__(self) -> int:
        return hash((self._kind, self._where, self._value))

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        if self._kind == "value":
            raise TypeError("a Kafka password given as a value is not sent to another process: "
                            "give it as an environment variable or a file (RUNBUS_KAFKA_PASSWORD[_FILE])")
        return _unpickle_secret, (self._kind, self._where)


def _unpickle_secret(kind: str, where: str) -> Secret:
    try:
        return Secret(_read_secret(kind, where), kind, where)
    except KafkaSecurityError as exc:  # said when the password is used, not while unpickling
        secret = Secret("", kind, where)
        secret._problem = exc.reason
        return secret


class _Masked(str):
    """The password as kafka-python gets it: its own repr of a client's configuration (logged at
    DEBUG) and anything that prints it show '***'."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"

    def __str__(self) -> str:
        return "***"


class _Redact(logging.Filter):
    """Drops the text of kafka-python's DEBUG lines that carry SASL PLAIN's request bytes (which
    hold the password in the clear)."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG and self.secrets:
            text = record.getMessage()
            if any(secret in text for secret in self.secrets):
                record.msg, record.args = "(a line that holds a Kafka password, left out)", ()
        return True


_REDACT = _Redact()
for _name in ("kafka.protocol.parser", "kafka.net.connection", "kafka.net.transport"):
    logging.getLogger(_name).addFilter(_REDACT)


def _check_file(field: str, path: str) -> None:
    if not os.access(path, os.R_OK) or not os.path.isfile(path):
        reason = "does not exist" if not os.path.exists(path) else "cannot be read"
        raise KafkaSecurityError(field, f"={path!r}: the file {reason}")


@dataclass(frozen=True)
class KafkaSecurity:
    """How to reach the brokers: `protocol` PLAINTEXT (the default), SSL, SASL_PLAINTEXT or
    SASL_SSL; for SASL a `mechanism` (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512), `user` and `password`;
    for TLS the CA file that signs the brokers' certificates (the system's CAs when None) and an
    optional client certificate and key (PEM). KafkaSecurityError names a combination that cannot work."""

    protocol: str = "PLAINTEXT"
    mechanism: str | None = None
    user: str | None = None
    password: Secret | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise KafkaSecurityError("protocol", f"={self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if self.sasl:
            if not self.mechanism:
                raise KafkaSecurityError("mechanism", f"must be one of {', '.join(MECHANISMS)} with "
                                                      f"{{protocol}}={self.protocol}")
            if self.mechanism not in MECHANISMS:
                raise KafkaSecurityError("mechanism", f"={self.mechanism!r} is not one of {', '.join(MECHANISMS)}")
            if not self.user:
                raise KafkaSecurityError("user", f"must be set with {{protocol}}={self.protocol}")
            if self.password is None:
                raise KafkaSecurityError("password", f"must be set with {{protocol}}={self.protocol}")
        else:
            for field in ("mechanism", "user", "password"):
                if getattr(self, field) is not None:
                    raise KafkaSecurityError(field, f"is set, but {{protocol}}={self.protocol} does not use SASL "
                                                    f"(SASL_SSL or SASL_PLAINTEXT do)")
        for field in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, field)
            if path is not None and not self.tls:
                raise KafkaSecurityError(field, f"is set, but {{protocol}}={self.protocol} does not use TLS "
                                                f"(SSL or SASL_SSL do)")
        if self.key_file is not None and self.cert_file is None:
            raise KafkaSecurityError("key_file", "is set without {cert_file} (the client certificate it belongs to)")
        if self.tls:
            self._check_tls_files()

    def _check_tls_files(self) -> None:
        """Each file is readable PEM and the key fits the certificate (the mistakes kafka-python
        would otherwise report only as a failed connection)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.ca_file is not None:
            _check_file("ca_file", self.ca_file)
            try:
                context.load_verify_locations(self.ca_file)
            except ssl.SSLError as exc:
                raise KafkaSecurityError("ca_file", f"={self.ca_file!r} holds no PEM certificate: {exc}") from None
        if self.cert_file is not None:
            _check_file("cert_file", self.cert_file)
            if self.key_file is not None:
                _check_file("key_file", self.key_file)
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except ssl.SSLError as exc:
                field = "cert_file" if self.key_file is None else "key_file"
                raise KafkaSecurityError(field, f"={getattr(self, field)!r}: the client certificate and its key "
                                                f"cannot be loaded (PEM, a key that fits): {exc}") from None

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    def describe(self) -> str:
        """Who connects how, for messages (never the password): "user 'w' (SCRAM-SHA-512 over SASL_SSL)"."""
        if self.sasl:
            return f"user {self.user!r} ({self.mechanism} over {self.protocol}, password from {self.password.source})" \
                if self.password is not None else f"user {self.user!r} ({self.mechanism} over {self.protocol})"
        return f"{self.protocol} (no user)"

    def trusted(self) -> str:
        """Which CAs this trusts, for messages."""
        return f"the CA file {self.ca_file}" if self.ca_file else "the system's CA certificates"

    def client_config(self) -> dict[str, Any]:
        """kafka-python's configuration keys for these settings."""
        config: dict[str, Any] = {"security_protocol": self.protocol}
        if self.sasl:
            assert self.password is not None
            password = self.password.reveal()
            _REDACT.secrets.add(password)
            config.update(sasl_mechanism=self.mechanism, sasl_plain_username=self.user,
                          sasl_plain_password=_Masked(password))
        if self.tls:
            config.update(ssl_cafile=self.ca_file, ssl_certfile=self.cert_file, ssl_keyfile=self.key_file)
        return config


PLAINTEXT = KafkaSecurity()
