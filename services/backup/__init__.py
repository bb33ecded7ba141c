"""The backup service: etcd and Foundry DB backups to a store, on schedule and on request,
restores and restore drills (`service.py` is its transport; each sub-package is one job)."""
