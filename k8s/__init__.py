"""KubeRay manifests (RayService, RayJob, NetworkPolicies, kustomize base and overlays) and the small tools that keep
them true.

``k8s.sync`` writes the RayService ``serveConfigV2`` strings from ``deployments/configs``; ``k8s.model_cache`` is the
init container that fills the model cache volume (``HF_HOME``). The overlays are rendered by ``kubectl kustomize``.
"""
