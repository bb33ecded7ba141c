"""When backups and drills run: what policies ask for, the schedule and RPO records, and the
scheduler's tick on the replica holding the `scheduler` lease."""
