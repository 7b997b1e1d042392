"""Delivery: what makes "nothing lost, nothing twice" true.

- :mod:`.identity`: the identity of an event (dedup key and fingerprint, job action, profile
  digest, how a file sink recognises a line it wrote), one function each;
- :mod:`.window`: the de-duplication window;
- :mod:`.tracker`: what has been kept (window, watermark, running jobs, accounts, devices);
- :mod:`.ledger`: the one writer to the store (:mod:`cometstream.store`): the events waiting
  for the disk, back-pressure and the commit loop, one transaction per commit;
- :mod:`.gate`: the hold during a remedial sync, de-duplication and redaction before the
  pipeline.
"""
