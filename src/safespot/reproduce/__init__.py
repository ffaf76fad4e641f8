"""Reproductions of the papers' tables: specs (``conf/reproduce/NAME.yaml``) run by one engine
(:mod:`safespot.reproduce.engine`; the command ``safespot-reproduce``, :mod:`safespot.reproduce.cli`)."""
