"""Refuse every non-loopback connection in any Python process started with this folder on
PYTHONPATH and SCPRINT_NETGUARD set: the tests prove the pipeline never reaches the
internet. Attempts are appended to $SCPRINT_NETGUARD (a file) so tests can assert none."""

import os
import socket

_log = os.environ.get("SCPRINT_NETGUARD")

if _log:
    _connect = socket.socket.connect
    _connect_ex = socket.socket.connect_ex
    _getaddrinfo = socket.getaddrinfo
    _LOCAL = ("127.", "::1", "localhost", "0.0.0.0")

    def _is_local(address) -> bool:
        if isinstance(address, (str, bytes)):  # AF_UNIX path
            return True
        host = str(address[0])
        return host.startswith(_LOCAL) or host == ""

    def _refuse(what: str) -> None:
        with open(_log, "a") as fh:
            fh.write(f"{os.getpid()} {what}\n")
        raise OSError(f"network disabled by tests/netguard: {what}")

    def connect(self, address):
        if not _is_local(address):
            _refuse(f"connect {address!r}")
        return _connect(self, address)

    def connect_ex(self, address):
        if not _is_local(address):
            _refuse(f"connect {address!r}")
        return _connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not _is_local((host,)):
            _refuse(f"resolve {host!r}")
        return _getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.getaddrinfo = getaddrinfo
