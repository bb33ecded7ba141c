"""Taking a backup: a consistent copy of a source (a cluster's etcd, the Foundry DB) streamed
into a store, then retention (`runs.run_backup` is one run)."""
