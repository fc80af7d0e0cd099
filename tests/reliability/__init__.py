"""Scale and resilience drivers: load, fault injection, the multi-node cluster, the soak and the report.

The integration tests (``tests/integration/test_faults.py``, ``test_soak.py``, ``test_scan_faults.py``,
``test_multinode.py``) run short versions and assert the invariants; ``python -m tests.reliability.report``
(``make reliability``) runs the long versions and writes ``docs/RELIABILITY.md`` with the measured figures.
"""
