"""A cache build killed after its n-th shard is written, as a crash between shards would leave it."""

import contextlib

import pytest

from hypersd.data import cache as cache_mod


@contextlib.contextmanager
def killed_after_flushes(monkeypatch, n: int = 2):
    """Run the body with the cache writer raising KeyboardInterrupt right after its n-th flush."""
    real_flush, calls = cache_mod._Writer.flush, []

    def flush_then_die(self):
        real_flush(self)
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod._Writer, "flush", flush_then_die)
    with pytest.raises(KeyboardInterrupt):
        yield
    monkeypatch.setattr(cache_mod._Writer, "flush", real_flush)
