"""Which Telegram a worker talks to: the composition root's one choice of client.

``TELEGRAM_BACKEND=telethon`` (the default) gives the real Telethon client over MTProto with a
session file of ``SESSIONS_DIR``; ``TELEGRAM_BACKEND=sim`` gives the built-in simulator
(:mod:`worker.sim`), read from its own ``SIM_*`` settings and injected as a
:class:`~worker.tgclient.ClientFactory`. This is the only module outside ``worker/sim`` that
knows the simulator exists; the Telegram boundary (``worker/telegram.py``) never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleet.settings import load_settings
from worker.settings import WorkerSettings
from worker.tgclient import ClientFactory


@dataclass(frozen=True)
class Backend:
    """What the worker needs to know of its Telegram: how to make a client, which sessions."""

    name: str
    client_factory: ClientFactory | None  # None: Telethon with a session file
    #: Fixed session names (the simulator's); ``None`` means the session files of SESSIONS_DIR.
    session_names: tuple[str, ...] | None = None

    @property
    def simulated(self) -> bool:
        return self.client_factory is not None

    def login_name(self, session_name: str) -> str | None:
        """The account name a login would report without asking anything, if simulated."""
        return f"Sim {session_name}" if self.simulated else None


def backend_for(settings: WorkerSettings) -> Backend:
    """The backend ``TELEGRAM_BACKEND`` names (the simulator's settings are read here)."""
    if settings.telegram_backend != "sim":
        return Backend("telethon", None)
    from worker.sim.client import sim_client_factory
    from worker.sim.settings import SimSettings

    sim = (
        settings
        if isinstance(settings, SimSettings)
        else load_settings(SimSettings, **dict(settings))
    )
    return Backend("sim", sim_client_factory(sim), tuple(sim.session_names()) or ("sim",))
