"""A small MQTT 3.1.1 client for devices, on asyncio and fleetward's codec.

It does what a device needs of the hub and no more: CONNECT over TLS, QoS 0 and 1 publishes (a QoS 1
publish returns once the hub acknowledged it, that is once the hub committed it; :meth:`send_publish`
hands back the acknowledgement as a future, for a sender that keeps a window of them), subscriptions,
messages in arrival order through a bounded queue (acknowledged on receipt, or by the consumer with
``auto_ack=False``), and keep-alive pings. A hub silent for one and a half keep-alives (no answer to the
pings) is taken for gone: the connection is dropped and :attr:`closed` is set.
Simulated fleets use it because a thread per client (as paho has) does not scale to thousands of devices.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from types import TracebackType

from fleetward.errors import AccessRefused, ProtocolViolation, TransportError
from fleetward.hub import codec


class MqttClient:
    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        tls: ssl.SSLContext,
        *,
        username: str | None = None,
        keep_alive_seconds: int = 60,
        clean_session: bool = True,
        max_packet_bytes: int = 512 * 1024,
        inbox_size: int = 256,
        timeout_seconds: float = 10.0,
        auto_ack: bool = True,
    ) -> None:
        self._address = (host, port)
        self._connect = codec.Connect(
            client_id=client_id, keep_alive=keep_alive_seconds, clean_session=clean_session, username=username
        )
        self._tls = tls
        self._reader_codec = codec.PacketReader(max_packet_bytes)
        self._timeout = timeout_seconds
        self._auto_ack = auto_ack
        self._writer: asyncio.StreamWriter | None = None
        self._waiting: dict[int, asyncio.Future[codec.Packet]] = {}
        self._next_id = 0
        self._last_received = 0.0
        self.inbox: asyncio.Queue[codec.Publish] = asyncio.Queue(inbox_size)
        self._tasks: list[asyncio.Task[None]] = []
        self.session_present = False
        self.closed = asyncio.Event()

    @property
    def tls_context(self) -> ssl.SSLContext:
        return self._tls

    async def __aenter__(self) -> MqttClient:
        try:
            async with asyncio.timeout(self._timeout):
                reader, self._writer = await asyncio.open_connection(*self._address, ssl=self._tls)
        except (OSError, TimeoutError, ssl.SSLError) as error:
            raise TransportError(
                f"could not reach the hub: {type(error).__name__}: {error}", code="unreachable"
            ) from None
        self._last_received = asyncio.get_running_loop().time()
        connack: asyncio.Future[codec.Packet] = asyncio.get_running_loop().create_future()
        self._waiting[0] = connack
        self._tasks.append(asyncio.create_task(self._read(reader)))
        try:
            self._write(self._connect)
            answer = await self._wait(connack)
        except BaseException:
            await self.close()
            raise
        assert isinstance(answer, codec.ConnAck)
        if answer.return_code is not codec.ConnectReturnCode.ACCEPTED:
            await self.close()
            raise AccessRefused(
                f"the hub refused the connection: {answer.return_code.name}", code="connect_refused"
            )
        self.session_present = answer.session_present
        self._tasks.append(asyncio.create_task(self._ping()))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._writer is not None and not self.closed.is_set():
            with contextlib.suppress(OSError, ConnectionError, TransportError):
                self._write(codec.Disconnect())
        await self.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, ConnectionError, ssl.SSLError):
                await self._writer.wait_closed()
        self.closed.set()

    def abort(self) -> None:
        """Drop the connection at once, without DISCONNECT (as a lost network does); ``closed`` follows."""
        if self._writer is not None:
            self._writer.transport.abort()

    def _write(self, packet: codec.Packet) -> None:
        if self._writer is None or self.closed.is_set():
            raise TransportError("the connection to the hub is closed", code="disconnected")
        self._writer.write(codec.encode(packet))

    def _packet_id(self) -> int:
        for _ in range(0xFFFF):
            self._next_id = self._next_id % 0xFFFF + 1
            if self._next_id not in self._waiting:
                return self._next_id
        raise TransportError("every packet id is in use", code="too_many_in_flight")

    async def _wait(self, future: asyncio.Future[codec.Packet]) -> codec.Packet:
        try:
            async with asyncio.timeout(self._timeout):
                return await future
        except TimeoutError:
            raise TransportError("the hub did not answer in time", code="hub_timeout") from None

    def send_publish(self, topic: str, payload: bytes, *, dup: bool = False) -> asyncio.Future[codec.Packet]:
        """Send a QoS 1 message now; the future is its PUBACK (or a TransportError if the connection ends)."""
        packet_id = self._packet_id()
        future: asyncio.Future[codec.Packet] = asyncio.get_running_loop().create_future()
        self._write(codec.Publish(topic, payload, qos=1, dup=dup, packet_id=packet_id))
        self._waiting[packet_id] = future
        return future

    async def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        """Send a message; with QoS 1, return once the hub has acknowledged (committed) it."""
        if qos == 0:
            self._write(codec.Publish(topic, payload))
            return
        future = self.send_publish(topic, payload)
        try:
            await self._wait(future)
        finally:
            if not future.done():
                future.cancel()

    def acknowledge(self, packet: codec.Publish) -> None:
        """Acknowledge a QoS 1 message from the inbox (with ``auto_ack=False``)."""
        if packet.qos == 1 and packet.packet_id:
            self._write(codec.PubAck(packet.packet_id))

    async def subscribe(self, *topic_filters: str) -> tuple[int, ...]:
        """Subscribe at QoS 1; the hub's answer per filter (0x80 where it refused)."""
        packet_id = self._packet_id()
        future: asyncio.Future[codec.Packet] = asyncio.get_running_loop().create_future()
        self._waiting[packet_id] = future
        self._write(codec.Subscribe(packet_id, tuple((item, 1) for item in topic_filters)))
        answer = await self._wait(future)
        assert isinstance(answer, codec.SubAck)
        return answer.return_codes

    async def _read(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                self._last_received = loop.time()
                for packet in self._reader_codec.feed(data):
                    await self._dispatch(packet)
            self.abort()  # the hub ended the stream: do not wait for a TLS goodbye that may never come
        except (OSError, ConnectionError, ssl.SSLError, ProtocolViolation, TransportError):
            self.abort()
        finally:
            self.closed.set()
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(TransportError("the hub closed the connection", code="disconnected"))
            self._waiting.clear()

    async def _dispatch(self, packet: codec.Packet) -> None:
        if isinstance(packet, codec.Publish):
            await self.inbox.put(packet)  # a full inbox stops reading: back-pressure to the hub
            if self._auto_ack:
                self.acknowledge(packet)
            return
        key = 0 if isinstance(packet, codec.ConnAck) else getattr(packet, "packet_id", None)
        if key is not None:
            future = self._waiting.pop(key, None)
            if future is not None and not future.done():
                future.set_result(packet)

    async def _ping(self) -> None:
        loop = asyncio.get_running_loop()
        keep_alive = self._connect.keep_alive or 1740
        while not self.closed.is_set():
            await asyncio.sleep(max(0.5, keep_alive * 0.5))
            if self.closed.is_set():
                return
            if loop.time() - self._last_received > keep_alive * 1.5:
                self.abort()  # no PINGRESP, nothing else: the hub or the path to it is gone
                return
            self._write(codec.PingReq())
