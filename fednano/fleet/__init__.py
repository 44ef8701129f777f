"""The simulated device fleet: many ``fednano-edge run`` processes against the real broker,
cloud and database, with fault injection (``fednano fleet simulate``, ``fednano demo``)."""
