"""A real Kubernetes for the tests: binaries built from Go modules, a management cluster of
real kube-apiserver, kube-controller-manager and kube-scheduler processes, and the harness's
node agents that run (or, by default, only pretend to run) what is scheduled to its Nodes."""
