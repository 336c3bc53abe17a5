"""Runners, one per --mode: read the config, build the pieces, call the layers below."""
