"""What the analysis keeps between runs, in one folder (:func:`location.cache_root`).

* :mod:`.location` — where: ``$XDG_CACHE_HOME/dora-analysis`` (``~/.cache/dora-analysis``), shared
  by the results cache and the SVD cache of ``--intruders``.
* :mod:`.identity` — what a checkpoint *is* for the cache: its files' identity (local: size,
  modification and change times, inode, a content digest; remote: the storage's ETag or hash).
* :mod:`.store` — a bounded key → bytes store in one SQLite file (WAL; entries are atomic, the
  oldest evicted first, safe for several processes at once).
* :mod:`.results` — the results cache: one entry per matrix pair, keyed by both checkpoints'
  identity and every setting that changes its numbers, so that a run killed at any moment and
  started again computes only what is missing (docs/robustness.md).
"""
