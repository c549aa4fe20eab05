"""telegram-fetcher governor: keeps the fleet inside Telegram's limits."""
