"""KubeRay manifests (RayService, RayJob, kustomize base and overlays) and the small tools that keep them true.

``k8s.sync`` writes the RayService ``serveConfigV2`` strings from ``deployments/configs``; ``k8s.kustomize`` renders
the overlays offline; ``k8s.model_cache`` is the init container that fills the model cache volume (``HF_HOME``).
"""
