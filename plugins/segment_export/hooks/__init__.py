"""Hooks: one per destination, each owning auth, base URL, pacing and retries."""
