"""telegram-fetcher worker: one OS process per Telegram session."""
