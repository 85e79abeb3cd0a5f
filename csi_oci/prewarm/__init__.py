"""Pre-warm: ImageCache objects fill node caches before the pods that need them exist.

- cache: the ImageCache resource (oci.csi.dev/v1alpha1) as the node reads it;
- kube: the few Kubernetes API calls the node plugin and the controller make;
- warmer: the node side: pull what selects this node, pin it, report it;
- summary: the controller side: ready / selected nodes for `kubectl get`.
"""
