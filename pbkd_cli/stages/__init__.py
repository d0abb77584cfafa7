"""One module per CLI stage; each exposes `run(cfg, run) -> summary dict`."""
