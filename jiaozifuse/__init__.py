"""jiaozifuse: a versioned repository for machine-learning data, mounted with FUSE."""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # jiaozifuse.open(path): the Python API (api.py), imported on first use so
    # that the CLI and the daemon do not pay for it.
    if name == "open":
        from .api import open

        return open
    raise AttributeError(f"module 'jiaozifuse' has no attribute {name!r}")
