"""jiaozifuse: a versioned repository for machine-learning data, mounted with FUSE."""

__version__ = "0.1.0"
