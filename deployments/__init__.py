"""Ray Serve adapters over the pipeline core: Ingress (FastAPI), Generator, SafetyChecker, and the app builder."""
