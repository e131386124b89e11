"""The CRI API (k8s.io/cri-api runtime/v1) and its generated stubs; see README.md."""
