"""The fleet's shared core: what every fleet process needs, worker and governor alike.

Three layers, checked by import-linter (``pyproject.toml``)::

    worker/    the fetcher: queue side, Telegram boundary, request gate, storage, daemon
    governor/  the control process: controller, policy, leader, recovery loop, scheduler
    fleet/     settings, Redis connection, keys and Lua, clock, chats, events, dead letters,
               recovery, bucket and breaker clients, logs, metrics, Pushgateway, exit codes

``worker`` and ``governor`` import ``fleet``; they never import each other, and ``fleet``
imports neither.
"""
