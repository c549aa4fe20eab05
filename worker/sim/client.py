"""The simulated client: the real gated Telethon client with a fake sender below it.

``connect()`` installs a :class:`SimSender` as ``client._sender`` instead of opening an MTProto
connection, so everything above the wire runs unchanged: our gate hook, Telethon's ``_call``
(flood bookkeeping, entity processing into a ``MemorySession``) and ``iter_messages``
pagination. The sender answers each request from a :class:`~worker.sim.server.SimServer` in its
own task (a Future, as ``MTProtoSender.send`` returns), which a client-side timeout cancels.
"""

from __future__ import annotations

import asyncio
from typing import Any

from telethon.sessions import MemorySession

from fleet.clock import Clock, SystemClock
from fleet.gate import RequestGate
from fleet.retry import OnRetry
from worker.sim.server import SimServer
from worker.sim.settings import SimSettings
from worker.sim.world import World
from worker.tgclient import ClientFactory, GatedClient


class SimSender:
    """Stands in for ``MTProtoSender``: ``send`` returns a Future the server resolves."""

    def __init__(self, server: SimServer) -> None:
        self.server = server
        self.connected = True
        self.sent = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.disconnected: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def send(self, request: Any, ordered: bool = False) -> asyncio.Future[Any]:
        if not self.connected:
            raise ConnectionError("Cannot send requests while disconnected")
        if isinstance(request, list):
            raise TypeError("the simulator does not take containers of requests")
        self.sent += 1
        task = asyncio.get_running_loop().create_task(self.server.serve(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def is_connected(self) -> bool:
        return self.connected

    async def disconnect(self) -> None:
        self.connected = False
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if not self.disconnected.done():
            self.disconnected.set_result(None)


class SimTelegramClient(GatedClient):
    """A :class:`GatedClient` talking to the simulator (``TELEGRAM_BACKEND=sim``)."""

    def __init__(
        self,
        settings: SimSettings,
        session_name: str,
        *,
        gate: RequestGate | None = None,
        clock: Clock | None = None,
        on_retry: OnRetry | None = None,
        world: World | None = None,
    ) -> None:
        clock = clock or SystemClock()
        super().__init__(
            MemorySession(),
            1,
            "sim",
            settings=settings,
            gate=gate,
            clock=clock,
            on_retry=on_retry,
        )
        self.sim = SimServer(settings, session_name, clock, world=world)
        self._sim_sender: SimSender | None = None

    async def connect(self) -> None:
        if self._sim_sender is not None and self._sim_sender.connected:
            return
        self._loop = asyncio.get_running_loop()  # Telethon's _call checks the loop
        await self.sim.open()
        self._sim_sender = SimSender(self.sim)
        self._sender = self._sim_sender

    def is_connected(self) -> bool:
        return self._sim_sender is not None and self._sim_sender.connected

    async def disconnect(self) -> None:
        sender, self._sim_sender = self._sim_sender, None
        if sender is not None:
            await sender.disconnect()
        await self.sim.close()


def sim_client_factory(settings: SimSettings, *, world: World | None = None) -> ClientFactory:
    """A :data:`worker.telegram.ClientFactory` answering from the simulator."""

    def make(
        session_name: str,
        *,
        gate: RequestGate | None = None,
        clock: Clock | None = None,
        on_retry: OnRetry | None = None,
    ) -> GatedClient:
        return SimTelegramClient(
            settings, session_name, gate=gate, clock=clock, on_retry=on_retry, world=world
        )

    return make
