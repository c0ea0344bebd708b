"""Who may use an engine's tcp wire: ZeroMQ CURVE, its keys made by `softserve engine-keys DIR`.

    DIR/engine.key            the engine's public key        API processes need it (they check the engine)
    DIR/engine.key_secret     the engine's keypair           only the engine
    DIR/client.key_secret     the API processes' keypair     only API processes
    DIR/client.key            its public key
    DIR/authorized_clients/   public keys the engine serves  the engine (a copy of client.key to start with)

The engine serves only clients whose public key lies in `authorized_clients/` (read when it starts); anyone else
fails the handshake and never reaches the engine's decoder. CURVE also encrypts the wire. An `ipc://` socket
needs none of this: the API process's own child binds it in a private directory, and a socket file's permissions
guard any other.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

ENGINE = "engine"
CLIENT = "client"
AUTHORIZED_CLIENTS = "authorized_clients"
SECRET_SUFFIX = ".key_secret"


class EngineKeysError(Exception):
    """The wire cannot be secured as configured; the message says what to do, in one line."""


def wire_keys(address: str, keys_dir: Path | None, insecure_tcp: bool) -> Path | None:
    """The keys directory the wire at `address` is secured with: none for `ipc://`, nor for `tcp://` with
    `insecure_tcp`. Raises `EngineKeysError` for `tcp://` without keys (and without `insecure_tcp`), and for any
    other transport."""
    if address.startswith("ipc://"):
        return None
    if not address.startswith("tcp://"):
        raise EngineKeysError(f"the engine address {address!r} is neither ipc:// nor tcp://")
    if keys_dir is not None:
        return keys_dir
    if insecure_tcp:
        return None
    raise EngineKeysError(
        f"{address} needs CURVE keys: make them with `softserve engine-keys DIR` and give DIR to the engine and to "
        "every API process (--engine-keys-dir), or set --engine-insecure-tcp true to serve anyone who reaches the port"
    )


def make_keys(directory: Path) -> list[Path]:
    """Makes the engine's and the clients' keypairs in `directory` (created private, 0700) and authorises the
    client's public key; returns the files made. Raises `EngineKeysError` when keys are there already: keys are
    never silently replaced."""
    existing = [path for name in (ENGINE, CLIENT) if (path := directory / f"{name}{SECRET_SUFFIX}").exists()]
    if existing:
        raise EngineKeysError(f"{existing[0]} exists: keys are never replaced; delete the old ones first")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    made: list[Path] = []
    for name in (ENGINE, CLIENT):
        public, secret = (Path(path) for path in zmq.auth.create_certificates(directory, name))
        secret.chmod(0o600)
        made += [public, secret]
    authorized = directory / AUTHORIZED_CLIENTS
    authorized.mkdir(mode=0o700, exist_ok=True)
    made.append(Path(shutil.copy(directory / f"{CLIENT}.key", authorized / f"{CLIENT}.key")))
    return made


def secure_server(context: zmq.Context, socket: zmq.Socket, keys_dir: Path) -> ThreadAuthenticator:
    """Makes `socket` (before it binds) a CURVE server with the engine's key that serves authorised clients only.
    The returned authenticator answers the handshakes until it is stopped."""
    public, secret = _keypair(keys_dir, ENGINE)
    authorized = keys_dir / AUTHORIZED_CLIENTS
    if not authorized.is_dir() or not any(authorized.glob("*.key")):
        raise EngineKeysError(f"no client public keys (*.key) in {authorized}: no API process could connect")
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve(domain="*", location=os.fspath(authorized))
    socket.curve_secretkey, socket.curve_publickey = secret, public
    socket.curve_server = True
    return authenticator


@dataclass(frozen=True)
class ClientKeys:
    """An API process's side: its keypair, and the public key of the only engine it talks to."""

    public: bytes
    secret: bytes
    engine: bytes

    @classmethod
    def load(cls, keys_dir: Path) -> ClientKeys:
        public, secret = _keypair(keys_dir, CLIENT)
        return cls(public, secret, _public_key(keys_dir / f"{ENGINE}.key"))

    def secure(self, socket: zmq.Socket) -> None:
        """Makes `socket` (before it connects) a CURVE client of the engine."""
        socket.curve_secretkey, socket.curve_publickey, socket.curve_serverkey = self.secret, self.public, self.engine


def _keypair(keys_dir: Path, name: str) -> tuple[bytes, bytes]:
    path = keys_dir / f"{name}{SECRET_SUFFIX}"
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as error:
        raise EngineKeysError(f"cannot read {path} ({error}): make keys with `softserve engine-keys DIR`") from None
    if secret is None:
        raise EngineKeysError(f"{path} holds no secret key")
    return public, secret


def _public_key(path: Path) -> bytes:
    try:
        return zmq.auth.load_certificate(path)[0]
    except (OSError, ValueError) as error:
        raise EngineKeysError(f"cannot read {path} ({error}): copy it from the engine's keys directory") from None
