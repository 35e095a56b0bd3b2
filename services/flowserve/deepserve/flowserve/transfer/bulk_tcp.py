"""A plain TCP channel for bulk bytes between hosts (a fork's weights), beside gRPC.

Across hosts a gRPC byte stream reached ~39% of a plain socket's speed between the same two
namespace hosts (each chunk is copied into a protobuf message, framed by HTTP/2 and paced by
its flow-control windows, and copied out again). For a known, large, contiguous payload the
control stays on gRPC and only the bytes take a socket: the source listens on its own address
(a port of the kernel's choosing, one connection, for this transfer only), offers
`host:port` and a random token over the gRPC call, and sends the tensors straight from their
memory (`sendall` on memoryviews); the target connects, presents the token, and receives
straight into the destination's memory (`recv_into`), or through one reused buffer for a
destination written with `pwrite`. A connection without the token is
dropped; nothing else is ever read from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import socket
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from deepserve.errors import DeadlineExceeded, InvalidArgument, Unavailable

log = logging.getLogger(__name__)

TOKEN_BYTES = 16


@dataclass(frozen=True, slots=True)
class BulkOffer:
    """Where and how to fetch a payload: connect to `address`, send `token`, read `nbytes`."""

    address: str
    token: bytes
    nbytes: int


class BulkSender:
    """Sends `buffers` back to back to the one connection that presents the offer's token."""

    def __init__(self, host: str, buffers: Sequence[memoryview]) -> None:
        self._buffers = [b.cast("B") for b in buffers]
        self._token = secrets.token_bytes(TOKEN_BYTES)
        self._listener = socket.create_server((host, 0), backlog=4)
        port = self._listener.getsockname()[1]
        self.offer = BulkOffer(f"{host}:{port}", self._token, sum(len(b) for b in self._buffers))

    async def serve(self, timeout_s: float) -> int:
        """Waits for the target, sends every buffer, returns the bytes sent."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._serve), timeout_s)
        except TimeoutError:
            raise DeadlineExceeded(f"no fork target fetched the weights in {timeout_s}s") from None
        finally:
            self.close()

    def _serve(self) -> int:
        while True:
            conn, peer = self._listener.accept()
            with conn:
                conn.settimeout(30)
                token = _recv_exact(conn, TOKEN_BYTES)
                if token is None or not hmac.compare_digest(token, self._token):
                    log.warning("bulk connection without the token dropped: %s", peer)
                    continue
                for buffer in self._buffers:
                    conn.sendall(buffer)
                conn.shutdown(socket.SHUT_WR)
                # The target closes once it has everything; wait for that (EOF), so the
                # caller's "done" means received, not merely queued in a kernel buffer.
                conn.recv(1)
                return self.offer.nbytes

    def close(self) -> None:
        with contextlib.suppress(OSError):
            # Unblocks a thread still waiting in accept().
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    data = bytearray()
    while len(data) < n:
        piece = conn.recv(n - len(data))
        if not piece:
            return None
        data += piece
    return bytes(data)


async def receive(offer: BulkOffer, destinations: Sequence[memoryview], timeout_s: float) -> int:
    """Fetches the offer's payload into `destinations` (filled in order); returns bytes read."""
    views = [d.cast("B") for d in destinations]
    if sum(len(v) for v in views) != offer.nbytes:
        raise InvalidArgument(
            f"bulk offer of {offer.nbytes} bytes for {sum(len(v) for v in views)} bytes of room",
            field="bulk_offer",
        )
    try:
        return await asyncio.wait_for(asyncio.to_thread(_receive, offer, views), timeout_s)
    except TimeoutError:
        raise DeadlineExceeded(
            f"bulk transfer from {offer.address} took over {timeout_s}s"
        ) from None
    finally:
        # Released here, not left to the collector: the worker thread may still hold them a
        # moment after returning, and a mapping cannot close while views of it exist.
        for view in views:
            view.release()


# Bytes read per pass when receiving into a writer: large enough for few system calls, small
# enough to stay in cache while it is written on.
RECEIVE_BUFFER_BYTES = 8 << 20


async def receive_to_writer(
    offer: BulkOffer,
    segments: Sequence[tuple[int, int]],
    write: Callable[[int, memoryview], None],
    timeout_s: float,
) -> int:
    """Fetches the offer's payload as `segments` ((offset, nbytes), in order), handing each
    piece to `write(offset, data)` from one reused buffer; returns bytes read.

    For a destination written with `pwrite` (a fork's rank file): on a VM, filling fresh tmpfs
    pages through a mapping costs a page fault per 4 KiB, more than the extra copy."""
    if sum(n for _, n in segments) != offer.nbytes:
        raise InvalidArgument(
            f"bulk offer of {offer.nbytes} bytes for {sum(n for _, n in segments)} bytes of room",
            field="bulk_offer",
        )
    try:
        return await asyncio.wait_for(
            asyncio.to_thread(_receive_to_writer, offer, segments, write), timeout_s
        )
    except TimeoutError:
        raise DeadlineExceeded(
            f"bulk transfer from {offer.address} took over {timeout_s}s"
        ) from None


def _receive_to_writer(
    offer: BulkOffer,
    segments: Sequence[tuple[int, int]],
    write: Callable[[int, memoryview], None],
) -> int:
    buffer = memoryview(bytearray(min(RECEIVE_BUFFER_BYTES, max(offer.nbytes, 1))))
    received = 0
    with _connect(offer) as conn:
        for offset, nbytes in segments:
            done = 0
            while done < nbytes:
                want = min(len(buffer), nbytes - done)
                n = conn.recv_into(buffer, want, socket.MSG_WAITALL)
                if n == 0:
                    raise Unavailable(
                        f"bulk source {offer.address} closed after {received + done} of "
                        f"{offer.nbytes} bytes"
                    )
                write(offset + done, buffer[:n])
                done += n
            received += done
    return received


def _connect(offer: BulkOffer) -> socket.socket:
    """A connection to the offer's source that has presented the token."""
    host, port = offer.address.rsplit(":", 1)
    try:
        conn = socket.create_connection((host, int(port)), timeout=30)
    except OSError as exc:
        raise Unavailable(f"bulk source {offer.address} unreachable: {exc}") from exc
    conn.sendall(offer.token)
    return conn


def _receive(offer: BulkOffer, views: Sequence[memoryview]) -> int:
    received = 0
    with _connect(offer) as conn:
        for view in views:
            filled = 0
            while filled < len(view):
                with view[filled:] as rest:
                    n = conn.recv_into(rest, len(rest), socket.MSG_WAITALL)
                if n == 0:
                    raise Unavailable(
                        f"bulk source {offer.address} closed after {received + filled} of "
                        f"{offer.nbytes} bytes"
                    )
                filled += n
            received += filled
    return received


def kernel_timeouts(conn: socket.socket, seconds: float) -> None:
    """Blocking mode with the kernel's own timeouts for a bulk stream: a Python-level timeout
    makes the socket non-blocking, so a large send or MSG_WAITALL read returns whatever fits
    and waits in poll() between pieces (many calls and wake-ups per chunk); here each call
    sleeps in the kernel until done, and a peer silent for `seconds` still fails it."""
    conn.settimeout(None)
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


# Buffers per sendmsg/recvmsg_into call (the kernel takes at most IOV_MAX, 1024 on Linux).
_IOV_BATCH = 512


def _advance(views: list[memoryview], first: int, n: int) -> int:
    """Drops n bytes from the front of views[first:]; returns the first view not yet done."""
    while n:
        if n >= len(views[first]):
            n -= len(views[first])
            first += 1
        else:
            views[first] = views[first][n:]
            n = 0
    return first


def send_pieces(conn: socket.socket, pieces: Sequence[memoryview]) -> None:
    """Sends the pieces back to back as one byte stream (`sendmsg` gathers them: one system
    call for many pieces, no copy into one buffer)."""
    views = [p.cast("B") for p in pieces if p.nbytes]
    first = 0
    while first < len(views):
        first = _advance(views, first, conn.sendmsg(views[first : first + _IOV_BATCH]))


def recv_pieces(conn: socket.socket, pieces: Sequence[memoryview]) -> bool:
    """Fills the pieces in order from the stream (`recvmsg_into` scatters: the bytes land in
    place); False if the peer closed first."""
    views = [p.cast("B") for p in pieces if p.nbytes]
    first = 0
    while first < len(views):
        n = conn.recvmsg_into(views[first : first + _IOV_BATCH], 0, socket.MSG_WAITALL)[0]
        if n == 0:
            return False
        first = _advance(views, first, n)
    return True


class StreamSender:
    """One connection (the one presenting the token), many payloads sent in order: a PD
    hand-off's KV chunks, whose metadata travel in the gRPC messages. Sends run on one worker
    thread in submission order, so the caller queues a payload and moves on (the bytes flow
    while it produces the next chunk); `flush` waits for all of them."""

    def __init__(self, host: str) -> None:
        self._token = secrets.token_bytes(TOKEN_BYTES)
        self._listener = socket.create_server((host, 0), backlog=4)
        self.offer = BulkOffer(f"{host}:{self._listener.getsockname()[1]}", self._token, 0)
        self._conn: socket.socket | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-send")
        self._pending: list[asyncio.Future[None]] = []
        self.bytes_sent = 0

    def _accept(self) -> socket.socket:
        while True:
            conn, peer = self._listener.accept()
            conn.settimeout(30)
            token = _recv_exact(conn, TOKEN_BYTES)
            if token is not None and hmac.compare_digest(token, self._token):
                # No Nagle: a payload's last partial segment would otherwise wait for the
                # receiver's delayed ACK (~40 ms) when nothing follows it.
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                kernel_timeouts(conn, 30)
                return conn
            log.warning("bulk connection without the token dropped: %s", peer)
            conn.close()

    def _send(self, pieces: Sequence[memoryview]) -> None:
        if self._conn is None:
            self._conn = self._accept()  # the first send waits for the receiver
        send_pieces(self._conn, pieces)

    def send(self, payload: memoryview | Sequence[memoryview]) -> None:
        """Queues one payload, given whole or as pieces sent back to back (a strided tensor's
        contiguous runs: no copy into one buffer); keep them alive until `flush`."""
        pieces = [payload] if isinstance(payload, memoryview) else list(payload)
        loop = asyncio.get_running_loop()
        self._pending.append(loop.run_in_executor(self._worker, self._send, pieces))
        self.bytes_sent += sum(p.nbytes for p in pieces)

    async def flush(self, timeout_s: float) -> None:
        """Waits until every queued payload is sent."""
        pending, self._pending = self._pending, []
        try:
            await asyncio.wait_for(asyncio.gather(*pending), timeout_s)
        except TimeoutError:
            raise DeadlineExceeded(f"KV receiver did not read within {timeout_s}s") from None
        except OSError as exc:
            raise Unavailable(f"KV receiver went away: {exc}") from exc

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.shutdown(socket.SHUT_RDWR)  # unblocks a send in flight
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # unblocks an accept in flight
        self._listener.close()
        self._worker.shutdown(wait=False, cancel_futures=True)
        if self._conn is not None:
            self._conn.close()


class StreamReceiver:
    """The receiving end of a StreamSender: reads each payload into the room given for it, in
    order, on one worker thread (the caller queues a read and goes on to the next message)."""

    def __init__(self, conn: socket.socket, address: str) -> None:
        self._conn = conn
        self.address = address
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-recv")

    @classmethod
    async def connect(cls, offer: BulkOffer, timeout_s: float) -> StreamReceiver:
        def connect() -> socket.socket:
            host, port = offer.address.rsplit(":", 1)
            conn = socket.create_connection((host, int(port)), timeout=timeout_s)
            conn.sendall(offer.token)
            kernel_timeouts(conn, timeout_s)
            return conn

        try:
            return cls(await asyncio.to_thread(connect), offer.address)
        except OSError as exc:
            raise Unavailable(f"KV source {offer.address} unreachable: {exc}") from exc

    def _read(self, pieces: Sequence[memoryview]) -> None:
        if not recv_pieces(self._conn, pieces):
            raise Unavailable(f"KV source {self.address} closed mid-transfer")

    def read_into(self, room: memoryview | Sequence[memoryview]) -> asyncio.Future[None]:
        """Queues a read that fills `room` (one view, or pieces filled in order: a strided
        destination's contiguous runs); await the result to know it is filled."""
        pieces = [room] if isinstance(room, memoryview) else list(room)
        return asyncio.get_running_loop().run_in_executor(self._worker, self._read, pieces)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.shutdown(socket.SHUT_RDWR)  # unblocks a read in flight
        self._conn.close()
        self._worker.shutdown(wait=False, cancel_futures=True)
