"""The local control API of a mounted vault: newline-delimited JSON over a Unix socket.

Who may talk: the socket is mode 0600 in a private directory, and every connection's
kernel-reported credentials (SO_PEERCRED) must be the server's own uid or root; the mode
alone would not do (root-owned helpers, a directory made traversable by mistake).

Protocol: one JSON object per line, `{"op": "status", ...arguments}`; the answer is one
line, `{"ok": true, ...}` or `{"ok": false, "error": "..."}`. The ops are exactly the
handler names. Arguments are JSON scalars. Limits: 4 KiB per request, 16 requests per
connection, 5 s to send each request, 8 connections at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import select
import socket
import stat
import struct
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from kryptvault.errors import KryptvaultError, UsageError
from kryptvault.session.audit import AuditLog
from kryptvault.session.flockfile import take_flock
from kryptvault.session.paths import runtime_dir

log = logging.getLogger("kryptvault.control")

MAX_REQUEST = 4096
MAX_REQUESTS_PER_CONNECTION = 16
READ_TIMEOUT = 5.0
MAX_CONNECTIONS = 8
MAX_RESPONSE = 1 << 20
CLIENT_TIMEOUT = 30.0
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the terminating NUL
_MOUNTPOINT_MAX = 4096  # PATH_MAX: a longer "mount point" in a lock file is not one
_OP_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")
_UCRED = struct.Struct("3i")  # struct ucred: pid_t pid, uid_t uid, gid_t gid


@dataclass(frozen=True)
class PeerCred:
    """The client's process as the kernel saw it at connect() (not what it claims)."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True)
class AfterReply:
    """A handler's answer and what to run once that answer is with the client.

    For an op that ends the process (lock): started from the handler itself, the lock
    raced the reply and, on a loaded machine, sometimes exited first, so the client saw
    the connection close without an answer although the vault did lock. The action runs
    even if the reply could not be sent: a lock must not depend on its client staying.
    """

    response: dict[str, object]
    action: Callable[[], object]


Handler = Callable[[dict[str, object], PeerCred], "dict[str, object] | AfterReply"]


def peer_credentials(sock: socket.socket) -> PeerCred:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCred(pid, uid, gid)


def socket_path_for(vault_uuid: uuid.UUID | str, instance: str | None = None) -> Path:
    """`<uuid>.<instance>.sock` for a mount daemon: one per container file, so a restored
    copy (same UUID) can be mounted beside its vault. `instance` is `container_instance()`."""
    try:
        canonical = vault_uuid if isinstance(vault_uuid, uuid.UUID) else uuid.UUID(str(vault_uuid))
    except ValueError:
        raise UsageError(f"not a vault UUID: {str(vault_uuid)[:40]!r}")
    if instance is None:
        return runtime_dir() / f"{canonical}.sock"
    if not re.fullmatch(r"[0-9a-f]{12}", instance):
        raise ValueError(f"bad mount instance {instance!r}")
    return runtime_dir() / f"{canonical}.{instance}.sock"


def container_instance(info: os.stat_result) -> str:
    """Which container file a daemon serves, by device and inode (not by name: a symlink,
    hard link or bind mount reaches the same file, which the daemon holds open)."""
    digest = hashlib.sha256(f"{info.st_dev}:{info.st_ino}".encode()).hexdigest()
    return digest[:12]


def daemon_socket_for(vault_uuid: uuid.UUID | str, container: Path) -> Path | None:
    """The control socket of the daemon serving `container`, if that file exists."""
    try:
        info = os.stat(container)
    except OSError:
        return None
    return socket_path_for(vault_uuid, container_instance(info))


def check_socket_path(path: Path) -> None:
    length = len(os.fsencode(path))
    if length > _SUN_PATH_MAX:
        raise KryptvaultError(
            f"the control socket path is too long ({length} bytes, a Unix socket allows "
            f"{_SUN_PATH_MAX}): {path}; set XDG_RUNTIME_DIR to a shorter directory"
        )


def list_sockets() -> list[Path]:
    """The control sockets in the runtime directory (live or stale: ask them)."""
    found = []
    for path in runtime_dir().glob("*.sock"):
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                found.append(path)
    return sorted(found)


def recorded_mountpoints() -> list[bytes]:
    """The mount points this session's daemons serve or served and did not clean up.

    A daemon writes its mount point into its socket's lock file, which every exit removes
    and only a kill -9 (or a crash) leaves behind. `status` looks for dead mounts among
    these alone: another session's dead mount (another XDG_RUNTIME_DIR, a test's own) is
    not this session's to report."""
    found = []
    for path in runtime_dir().glob("*.sock.lock"):
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    recorded = os.read(fd, _MOUNTPOINT_MAX + 1)
                    if 0 < len(recorded) <= _MOUNTPOINT_MAX:
                        found.append(recorded)
            finally:
                os.close(fd)
    return sorted(found)


def _record_mountpoint(lock_fd: int, mountpoint: Path) -> None:
    # The file may hold a predecessor's mount point (killed, same container): replace it.
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, os.fsencode(mountpoint), 0)


class _Refusal(Exception):
    """A request that ends the connection after its error reply."""

    def __init__(self, error: str, outcome: str) -> None:
        super().__init__(error)
        self.error = error
        self.outcome = outcome


# ---------------------------------------------------------------------- server


class ControlServer:
    def __init__(
        self,
        socket_path: Path,
        handlers: Mapping[str, Handler],
        audit: AuditLog | None,
        *,
        read_timeout: float = READ_TIMEOUT,
        mountpoint: Path | None = None,
    ) -> None:
        for op in handlers:
            if not _OP_NAME.fullmatch(op):
                raise ValueError(f"bad op name {op!r}")
        self.socket_path = Path(socket_path)
        self._handlers = dict(handlers)
        self._audit = audit
        self._read_timeout = read_timeout
        self._mountpoint = mountpoint
        self._vault = _vault_of(self.socket_path)
        self._lock_path = self.socket_path.with_name(self.socket_path.name + ".lock")
        self._lock_fd = -1
        self._listener: socket.socket | None = None
        self._inode: int | None = None
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    @property
    def ops(self) -> tuple[str, ...]:
        return tuple(sorted(self._handlers))

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the control server was already started")
        check_socket_path(self.socket_path)
        _private_dir(self.socket_path.parent)
        self._lock_fd = _take_lock(self._lock_path, self.socket_path)
        try:
            if self._mountpoint is not None:
                _record_mountpoint(self._lock_fd, self._mountpoint)
            _clear_stale(self.socket_path)
            self._listener = _bind_private(self.socket_path)
            self._inode = os.stat(self.socket_path).st_ino
        except BaseException:
            self._release_lock()
            raise
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._serve, name="kryptvault-control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, end open connections, remove the socket; safe to call twice."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(1.0)
        with self._conns_lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)  # wakes the connection's thread
        if self._listener is not None:
            self._listener.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        with contextlib.suppress(OSError):
            # Only our own socket: a successor may already have bound the path.
            if self._inode is not None and os.stat(self.socket_path).st_ino == self._inode:
                os.unlink(self.socket_path)
        self._release_lock()

    def abandon(self) -> None:
        """For a process about to exit: remove the socket now, join nothing (exit closes
        the rest). Used by the lock, where every millisecond counts."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            if self._inode is not None and os.stat(self.socket_path).st_ino == self._inode:
                os.unlink(self.socket_path)
        if self._lock_fd >= 0:
            # Unlinked while still held (see _take_lock); exit closes the descriptor.
            with contextlib.suppress(OSError):
                os.unlink(self._lock_path)

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self._lock_path)  # while still holding it: see _take_lock
            os.close(self._lock_fd)
            self._lock_fd = -1

    # ------------------------------------------------------------------ accepting
    def _serve(self) -> None:
        assert self._listener is not None
        listener = self._listener
        listener.setblocking(False)
        poller = select.poll()
        poller.register(listener.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stopping.is_set():
            for fd, _ in poller.poll():
                if fd != listener.fileno() or self._stopping.is_set():
                    return
                try:
                    conn, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:  # EMFILE and the like: back off, keep serving
                    log.warning("accept failed: %s", exc.strerror or exc)
                    time.sleep(0.05)
                    continue
                self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        try:
            peer = peer_credentials(conn)
        except OSError:
            conn.close()
            return
        refusal = None
        if peer.uid not in (os.geteuid(), 0):
            refusal = (f"permission denied: uid {peer.uid} may not control this vault", "uid")
        else:
            with self._conns_lock:
                if len(self._conns) >= MAX_CONNECTIONS:
                    refusal = ("busy: too many open control connections, try again", "busy")
                else:
                    self._conns.add(conn)
        self._record(
            "control_connect",
            pid=peer.pid,
            uid=peer.uid,
            accepted=refusal is None,
            reason=refusal[1] if refusal else None,
        )
        if refusal is not None:
            _send_and_close(conn, {"ok": False, "error": refusal[0]})
            return
        threading.Thread(
            target=self._converse, args=(conn, peer), name="kryptvault-control-conn", daemon=True
        ).start()

    # ------------------------------------------------------------------ one connection
    def _converse(self, conn: socket.socket, peer: PeerCred) -> None:
        buffer = bytearray()
        try:
            for _ in range(MAX_REQUESTS_PER_CONNECTION):
                try:
                    line = _read_line(conn, buffer, self._read_timeout)
                except _Refusal as refusal:
                    self._record(
                        "control_request", pid=peer.pid, uid=peer.uid, op=None, outcome=refusal.outcome
                    )
                    _send(conn, {"ok": False, "error": refusal.error})
                    return
                if line is None:
                    return
                response, op, outcome, action = self._answer(line, peer)
                self._record("control_request", pid=peer.pid, uid=peer.uid, op=op, outcome=outcome)
                if action is None:
                    _send(conn, response)
                    continue
                try:
                    # sendall on a Unix stream socket returns once every byte is queued at
                    # the peer; there is no buffer of ours left to flush, and the reply
                    # stays readable after this process exits.
                    _send(conn, response)
                finally:
                    action()
                return
        except OSError:
            return  # the client went away, or stop() shut the connection
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            conn.close()

    def _answer(
        self, line: bytes, peer: PeerCred
    ) -> tuple[dict[str, object], str | None, str, Callable[[], object] | None]:
        """(response, op name for the audit log, outcome, action to run after the reply)."""
        try:
            request = json.loads(line)
        except ValueError:
            return _error("malformed request: not JSON"), None, "malformed", None
        if not isinstance(request, dict):
            return _error("malformed request: not a JSON object"), None, "malformed", None
        op = request.pop("op", None)
        if not isinstance(op, str):
            return _error("malformed request: 'op' must be a string"), None, "malformed", None
        # Only a name that could be an op goes to the log: never arbitrary client text.
        logged_op = op if _OP_NAME.fullmatch(op) else None
        handler = self._handlers.get(op)
        if handler is None:
            shown = op if logged_op else "(not an op name)"
            unknown = _error(f"unknown op {shown}; known ops: {', '.join(self.ops)}")
            return unknown, logged_op, "unknown_op", None
        for name, value in request.items():
            if not isinstance(value, str | int | float | bool | None):
                return (
                    _error(f"argument {name[:40]!r} of {op} must be a string, number, true/false or null"),
                    op,
                    "bad_args",
                    None,
                )
        action = None
        try:
            answer = handler(request, peer)
            result = answer.response if isinstance(answer, AfterReply) else answer
            action = answer.action if isinstance(answer, AfterReply) else None
            if not isinstance(result, dict):
                raise TypeError(f"handler for {op} returned {type(result).__name__}")
            response: dict[str, object] = {**result, "ok": True}
            json.dumps(response)  # fail here, not half-way through sending
        except KryptvaultError as exc:
            return _error(" ".join(str(exc).split())), op, "failed", None
        except Exception:
            log.exception("control op %s failed", op)
            return _error(f"internal error while handling {op}"), op, "internal_error", None
        return response, op, "ok", action

    def _record(self, event: str, **fields: object) -> None:
        if self._audit is None:
            return
        try:
            self._audit.append(event, vault=self._vault, **fields)
        except Exception:
            log.exception("cannot audit %s", event)


def _error(message: str) -> dict[str, object]:
    return {"ok": False, "error": message}


def _read_line(conn: socket.socket, buffer: bytearray, timeout: float) -> bytes | None:
    """The next request line (without newline); None at end of stream.

    The timeout covers the whole request, so a client trickling a byte at a time cannot
    hold a connection (and its thread) for longer.
    """
    deadline = time.monotonic() + timeout
    while True:
        end = buffer.find(b"\n")
        if end > MAX_REQUEST or (end < 0 and len(buffer) > MAX_REQUEST):
            raise _Refusal(f"request too large (more than {MAX_REQUEST} bytes)", "too_large")
        if end >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            return line
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Refusal(f"no complete request within {timeout:g} s", "timeout")
        conn.settimeout(remaining)
        try:
            chunk = conn.recv(MAX_REQUEST + 1)
        except TimeoutError:
            raise _Refusal(f"no complete request within {timeout:g} s", "timeout")
        if not chunk:
            return None
        buffer += chunk


def _send(conn: socket.socket, response: dict[str, object]) -> None:
    conn.settimeout(READ_TIMEOUT)
    conn.sendall(json.dumps(response, separators=(",", ":")).encode("utf-8") + b"\n")


def _send_and_close(conn: socket.socket, response: dict[str, object]) -> None:
    with contextlib.suppress(OSError):
        _send(conn, response)
        conn.shutdown(socket.SHUT_WR)
    conn.close()


def _vault_of(path: Path) -> str | None:
    try:
        return str(uuid.UUID(path.name.split(".", 1)[0]))
    except ValueError:
        return None


def _private_dir(directory: Path) -> None:
    """The socket's directory must exist, be ours and writable by nobody else."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.geteuid():
        raise KryptvaultError(f"{directory} belongs to another user: refusing to put a control socket there")
    if info.st_mode & 0o022:
        raise KryptvaultError(f"{directory} is writable by others: refusing to put a control socket there")


def _take_lock(lock_path: Path, socket_path: Path) -> int:
    """Hold an flock for the server's lifetime: two servers for one vault cannot both start."""
    fd = take_flock(lock_path)
    if fd is None:
        raise KryptvaultError(f"a kryptvault daemon is already serving {socket_path}")
    return fd


def _owner(directory: Path) -> int | None:
    try:
        return directory.lstat().st_uid
    except OSError:
        return None


def _clear_stale(path: Path) -> None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise KryptvaultError(f"{path} exists and is not a socket: refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # stale: its server is gone
            return
        except OSError as exc:
            raise KryptvaultError(f"cannot tell whether {path} is in use: {exc.strerror or exc}")
    raise KryptvaultError(f"a kryptvault daemon is already answering on {path}")


def _bind_private(path: Path) -> socket.socket:
    # Bound under a temporary name, made 0600, listening, and only then renamed into place:
    # no moment exists where the path accepts connections with looser permissions. (A umask
    # would do the same but is process-wide, and the daemon has other threads creating files.)
    temp = path.with_name(f".{secrets.token_hex(6)}.tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(temp))
        try:
            os.chmod(temp, 0o600)
            sock.listen(16)
            os.rename(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
    except BaseException:
        sock.close()
        raise
    return sock


# ---------------------------------------------------------------------- client


class DaemonNotRunningError(KryptvaultError):
    """Nothing answers on the control socket."""


class NoAnswerError(KryptvaultError):
    """The daemon closed the connection before its answer: it exited (a lock that another
    route started at the same moment) or it died. Only the mount table can tell which."""


class ForeignServerError(KryptvaultError):
    """The process answering on the control socket is not one of ours."""


class ControlClient:
    def __init__(self, socket_path: Path, timeout: float = CLIENT_TIMEOUT) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def request(self, op: str, **args: object) -> dict[str, object]:
        """Send one request; the daemon's answer (with "ok": true), or KryptvaultError."""
        payload = json.dumps({"op": op, **args}, separators=(",", ":")).encode("utf-8") + b"\n"
        if len(payload) > MAX_REQUEST + 1:
            raise UsageError(f"control request too large ({len(payload)} bytes, at most {MAX_REQUEST})")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(self.timeout)
            self._connect(sock)
            try:
                sock.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # a refusing server closes at once; its error reply may still be readable
            except TimeoutError:
                raise KryptvaultError(f"the kryptvault daemon did not answer within {self.timeout:g} s")
            reply = self._read_reply(sock)
        if reply.get("ok") is not True:
            error = reply.get("error")
            raise KryptvaultError(" ".join(str(error).split()) if error else "the kryptvault daemon refused")
        return reply

    def _connect(self, sock: socket.socket) -> None:
        where = self.socket_path
        try:
            sock.connect(str(where))
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunningError(
                f"no kryptvault daemon is running for {where.name.split('.', 1)[0]} "
                f"(nothing answers on {where})"
            )
        except PermissionError:
            raise KryptvaultError(f"not allowed to connect to {where}")
        except TimeoutError:
            raise KryptvaultError(f"the kryptvault daemon did not accept within {self.timeout:g} s")
        except OSError as exc:
            raise KryptvaultError(f"cannot connect to {where}: {exc.strerror or exc}")
        # Only our own daemon may hear a request or be believed: a socket another user
        # managed to put there (a runtime directory that was not private) is refused
        # before a byte is sent. The kernel records the server's uid when it listened.
        # Root may talk to a user's daemon, but only in that user's own directory.
        server = peer_credentials(sock).uid
        if server != os.geteuid() and not (os.geteuid() == 0 and server == _owner(where.parent)):
            raise ForeignServerError(
                f"refusing the control socket {where}: it is served by uid {server}, not by you"
            )

    def _read_reply(self, sock: socket.socket) -> dict[str, object]:
        data = bytearray()
        while b"\n" not in data:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise KryptvaultError(f"the kryptvault daemon did not answer within {self.timeout:g} s")
            except ConnectionResetError:
                chunk = b""
            except OSError as exc:
                raise KryptvaultError(f"lost the connection to the kryptvault daemon: {exc.strerror or exc}")
            if not chunk:
                raise NoAnswerError("the kryptvault daemon closed the connection without answering")
            data += chunk
            if len(data) > MAX_RESPONSE:
                raise KryptvaultError("the kryptvault daemon sent an oversized reply")
        try:
            reply = json.loads(data[: data.index(b"\n")])
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise KryptvaultError("the kryptvault daemon sent a malformed reply")
        return reply
