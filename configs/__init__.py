"""The recipes (colbert.py, dpr.py: `--config=configs/colbert.py:demo`), the defaults they share (common.py) and
the real-text experiment's settings (scifact.py)."""
