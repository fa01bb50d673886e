"""The session layer: monitored sessions, scaffold, session creators, recovery (private)."""
