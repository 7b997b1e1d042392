"""Delivery: what makes "nothing lost, nothing twice" true.

- :mod:`.identity`: the identity of an event (dedup key and fingerprint, job action, profile
  digest, how a file sink recognises a line it wrote), one function each;
- :mod:`.window`: the de-duplication window;
- :mod:`.tracker`: what has been kept (window, watermark, running jobs, accounts, devices);
- :mod:`.ledger`: the one store, written by one writer: spooled events, cursors, dead letters
  and the delivery state, one transaction per commit; the lock of ``state.dir``;
- :mod:`.gate`: the hold during a remedial sync, de-duplication and redaction before the
  pipeline;
- :mod:`.legacy`: reading the ``checkpoint.json`` of earlier versions, to migrate it.
"""
