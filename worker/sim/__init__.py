"""The Telegram simulator (``TELEGRAM_BACKEND=sim``): plugs in below Telethon.

``world`` (deterministic chats and history), ``limits`` (hidden per-account and fleet rate
limits), ``server`` (answers TL requests with real TL types and RPC errors) and ``client``
(the gated Telethon client with the simulator as its sender).
"""
