"""Training any method's model: settings (config.py), optimizer groups and schedule (optim.py), the loop (loop.py)
and atomic, resumable checkpoints (checkpoint.py)."""
