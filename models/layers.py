"""Pooling as models call it: backends.ops picks the implementation (a CPU rewrite on CPU)."""

from backends import ops

max_pool = ops.max_pool
