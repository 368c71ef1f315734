"""Schema revisions, oldest first (0001_initial creates users, items and server_keys)."""
