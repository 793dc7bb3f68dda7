"""rempctl: the operator's CLI for rempd, over its control socket. Never imports torch."""
