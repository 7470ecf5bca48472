"""Pieces used by more than one of server, loadtest, bench and the tests, owned by none:
starting a server process (`harness.process`) and PromQL's histogram quantile (`harness.promql`)."""
