"""A loopback TCP proxy that can cut one replica off from Redis without closing anything.

Each replica gets its own :class:`TcpProxy` in front of the real Redis (its broker
URL and lease URL both name the proxy), so a test can partition that replica alone:

- :meth:`TcpProxy.partition`: stop forwarding in both directions, keep every socket
  open.  No FIN, no RST reaches either side, as when a host freezes or the network
  between it and Redis splits: Redis keeps the replica's blocked commands (a
  ``BRPOP`` keeps popping messages *into* the cut connection, where they wait in
  this proxy's receive buffer), and the replica's commands wait in the other one.
  Connections made during a partition are accepted but not forwarded (the upstream
  side is not even connected): a partitioned host's new connections hang too.
- :meth:`TcpProxy.heal`: forward again, delivering every byte held during the cut,
  in order, both ways (new connections are connected upstream then).
- :meth:`TcpProxy.reset`: end the partition by resetting (SO_LINGER 0, so an RST,
  not a FIN) both sides of every connection that lived through a cut, dropping what
  was held; new connections are forwarded normally.  Returns what Redis had sent
  into the cut and nobody received (e.g. a popped message).

One daemon thread per proxy forwards with ``poll``; :meth:`TcpProxy.close` stops it
and closes every socket.  Control calls are synchronous: once :meth:`partition`
returns, not one more byte is forwarded.  The proxy also keeps a short account of
what it forwarded (:meth:`TcpProxy.blocked_in`), so a test can place a fault while
the replica waits in a given command, and :meth:`TcpProxy.partition_after` cuts
right after forwarding a matching command, from the forwarding thread itself.

Loopback only: it listens on 127.0.0.1 and connects to the upstream it is given.
"""

from __future__ import annotations

import collections
import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

HOST = "127.0.0.1"
CHUNK = 65536
IN, OUT = select.POLLIN, select.POLLOUT
GONE = select.POLLERR | select.POLLHUP | select.POLLNVAL


def _linger_zero(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN, dropping whatever is unsent or unread."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@dataclass
class _Pipe:
    """One client connection and its upstream, with bytes read but not yet written."""

    ident: int
    client: socket.socket
    upstream: socket.socket | None = None
    to_upstream: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    cut: bool = False  # lived through a partition
    # The last command forwarded to Redis (its first bytes) and when, and when the
    # last reply bytes were forwarded back: a command is "pending" while no reply
    # has come since it was sent.
    last_command: bytes = b""
    command_at: float = 0.0
    reply_at: float = 0.0

    def sockets(self) -> list[socket.socket]:
        return [self.client] + ([self.upstream] if self.upstream is not None else [])


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``upstream``; see the module docstring."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._lock = threading.Lock()
        self._pipes: dict[int, _Pipe] = {}
        self._ids = 0
        self._partitioned = False
        self._closed = False
        self._cut_after: Callable[[bytes], bool] | None = None
        self.partitioned_at: float | None = None  # when the current cut began
        # (monotonic time, connection, ">" to Redis or "<" from it, first bytes) of
        # the latest forwarded chunks, for a failing test to show.
        self.trace: collections.deque[tuple[float, int, str, bytes]] = collections.deque(
            maxlen=400)
        # (monotonic time, the last command) of every connection the client closed.
        self.closed: list[tuple[float, bytes]] = []
        self._thread = threading.Thread(target=self._run, name=f"tcpproxy-{self.port}",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def to_url(cls, redis_url: str) -> TcpProxy:
        """A proxy in front of the Redis of ``redis://host:port[/db]``."""
        hostport = redis_url.split("://", 1)[1].split("/", 1)[0]
        host, port = hostport.rsplit(":", 1)
        return cls(host, int(port))

    def url(self, redis_url: str) -> str:
        """``redis_url`` with its host and port replaced by this proxy's."""
        scheme, rest = redis_url.split("://", 1)
        path = rest.split("/", 1)[1] if "/" in rest else ""
        return f"{scheme}://{HOST}:{self.port}" + (f"/{path}" if path else "")

    # ------------------------------------------------------------ control

    @property
    def partitioned(self) -> bool:
        return self._partitioned

    def partition(self) -> float:
        """Stop forwarding now; returns the monotonic time the cut began."""
        with self._lock:
            self._cut_locked()
            at = self.partitioned_at
        self._wake()
        assert at is not None
        return at

    def partition_after(self, match: Callable[[bytes], bool]) -> None:
        """Cut right after forwarding the next chunk to Redis for which
        ``match(chunk)`` is true (checked in the forwarding thread, so not one
        byte more passes: e.g. while the replica waits in the BRPOP just sent)."""
        with self._lock:
            self._cut_after = match

    def heal(self) -> None:
        """Forward again, held bytes first."""
        with self._lock:
            self._partitioned = False
            self.partitioned_at = None
            self._cut_after = None
        self._wake()

    def reset(self) -> dict[int, bytes]:
        """RST both sides of every connection that lived through a cut, end the
        partition; returns, per connection, the bytes Redis had sent into the cut
        that were never delivered (in this proxy's buffer or its receive queue)."""
        dropped: dict[int, bytes] = {}
        with self._lock:
            for ident, pipe in list(self._pipes.items()):
                if not pipe.cut:
                    continue
                held = bytes(pipe.to_client)
                if pipe.upstream is not None:
                    with contextlib.suppress(OSError):
                        held += pipe.upstream.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                if held:
                    dropped[ident] = held
                for sock in pipe.sockets():
                    _linger_zero(sock)
                del self._pipes[ident]
            self._partitioned = False
            self.partitioned_at = None
            self._cut_after = None
        self._wake()
        return dropped

    def blocked_in(self, needle: bytes, since: float = 0.0) -> float | None:
        """When the oldest connection still waiting for the reply to a command
        containing ``needle`` sent it (after ``since``); None if none waits."""
        with self._lock:
            waiting = [p.command_at for p in self._pipes.values()
                       if needle in p.last_command and p.command_at > p.reply_at
                       and p.command_at > since]
        return min(waiting) if waiting else None

    def waiting_in(self, match: Callable[[bytes], bool], since: float = 0.0) -> float | None:
        """Like :meth:`blocked_in`, for a command for which ``match(command)`` is true."""
        with self._lock:
            waiting = [p.command_at for p in self._pipes.values()
                       if match(p.last_command) and p.command_at > p.reply_at
                       and p.command_at > since]
        return min(waiting) if waiting else None

    def connections(self) -> int:
        with self._lock:
            return len(self._pipes)

    def accepted(self) -> int:
        """How many connections clients opened through this proxy so far (also
        those it could not connect upstream: each one a client's attempt)."""
        with self._lock:
            return self._ids

    def close(self) -> None:
        """Stop the thread and close every socket (RST: nothing is owed to anyone)."""
        with self._lock:
            self._closed = True
        self._wake()
        self._thread.join(5.0)
        with self._lock:
            for pipe in self._pipes.values():
                for sock in pipe.sockets():
                    _linger_zero(sock)
            self._pipes.clear()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------ the forwarding thread

    def _cut_locked(self) -> None:
        if not self._partitioned:
            self._partitioned = True
            self.partitioned_at = time.monotonic()
        for pipe in self._pipes.values():
            pipe.cut = True

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _connect_upstream(self, pipe: _Pipe) -> bool:
        try:
            upstream = socket.create_connection(self.upstream, timeout=2.0)
        except OSError:
            _linger_zero(pipe.client)
            del self._pipes[pipe.ident]
            return False
        upstream.setblocking(False)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipe.upstream = upstream
        return True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._ids += 1
            pipe = _Pipe(self._ids, client, cut=self._partitioned)
            self._pipes[pipe.ident] = pipe
            if not self._partitioned:
                self._connect_upstream(pipe)

    def _interest(self) -> dict[int, tuple[_Pipe, socket.socket, int]]:
        """fd -> (pipe, socket, events) for this round; nothing while partitioned."""
        wanted: dict[int, tuple[_Pipe, socket.socket, int]] = {}
        if self._partitioned:
            return wanted
        for pipe in list(self._pipes.values()):
            if pipe.upstream is None and not self._connect_upstream(pipe):
                continue
            assert pipe.upstream is not None
            client_events = upstream_events = 0
            # Read a side only once what it sent before was written on (backpressure).
            if pipe.to_upstream:
                upstream_events |= OUT
            else:
                client_events |= IN
            if pipe.to_client:
                client_events |= OUT
            else:
                upstream_events |= IN
            wanted[pipe.client.fileno()] = (pipe, pipe.client, client_events)
            wanted[pipe.upstream.fileno()] = (pipe, pipe.upstream, upstream_events)
        return wanted

    def _drop(self, pipe: _Pipe) -> None:
        """One side closed or failed: close both (a FIN, as the other side would see)."""
        for sock in pipe.sockets():
            with contextlib.suppress(OSError):
                sock.close()
        self._pipes.pop(pipe.ident, None)

    def _read(self, pipe: _Pipe, sock: socket.socket) -> None:
        try:
            data = sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            # Flush what the other side still owes before closing.
            other, pending = ((pipe.upstream, pipe.to_upstream) if sock is pipe.client
                              else (pipe.client, pipe.to_client))
            if other is not None and pending:
                with contextlib.suppress(OSError):
                    other.setblocking(True)
                    other.settimeout(0.5)
                    other.sendall(pending)
            if sock is pipe.client:
                self.closed.append((time.monotonic(), pipe.last_command))
            self._drop(pipe)
            return
        now = time.monotonic()
        if sock is pipe.client:
            pipe.to_upstream += data
            pipe.last_command, pipe.command_at = data[:256], now
        else:
            pipe.to_client += data
            pipe.reply_at = now

    def _write(self, pipe: _Pipe, sock: socket.socket) -> None:
        to_upstream = sock is not pipe.client
        buffer = pipe.to_upstream if to_upstream else pipe.to_client
        try:
            sent = sock.send(buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(pipe)
            return
        chunk = bytes(buffer[:sent])
        del buffer[:sent]
        self.trace.append((time.monotonic(), pipe.ident, ">" if to_upstream else "<",
                           chunk[:120]))
        if to_upstream and self._cut_after is not None and self._cut_after(chunk):
            self._cut_after = None
            self._cut_locked()

    def _run(self) -> None:
        poller = select.poll
        while True:
            with self._lock:
                if self._closed:
                    return
                wanted = self._interest()
            polling = poller()
            polling.register(self._listener, IN)
            polling.register(self._wake_r, IN)
            for fd, (_, _, events) in wanted.items():
                if events:
                    polling.register(fd, events)
            ready = polling.poll(1000)
            with self._lock:
                if self._closed:
                    return
                for fd, events in ready:
                    if fd == self._wake_r.fileno():
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                        continue
                    if fd == self._listener.fileno():
                        self._accept()
                        continue
                    entry = wanted.get(fd)
                    if entry is None:
                        continue
                    pipe, sock, _ = entry
                    # Whatever changed since poll() returned: a cut forwards nothing,
                    # and a dropped pipe is gone.
                    if self._partitioned or pipe.ident not in self._pipes:
                        continue
                    if events & OUT:
                        self._write(pipe, sock)
                    if pipe.ident in self._pipes and events & (IN | GONE):
                        self._read(pipe, sock)
