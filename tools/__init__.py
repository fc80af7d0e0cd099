"""Maintenance scripts run from the Makefile: ``python -m tools.screenshots`` (``make screenshots``)."""
