"""Bringing a backup back: a cluster's etcd (verified, staged, handed to the provisioner) and
the Foundry DB (`nest restore foundry`), through etcdutl, pg_restore or a SQLite file swap."""
